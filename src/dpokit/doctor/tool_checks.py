"""Rows that offer tools to a chat template that ignores them.

A row's `tools` column reaches the model only through the chat template (`tools=`). Many
templates (older Llama 2 / Mistral ones, ChatML templates written before tool use) never read
`tools`: the prompt then carries no tool definitions, and the model is trained to call
functions it was never shown. The check renders the prompt of each tool row with and without
its tools; identical renders mean the template dropped them.
"""

from __future__ import annotations

from dpokit.data.records import PreferenceExample
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
        with_tools = tokenizer.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=True, tools=ex.tools)
        without = tokenizer.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses the row: counted by the dropped-rows check, not this one
        return False
    return with_tools == without
