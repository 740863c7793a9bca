"""Rows that offer tools, or make tool calls, through a chat template that ignores them.

A row's `tools` column reaches the model only through the chat template (`tools=`). Many
templates (older Llama 2 / Mistral ones, ChatML templates written before tool use) never read
`tools`: the prompt then carries no tool definitions, and the model is trained to call
functions it was never shown. The check renders the prompt of each tool row with and without
its tools; identical renders mean the template dropped them.

The same templates ignore an assistant message's `tool_calls`: a tool-call completion then
renders as the end-of-turn marker alone, and DPO learns that an empty reply beats the answer.
Training skips such completions (data/tokenization.py, `EmptyRender`); `completion_render_check`
fails on them.
"""

from __future__ import annotations

from dpokit.data.records import PreferenceExample, SkipReport
from dpokit.data.tokenization import END_MARKER_ONLY, TOOL_CALLS_IGNORED
from dpokit.doctor.report import CheckResult

ADVICE = (
    "The chat template renders these prompts identically with and without their `tools`, so the model never sees "
    "the function definitions it is trained to call. Use a template that renders tools (the model's own, if it "
    "was trained for tool use, e.g. Qwen2.5's or Llama 3.1's: set it on the tokenizer's chat_template), or put the "
    "tool definitions into the system message yourself and drop the tools column."
)


def tools_check(examples: list[PreferenceExample], tokenizer) -> CheckResult:
    """warn with the row of each tool row whose prompt render does not change when the tools are left out."""
    tool_rows = [ex for ex in examples if ex.tools and ex.conversational]
    if not tool_rows:
        return CheckResult("tools", "skip", "no rows with a tools column")
    dropped = [ex.source for ex in tool_rows if _ignores_tools(tokenizer, ex)]
    numbers = {"rows_with_tools": len(tool_rows), "tools_dropped": len(dropped)}
    summary = f"{len(dropped)} of {len(tool_rows)} rows with tools: the chat template drops the tools"
    if not dropped:
        return CheckResult("tools", "ok", summary, numbers=numbers)
    return CheckResult("tools", "warn", f"{summary} (first: {dropped[0]})", ADVICE, numbers, dropped[:5])


def _ignores_tools(tokenizer, ex: PreferenceExample) -> bool:
    try:
        with_tools = tokenizer.apply_chat_template(
            ex.prompt, tokenize=False, add_generation_prompt=True, tools=ex.tools
        )
        without = tokenizer.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses the row: counted by the dropped-rows check, not this one
        return False
    return with_tools == without


RENDER_ADVICE = (
    "Training skips these pairs (and stops past data.max_empty_render_fraction of them): a completion rendered as "
    "nothing teaches the model that an empty reply beats the answer. Tool calls the template ignores: use a template "
    "that renders `tool_calls` (the model's own, if it was trained for tool use, e.g. Qwen2.5's or Llama 3.1's), or "
    "write the calls into the message text. Completions with no token but the end marker: look at the rows named; "
    "the template drops their text (e.g. everything before </think>)."
)


def completion_render_check(skips: SkipReport, pairs: int) -> CheckResult:
    """fail with the rows whose chosen or rejected completion the chat template renders as nothing."""
    ignored, empty = skips.skipped[TOOL_CALLS_IGNORED], skips.skipped[END_MARKER_ONLY]
    numbers = {"pairs": pairs, "tool_calls_ignored": ignored, "end_marker_only": empty}
    summary = (
        f"{ignored + empty} of {pairs} pairs have a completion rendered as nothing: {ignored} whose tool_calls the "
        f"chat template ignores, {empty} with no token but the end-of-turn marker"
    )
    if not ignored + empty:
        return CheckResult("completion_render", "ok", summary, numbers=numbers)
    examples = skips.examples.get(TOOL_CALLS_IGNORED, []) + skips.examples.get(END_MARKER_ONLY, [])
    return CheckResult("completion_render", "fail", summary, RENDER_ADVICE, numbers, examples[:5])
