"""Unpaired preference data for KTO: single completions labelled desirable or undesirable.

Row layouts (detected per row, or forced with `data.layout`):
  prompt_completion_label  prompt + completion + label: TRL's unpaired format, text or conversational
                           (prompt messages + a list of assistant completion messages)
  messages_label           messages + label: the last message, an assistant turn, is the completion and
                           everything before it the prompt (LLaMA-Factory's kto_en_demo; also a full
                           conversation in `completion` with no `prompt`, as argilla/kto-mix-15k)
  any paired layout        read by `layouts.load_preferences`; each pair becomes one desirable example
                           (prompt, chosen) and one undesirable example (prompt, rejected)

KTO needs no pairs, but paired data is still the most common input, and splitting it loses
nothing KTO can use. The two halves of a pair stay together through the eval split (they share
a prompt, so one half in train and one in eval would leak it).

`label` must be a bool, 0/1, or the strings "true"/"false"/"0"/"1" (CSV has no booleans); anything
else skips the row with its reason in the SkipReport, like every other bad row: never silently.
Tokenisation and truncation are those of the paired data (`tokenization.render_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from dpokit.data.fields import check_completion, check_unicode, text_or_messages
from dpokit.data.layouts import LAYOUTS, load_preference_groups, row_tools
from dpokit.data.loading import read_rows
from dpokit.data.messages import messages_of
from dpokit.data.prepare import PreparedData, load_train_and_eval, refuse_empty_renders, split_summary
from dpokit.data.records import Conversation, DataError, PreferenceExample, SkipReport, Text
from dpokit.data.rows import RowSkip, cap_rows, convert_rows, no_usable_rows_message
from dpokit.data.token_health import check_completion_health
from dpokit.data.tokenization import EmptyRender, TokenizationStats, render_ids
from dpokit.data.turns import has_turn_preferences

UNPAIRED_LAYOUTS = ("prompt_completion_label", "messages_label")
UNPAIRED_COLUMNS = ("prompt", "completion", "label", "messages")
_LABEL_STRINGS = {"true": True, "false": False, "1": True, "0": False}


@dataclass
class UnpairedExample:
    prompt: Union[Text, Conversation]
    completion: Union[Text, Conversation]
    label: bool  # True = desirable
    source: str = ""  # "file:row"
    tools: list[dict] | None = None  # function schemas for the chat template (the `tools` column)
    turn: int = 0  # every_turn rows: the judged turn its pair came from (a row's examples share its source)

    @property
    def conversational(self) -> bool:
        return isinstance(self.completion, list)


@dataclass
class TokenizedCompletion:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    # data.max_length - len(prompt_ids): the completion tokens this prompt has room for. The KL
    # baseline pairs this prompt with another example's completion, which is cut to this budget so
    # mismatched sequences obey data.max_length too.
    completion_budget: int
    source: str = ""
    turn: int = field(
        default=0, repr=False, compare=False
    )  # that of its UnpairedExample; not in the resume fingerprint


# --- one row -------------------------------------------------------------------------------


def parse_label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABEL_STRINGS:
        return _LABEL_STRINGS[value.strip().lower()]
    if value is None:
        raise RowSkip("label is missing", "label")
    raise RowSkip(f"label must be a bool (true/false) or 0/1, got {value!r}", "label")


def _is_full_conversation(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and isinstance(value[0], dict) and value[0].get("role") != "assistant"
    )


def detect_unpaired_layout(row: dict) -> str | None:
    """Name the unpaired layout of `row` from its columns, or None if it has none of them."""
    if "messages" in row and not has_turn_preferences(row["messages"]):  # every_turn rows are pairs
        return "messages_label"
    if "completion" in row and "prompt" not in row and _is_full_conversation(row["completion"]):
        return "messages_label"  # argilla/kto-mix-15k: the whole conversation sits in `completion`
    if "completion" in row or "label" in row:
        return "prompt_completion_label"
    return None


def from_prompt_completion(row: dict) -> tuple:
    prompt = text_or_messages(row, "prompt")
    completion = text_or_messages(row, "completion")
    if isinstance(prompt, list) != isinstance(completion, list):
        raise RowSkip("prompt and completion mix text and message lists", "completion")
    check_completion(completion, "completion")
    return prompt, completion


def from_messages(row: dict) -> tuple:
    field = "messages" if "messages" in row else "completion"
    messages = messages_of(row.get(field), field)
    if messages[-1]["role"] != "assistant":
        raise RowSkip(f"{field} must end with the assistant message being judged", field)
    if len(messages) < 2:
        raise RowSkip(f"{field} has no prompt before the judged assistant message", field)
    completion = messages[-1:]
    check_completion(completion, field)
    return messages[:-1], completion


_CONVERTERS = {"prompt_completion_label": from_prompt_completion, "messages_label": from_messages}


def to_unpaired(row: dict, layout: str, where: str = "") -> UnpairedExample:
    """One row -> one example; raises RowSkip with the reason and field when the row cannot be used."""
    prompt, completion = _CONVERTERS[layout](row)
    check_unicode(prompt, "prompt")
    check_unicode(completion, "completion")
    return UnpairedExample(prompt, completion, parse_label(row.get("label")), where, row_tools(row, completion))


def rename_columns(row: dict, columns: dict[str, str]) -> dict:
    """`row` with the standard unpaired (and SFT) columns read from the user's names in `columns`."""
    if not columns:
        return row
    renamed = {k: v for k, v in row.items() if k not in UNPAIRED_COLUMNS}  # keeps `tools`
    for standard in UNPAIRED_COLUMNS:
        column = columns.get(standard, standard)
        if column in row:
            renamed[standard] = row[column]
    return renamed


# --- whole files ---------------------------------------------------------------------------


def _is_paired_source(path: str, split: str, columns: dict[str, str], layout: str) -> bool:
    """Paired or unpaired, decided once per file: forced by data.layout / data.columns, else from row 1."""
    if layout in LAYOUTS or {"chosen", "rejected"} & set(columns):
        return True
    if layout in UNPAIRED_LAYOUTS or {"completion", "label", "messages"} & set(columns):
        return False
    if layout != "auto":
        expected = ", ".join(("auto",) + UNPAIRED_LAYOUTS + LAYOUTS)
        raise DataError(f"unknown layout {layout!r}; expected one of {expected}", path)
    for _, row in read_rows(path, split):
        return detect_unpaired_layout(rename_columns(row, columns)) is None
    return False


def load_unpaired(
    path: str,
    split: str = "train",
    columns: dict[str, str] | None = None,
    layout: str = "auto",
    strict: bool = False,
    max_rows: int | None = None,
) -> tuple[list[list[UnpairedExample]], SkipReport]:
    """Read every row of `path` as unpaired examples, grouped by source row (a paired row gives two).

    Bad rows are skipped and counted in the SkipReport (or raise DataError if `strict`).
    """
    columns = dict(columns or {})
    if _is_paired_source(path, split, columns, layout):
        rows, report = load_preference_groups(path, split, columns or None, layout, strict, max_rows)
        report.layouts = type(report.layouts)({f"{name} (pairs split)": n for name, n in report.layouts.items()})
        return [[half for pair in row for half in _split_pair(pair)] for row in rows], report
    unknown = set(columns) - set(UNPAIRED_COLUMNS)
    if unknown:
        raise DataError(
            f"columns for unpaired data map {', '.join(UNPAIRED_COLUMNS)} to column names; got {columns!r}", path
        )

    def convert(row: dict, where: str) -> tuple[str, list[UnpairedExample]]:
        row = rename_columns(row, columns)
        row_layout = layout if layout in UNPAIRED_LAYOUTS else detect_unpaired_layout(row)
        if row_layout is None:
            found = ", ".join(sorted(map(str, row))) or "none"
            raise RowSkip(
                f"unrecognised unpaired layout (columns: {found}; expected prompt+completion+label or messages+label)"
            )
        return row_layout, [to_unpaired(row, row_layout, where)]

    groups, report = convert_rows(path, split, convert, strict, max_rows)
    if not groups:
        raise DataError(no_usable_rows_message(report), path)
    return groups, report


def _split_pair(pair: PreferenceExample) -> list[UnpairedExample]:
    return [
        UnpairedExample(pair.prompt, pair.chosen, True, pair.source, pair.tools, pair.turn),
        UnpairedExample(pair.prompt, pair.rejected, False, pair.source, pair.tools, pair.turn),
    ]


# --- tokens --------------------------------------------------------------------------------


def tokenize_completion(example: UnpairedExample, tokenizer) -> tuple[list[int], list[int]]:
    """Untruncated (prompt ids, completion ids), exactly as the paired data renders a completion."""
    # render_ids holds the one definition of the prompt/completion boundary (chat template or
    # prompt + completion + EOS, split where the token ids diverge); reuse it with the completion twice.
    pair = PreferenceExample(example.prompt, example.completion, example.completion, example.source, example.tools)
    prompt, completion, _ = render_ids(pair, tokenizer)
    return prompt, completion


def tokenize_groups(
    groups: list[list[UnpairedExample]],
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    report: SkipReport | None = None,
) -> tuple[list[TokenizedCompletion], TokenizationStats]:
    """Tokenise and truncate like `tokenize_pairs`: prompt from the left, completion from the right.

    Stats reuse the paired names so `format_summary` prints them: `chosen` counts desirable
    completions, `rejected` undesirable ones. An empty completion is skipped and counted; a row
    counts as used while at least one of its examples survives.
    """
    stats = TokenizationStats()
    out: list[TokenizedCompletion] = []
    for group in groups:
        kept = 0
        for ex in group:
            try:
                prompt, completion = tokenize_completion(ex, tokenizer)
            except EmptyRender as empty:
                if report is None:
                    raise
                report.skip(empty.reason, f"{ex.source} (completion)")
                continue
            if len(prompt) > max_prompt_length:
                prompt = prompt[len(prompt) - max_prompt_length :]
                stats.prompts_truncated += 1
            room = max_length - len(prompt)
            side = "chosen" if ex.label else "rejected"
            if len(completion) > room:
                completion = completion[:room]
                setattr(stats, f"{side}_truncated", getattr(stats, f"{side}_truncated") + 1)
            if not completion:
                if report is not None:
                    report.skip("empty completion after tokenisation/truncation", f"{ex.source} (completion)")
                continue
            stats.lengths["prompt"].append(len(prompt))
            stats.lengths[side].append(len(completion))
            out.append(TokenizedCompletion(prompt, completion, ex.label, room, ex.source, ex.turn))
            kept += 1
        if not kept and report is not None:
            report.rows_used -= 1
    return out, stats


# --- config -> PreparedData ----------------------------------------------------------------


def _load(path: str, split: str, cfg):
    groups, report = load_unpaired(
        path, split, cfg.data.columns or None, cfg.data.layout, cfg.data.strict, cfg.data.max_rows
    )
    return cap_rows(groups, report, path, cfg.data.max_rows), report


def prepare_unpaired(cfg, tokenizer):
    """config.data -> PreparedData of TokenizedCompletion, with the paired data's summary shape.

    The eval split holds out whole prompts, seeded like `prepare_data`, so a split pair stays on one
    side. Degenerate tokenization raises DataError before anything is trained (`token_health`).
    """
    train_groups, train_report, eval_groups, eval_report = load_train_and_eval(cfg, _load)
    train_report.count_turns(train_groups)  # every_turn rows, after the eval split
    eval_report.count_turns(eval_groups)
    summary, splits = {}, []
    for name, groups, report in (("train", train_groups, train_report), ("eval", eval_groups, eval_report)):
        examples, stats = tokenize_groups(groups, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length, report)
        refuse_empty_renders(report, sum(map(len, groups)), cfg, unit="completions")
        summary[name] = split_summary(report, stats, len(examples))  # "pairs" here counts examples
        summary[name]["labels"] = {
            "desirable": sum(e.label for e in examples),
            "undesirable": sum(not e.label for e in examples),
        }
        splits.append(examples)
    summary["train"]["token_health"] = check_completion_health(
        train_groups, splits[0], tokenizer, cfg.data.path, cfg.data.max_unknown_token_rate
    )
    return PreparedData(splits[0], splits[1], summary)
