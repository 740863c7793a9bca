"""Prompts for the online verbs: read from data files, identified in samples files, rendered for a model.

A prompt is text, or a list of chat messages. `load_prompts` finds them in any file `data.path`
accepts: a `prompt` column (text or messages), `messages` minus the last assistant turn, or the
prompt of any preference layout. `render_prompt` gives the text the model continues: the prompt
itself, or the tokenizer's chat template with the generation prompt.

Rows with a `tools` column are skipped and counted: the online verbs do not pass tool schemas to the
chat template yet, and a prompt sampled without the tools its conversation was written for would
give samples and pairs that silently mean something else.
"""

from __future__ import annotations

import json
from typing import Union

from dpokit.data.layouts import RowSkip, detect_layout, to_example
from dpokit.data.loading import read_rows
from dpokit.data.messages import parse_tools
from dpokit.data.records import DataError

Prompt = Union[str, list]  # text, or a list of chat messages


def prompt_key(prompt: Prompt) -> str:
    """The identity of a prompt in a samples file: the text itself, or its messages as canonical JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def render_prompt(prompt: Prompt, tokenizer) -> str:
    """The text the model continues: the prompt itself, or the chat template with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("conversational prompts need a tokenizer with a chat template, and this one has none")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _prompt_of_row(row: dict, column: str) -> Prompt | None:
    if column in row and row[column] not in (None, "", []):
        value = row[column]
    elif "messages" in row and isinstance(row["messages"], list) and row["messages"]:
        value = row["messages"]
        if isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
            value = value[:-1]  # a finished conversation: the prompt is what comes before the last reply
    else:
        layout = detect_layout(row)
        if layout is None:
            return None
        try:
            value = to_example(row, layout).prompt
        except RowSkip:
            return None
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(m, dict) for m in value)):
        return value
    return None


def _offers_tools(row: dict) -> bool:
    """The row offers tools as `dpokit train` reads them (a `tools` column, or OpenAI rows' input.tools; "[]" is none).
    A tools value that cannot be read counts as offering tools: skipped, not sampled as if it had none."""
    nested = row.get("input") if isinstance(row.get("input"), dict) else {}
    for value in (row.get("tools"), nested.get("tools")):
        try:
            if parse_tools(value) is not None:
                return True
        except RowSkip:
            return True
    return False


def load_prompts(
    path: str, split: str = "train", column: str = "prompt", max_prompts: int | None = None
) -> tuple[list[Prompt], dict]:
    """Distinct prompts of a data file, in order: a `column` (text or messages), `messages` minus the
    last assistant turn, or the prompt of any preference layout. -> (prompts, counts)."""
    prompts: list[Prompt] = []
    seen: set[str] = set()
    counts = {"rows_read": 0, "prompts": 0, "duplicates": 0, "rows_without_prompt": 0, "rows_with_tools": 0}
    for _, row in read_rows(path, split):
        counts["rows_read"] += 1
        if _offers_tools(row):
            counts["rows_with_tools"] += 1
            continue
        prompt = _prompt_of_row(row, column)
        if prompt is None:
            counts["rows_without_prompt"] += 1
            continue
        key = prompt_key(prompt)
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        prompts.append(prompt)
        if max_prompts is not None and len(prompts) >= max_prompts:
            break
    counts["prompts"] = len(prompts)
    if not prompts:
        if counts["rows_with_tools"]:
            raise DataError(
                f"no prompts without tools: all {counts['rows_with_tools']} rows with a prompt have a `tools` column, "
                "and the online verbs (sample, eval, pipeline) do not pass tools to the chat template yet",
                path,
            )
        raise DataError(f"no prompts found (looked for a {column!r} column, `messages`, or a preference layout)", path)
    return prompts, counts


def describe_counts(counts: dict) -> str:
    """One line of what load_prompts read and skipped, e.g. '5 prompts (1 duplicates, 1 rows without a prompt)'."""
    parts = [f"{counts['duplicates']} duplicates", f"{counts['rows_without_prompt']} rows without a prompt"]
    if counts.get("rows_with_tools"):
        parts.append(f"{counts['rows_with_tools']} rows with tools skipped (not passed to the chat template yet)")
    return f"{counts['prompts']} prompts ({', '.join(parts)})"
