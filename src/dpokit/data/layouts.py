"""Recognise the layout of each preference row and convert it to a `PreferenceExample`.

Preference data comes in many community layouts (TRL's prompt/chosen/rejected,
Anthropic hh-rlhf transcripts, ShareGPT, OpenAI preference fine-tuning, Alpaca,
stack-exchange-paired, Step-DPO's steps, and `every_turn` conversations judged at several turns,
which give one pair per judged turn: `to_examples`). Any chat layout may carry a `tools`
column. Users should not have to convert files by hand, so the layout is detected per row,
and an explicit column mapping covers renamed columns. A problem with one row raises `RowSkip`, which `load_preferences`
(through `rows.convert_rows`) counts in the `SkipReport` (or, with ``strict=True``,
turns into a `DataError`): a few bad rows never sink a run, and none disappears uncounted.
"""

from __future__ import annotations

from typing import Any

from dpokit.data.fields import (
    Field,
    check_completion,
    check_same_kind,
    check_unicode,
    required,
    required_text,
    text_or_messages,
)
from dpokit.data.messages import messages_of, parse_tools
from dpokit.data.reasoning_steps import from_step_dpo
from dpokit.data.records import Conversation, DataError, PreferenceExample, SkipReport
from dpokit.data.rows import RowSkip, convert_rows, no_usable_rows_message
from dpokit.data.turns import expand_turns, has_turn_preferences

LAYOUTS = (
    "prompt_chosen_rejected",
    "implicit_prompt",
    "sharegpt",
    "openai",
    "alpaca",
    "stack_exchange",
    "every_turn",
    "step_dpo",
)
STANDARD_COLUMNS = ("prompt", "chosen", "rejected")
EXPECTED_COLUMNS = (
    "prompt+chosen+rejected, chosen+rejected, conversations+chosen+rejected (sharegpt), "
    "input+preferred_output+non_preferred_output (openai), instruction+chosen+rejected (alpaca), "
    "question+response_j+response_k (stack_exchange), messages with chosen/rejected assistant turns (every_turn), "
    "prompt+initial_reason_steps+chosen+rejected (step_dpo)"
)
HH_ASSISTANT_TURN = "\n\nAssistant:"
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def detect_layout(row: dict) -> str | None:
    """Name the layout of `row` from its distinctive columns, or None if none fits.

    Detection looks only at which columns exist (plus the one TRL special case
    below), so a row missing, say, `rejected` is still recognised and then
    skipped with a precise reason instead of an "unknown layout".
    """
    if "messages" in row and has_turn_preferences(row["messages"]):
        return "every_turn"
    if "preferred_output" in row or "non_preferred_output" in row:
        return "openai"
    if "initial_reason_steps" in row:
        return "step_dpo"
    if "conversations" in row:
        return "sharegpt"
    if "response_j" in row or "response_k" in row:
        return "stack_exchange"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row:
        # Some datasets (e.g. ultrafeedback_binarized) keep a text `prompt` column although chosen and
        # rejected are whole conversations that already contain it; TRL then extracts the prompt.
        chosen = row.get("chosen")
        if isinstance(row["prompt"], str) and _is_full_conversation(chosen):
            return "implicit_prompt"
        return "prompt_chosen_rejected"
    if "chosen" in row or "rejected" in row:
        return "implicit_prompt"
    return None


def _is_full_conversation(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and isinstance(value[0], dict)
        and value[0].get("role", value[0].get("from")) not in ("assistant", "gpt")
    )


def to_example(row: dict, layout: str, columns: dict[str, str] | None = None, where: str = "") -> PreferenceExample:
    """Convert one row; `columns` (standard name -> row column) overrides `layout` and detection."""
    if columns:
        row = rename_columns(row, columns)
        layout = detect_layout(row) or "prompt_chosen_rejected"
    if layout == "every_turn":
        raise RowSkip("an every_turn row holds several pairs, and this reader takes one pair per row", "messages")
    converter = _CONVERTERS.get(layout)
    if converter is None:
        raise DataError(f"unknown layout {layout!r}; expected 'auto' or one of {', '.join(LAYOUTS)}")
    prompt, chosen, rejected = converter(row)
    for field, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        check_unicode(value, field)
    return PreferenceExample(
        prompt=prompt, chosen=chosen, rejected=rejected, source=where, tools=row_tools(row, chosen)
    )


def to_examples(row: dict, layout: str, where: str = "") -> list[PreferenceExample]:
    """One row -> its pairs: one for every layout but `every_turn`, which gives one per judged turn (data/turns.py)."""
    if layout != "every_turn":
        return [to_example(row, layout, None, where)]
    pairs = expand_turns(row)
    tools = row_tools(row, pairs[0][1] if pairs else [])
    for prompt, chosen, rejected in pairs:
        for field, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            check_unicode(value, field)
    return [
        PreferenceExample(prompt, chosen, rejected, where, tools, turn)
        for turn, (prompt, chosen, rejected) in enumerate(pairs, 1)
    ]


def row_tools(row: dict, completion: Field) -> list[dict] | None:
    """The row's `tools` column (see `messages.parse_tools`); only chat-template rows can carry tools."""
    value = row.get("tools")
    if value is None and isinstance(row.get("input"), dict):  # OpenAI preference fine-tuning: input.tools
        value = row["input"].get("tools")
    tools = parse_tools(value)
    if tools is not None and isinstance(completion, str):
        raise RowSkip(
            "tools need conversational rows (message lists rendered by the chat template), not plain text", "tools"
        )
    return tools


def rename_columns(row: dict, columns: dict[str, str]) -> dict:
    """Keep only the standard columns, read from the user's names (unmapped ones keep their name)."""
    renamed = {}
    for standard in STANDARD_COLUMNS:
        column = columns.get(standard, standard)
        if column in row:
            renamed[standard] = row[column]
        elif standard in columns:
            raise RowSkip(f"column {column!r} (mapped to {standard}) is missing", column)
    if "tools" in row:
        renamed["tools"] = row["tools"]
    return renamed


def _shared_prefix_length(first: str | list, second: str | list) -> int:
    """Length of the longest common prefix; binary search keeps comparisons in C for long transcripts."""
    low, high = 0, min(len(first), len(second))
    while low < high:
        middle = (low + high + 1) // 2
        if first[:middle] == second[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


# --- layout converters: row -> (prompt, chosen, rejected) -------------------------------------


def _from_prompt_chosen_rejected(row: dict) -> tuple[Field, Field, Field]:
    prompt = text_or_messages(row, "prompt")
    chosen = text_or_messages(row, "chosen")
    rejected = text_or_messages(row, "rejected")
    check_same_kind(prompt, chosen, rejected)
    check_completion(chosen, "chosen")
    check_completion(rejected, "rejected")
    return prompt, chosen, rejected


def _from_implicit_prompt(row: dict) -> tuple[Field, Field, Field]:
    """The prompt is the shared beginning of chosen and rejected."""
    chosen = text_or_messages(row, "chosen")
    rejected = text_or_messages(row, "rejected")
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise RowSkip("chosen and rejected mix text and message lists", "rejected")
    if isinstance(chosen, str):  # message lists are checked after the shared prompt is removed
        check_completion(chosen, "chosen")
        check_completion(rejected, "rejected")
    shared = _shared_prefix_length(chosen, rejected)
    if isinstance(chosen, str):
        # hh-rlhf: responses that start alike ("Sure, ...") must not lose their shared words to the
        # prompt, so the prompt ends right after the last assistant tag inside the shared text.
        last_turn = chosen.rfind(HH_ASSISTANT_TURN, 0, shared)
        if last_turn != -1:
            shared = last_turn + len(HH_ASSISTANT_TURN)
    elif shared == 0:
        raise RowSkip("chosen and rejected share no prompt messages", "prompt")
    prompt, chosen_rest, rejected_rest = chosen[:shared], chosen[shared:], rejected[shared:]
    for field, rest in (("chosen", chosen_rest), ("rejected", rejected_rest)):
        if not rest or (isinstance(rest, str) and not rest.strip()):
            raise RowSkip(f"{field} has nothing left after the prompt shared with the other response", field)
        check_completion(rest, field)
    return prompt, chosen_rest, rejected_rest


def _from_sharegpt(row: dict) -> tuple[Field, Field, Field]:
    prompt = messages_of(required(row, "conversations"), "conversations", SHAREGPT_ROLES)
    chosen = _sharegpt_response(row, "chosen")
    rejected = _sharegpt_response(row, "rejected")
    return prompt, chosen, rejected


def _sharegpt_response(row: dict, field: str) -> Conversation:
    value = required(row, field)
    if isinstance(value, str):
        value = {"from": "gpt", "value": value}
    messages = messages_of([value] if isinstance(value, dict) else value, field, SHAREGPT_ROLES)
    check_completion(messages, field)
    return messages


def _from_openai(row: dict) -> tuple[Field, Field, Field]:
    request = required(row, "input")
    if not isinstance(request, dict):
        raise RowSkip("input must be an object with a messages list", "input")
    prompt = messages_of(request.get("messages"), "input.messages")
    # OpenAI's "developer" role is its system role; chat templates only know "system".
    prompt = [{**message, "role": "system"} if message["role"] == "developer" else message for message in prompt]
    chosen = messages_of(required(row, "preferred_output"), "preferred_output")
    rejected = messages_of(required(row, "non_preferred_output"), "non_preferred_output")
    check_completion(chosen, "preferred_output")
    check_completion(rejected, "non_preferred_output")
    return prompt, chosen, rejected


def _from_alpaca(row: dict) -> tuple[Field, Field, Field]:
    instruction = required_text(row, "instruction")
    if not instruction.strip():
        raise RowSkip("instruction is empty or whitespace-only", "instruction")
    extra_input = row.get("input") or ""
    if not isinstance(extra_input, str):
        raise RowSkip(f"input must be a string, got {type(extra_input).__name__}", "input")
    chosen = required_text(row, "chosen")
    rejected = required_text(row, "rejected")
    check_completion(chosen, "chosen")
    check_completion(rejected, "rejected")
    request = instruction + ("\n\n" + extra_input if extra_input.strip() else "")
    return (
        [{"role": "user", "content": request}],
        [{"role": "assistant", "content": chosen}],
        [{"role": "assistant", "content": rejected}],
    )


def _from_stack_exchange(row: dict) -> tuple[Field, Field, Field]:
    question = required_text(row, "question")
    if not question.strip():
        raise RowSkip("question is empty or whitespace-only", "question")
    chosen = required_text(row, "response_j")
    rejected = required_text(row, "response_k")
    check_completion(chosen, "response_j")
    check_completion(rejected, "response_k")
    return question, chosen, rejected


_CONVERTERS = {
    "prompt_chosen_rejected": _from_prompt_chosen_rejected,
    "implicit_prompt": _from_implicit_prompt,
    "sharegpt": _from_sharegpt,
    "openai": _from_openai,
    "alpaca": _from_alpaca,
    "step_dpo": from_step_dpo,
    "stack_exchange": _from_stack_exchange,
}


# --- whole files ----------------------------------------------------------------------------


def load_preferences(
    path: str,
    split: str = "train",
    columns: dict[str, str] | None = None,
    layout: str = "auto",
    strict: bool = False,
) -> tuple[list[PreferenceExample], SkipReport]:
    """Read and convert every row of `path`; bad rows are skipped and counted, or raise if `strict`."""
    groups, report = load_preference_groups(path, split, columns, layout, strict)
    return [example for group in groups for example in group], report


def load_preference_groups(
    path: str,
    split: str = "train",
    columns: dict[str, str] | None = None,
    layout: str = "auto",
    strict: bool = False,
    max_rows: int | None = None,
) -> tuple[list[list[PreferenceExample]], SkipReport]:
    """The pairs of every row of `path`, one group per row (several for an every_turn row).

    The report counts rows; every_turn rows are also counted as `conversations` -> `turn_pairs`.
    """
    _check_options(columns, layout)
    columns_found: set[str] = set()

    def convert(row: dict, where: str) -> tuple[str, list[PreferenceExample]]:
        columns_found.update(map(str, row))
        row_layout, source_row = _resolve_layout(row, layout, columns)
        examples = to_examples(source_row, row_layout, where)
        if not examples:
            raise RowSkip("messages has no judged assistant turn (one with chosen and rejected)", "messages")
        return row_layout, examples

    groups, report = convert_rows(path, split, convert, strict, max_rows)
    if not groups:
        raise DataError(_all_rows_skipped_message(report, columns_found), path)
    report.count_turns(groups)
    return groups, report


def _check_options(columns: dict[str, str] | None, layout: str) -> None:
    if layout != "auto" and layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; expected 'auto' or one of {', '.join(LAYOUTS)}")
    if not columns:
        return
    unknown = [name for name in columns if name not in STANDARD_COLUMNS]
    if unknown or not all(isinstance(column, str) for column in columns.values()):
        raise DataError(f"columns must map {', '.join(STANDARD_COLUMNS)} to column names; got {columns!r}")
    if layout not in ("auto", "prompt_chosen_rejected", "implicit_prompt"):
        raise DataError(f"columns map prompt/chosen/rejected and cannot be combined with layout {layout!r}")


def _resolve_layout(row: dict, layout: str, columns: dict[str, str] | None) -> tuple[str, dict]:
    if columns:
        row = rename_columns(row, columns)
    if layout != "auto":
        return layout, row
    detected = detect_layout(row)
    if detected is None:
        found = ", ".join(sorted(map(str, row))) or "none"
        raise RowSkip(f"unrecognised layout (columns: {found}; expected columns of one of: {EXPECTED_COLUMNS})")
    return detected, row


def _all_rows_skipped_message(report: SkipReport, columns_found: set[str]) -> str:
    return (
        f"{no_usable_rows_message(report)}. "
        f"Columns found: {', '.join(sorted(columns_found)) or 'none'}. Expected layouts: {', '.join(LAYOUTS)}."
    )
