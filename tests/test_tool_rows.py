"""Tool-calling rows: the `tools` column and tool_calls / tool messages reach the chat template, exactly.

The tokenizer is a tiny byte-level BPE with `TOOLS_CHATML_TEMPLATE` (Qwen2.5-style: tools as JSON lines
in the system turn, tool calls as <tool_call>{json}</tool_call>). Expected ids are the tokenizer run on
the hand-written render, so every tool definition and call is checked token for token.
"""

import functools
import json

import pytest

from dpokit.data.collate import collate_pairs
from dpokit.data.layouts import load_preferences
from dpokit.data.sft import load_sft
from dpokit.data.tokenization import tokenize_pairs
from dpokit.data.unpaired import load_unpaired, tokenize_completion
from dpokit.doctor import run_doctor
from dpokit.logprobs import IGNORE_INDEX
from dpokit.tiny import CHATML_TEMPLATE, TOOLS_CHATML_TEMPLATE, build_tokenizer
from tiny_assets import write_jsonl

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]


def call(name: str, arguments) -> dict:
    return {
        "role": "assistant",
        "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}],
    }


CHOSEN = [call("get_weather", {"city": "Paris"})]
REJECTED = [call("get_time", "{}")]  # OpenAI's wire format: arguments as a JSON string

TOOLS_BLOCK = (
    "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions.\n<tools>\n"
    + json.dumps(WEATHER)
    + "\n"
    + json.dumps(TIME)
    + "\n</tools><|im_end|>\n"
)
PROMPT_TEXT = TOOLS_BLOCK + "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
CHOSEN_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
REJECTED_TEXT = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n'


@functools.lru_cache(maxsize=None)
def tool_tokenizer(template: str = TOOLS_CHATML_TEMPLATE):
    corpus = [PROMPT_TEXT + CHOSEN_TEXT + REJECTED_TEXT, "sunny 21C Sunny in Paris. tool_response"]
    return build_tokenizer(corpus, kind="bpe", vocab_size=400, chat_template=template)


def ids(text: str) -> list[int]:
    return tool_tokenizer()(text, add_special_tokens=False)["input_ids"]


def tool_row(**extra) -> dict:
    return {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED, "tools": [WEATHER, TIME], **extra}


def test_tools_render_in_the_prompt_and_tool_calls_are_the_completions(tmp_path):
    examples, _ = load_preferences(str(write_jsonl(tmp_path / "d.jsonl", [tool_row()])))
    [pair], _ = tokenize_pairs(examples, tool_tokenizer(), max_length=512, max_prompt_length=256)
    assert pair.prompt_ids == ids(PROMPT_TEXT)
    assert pair.chosen_ids == ids(CHOSEN_TEXT)
    assert pair.rejected_ids == ids(REJECTED_TEXT)
    assert pair.prompt_ids + pair.chosen_ids == ids(PROMPT_TEXT + CHOSEN_TEXT)  # the boundary is exact
    batch = collate_pairs([pair], pad_token_id=tool_tokenizer().pad_token_id)
    n = len(pair.prompt_ids)
    assert batch["labels"][0, :n].tolist() == [IGNORE_INDEX] * n  # tool definitions are never in the loss
    assert batch["labels"][0, n : n + len(pair.chosen_ids)].tolist() == pair.chosen_ids
    assert batch["labels"][1, n : n + len(pair.rejected_ids)].tolist() == pair.rejected_ids


@pytest.mark.parametrize("tools", [json.dumps([WEATHER, TIME]), [WEATHER, TIME]])
def test_tools_as_json_text_read_like_a_list(tmp_path, tools):
    examples, _ = load_preferences(str(write_jsonl(tmp_path / "d.jsonl", [tool_row(tools=tools)])))
    assert examples[0].tools == [WEATHER, TIME]
    one, _ = load_preferences(str(write_jsonl(tmp_path / "one.jsonl", [tool_row(tools=json.dumps(WEATHER))])))
    assert one[0].tools == [WEATHER]


def test_tool_results_in_the_prompt_and_a_final_answer(tmp_path):
    prompt = PROMPT + CHOSEN + [{"role": "tool", "content": "sunny 21C", "tool_call_id": "call_1"}]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Sunny in Paris."}],
        "rejected": [{"role": "assistant", "content": "sunny"}],
        "tools": [WEATHER, TIME],
    }
    examples, _ = load_preferences(str(write_jsonl(tmp_path / "d.jsonl", [row])))
    [pair], _ = tokenize_pairs(examples, tool_tokenizer(), max_length=512, max_prompt_length=256)
    expected_prompt = (
        PROMPT_TEXT + CHOSEN_TEXT + "<|im_start|>user\n<tool_response>\nsunny 21C\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert pair.prompt_ids == ids(expected_prompt)
    assert pair.chosen_ids == ids("Sunny in Paris.<|im_end|>\n")


def test_openai_rows_carry_input_tools(tmp_path):
    row = {
        "input": {"messages": PROMPT, "tools": [WEATHER, TIME]},
        "preferred_output": CHOSEN,
        "non_preferred_output": REJECTED,
    }
    examples, report = load_preferences(str(write_jsonl(tmp_path / "d.jsonl", [row])))
    assert report.layouts == {"openai": 1} and examples[0].tools == [WEATHER, TIME]


def test_bad_tools_and_tool_calls_are_counted_skips_naming_the_field(tmp_path):
    rows = [
        tool_row(),
        tool_row(tools="{not json"),
        {"prompt": "hi", "chosen": " a", "rejected": " b", "tools": [WEATHER]},
        tool_row(chosen=[call("get_weather", "{city: Paris")]),
    ]
    _, report = load_preferences(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert report.rows_used == 1 and report.rows_skipped == 3
    reasons = " | ".join(report.skipped)
    assert "tools is a string that is not JSON" in reasons
    assert "tools need conversational rows" in reasons
    assert "tool call arguments that are not valid JSON" in reasons


def test_kto_and_sft_rows_take_the_tools_column(tmp_path):
    kto = {"prompt": PROMPT, "completion": CHOSEN, "label": True, "tools": [WEATHER, TIME]}
    [[example]], _ = load_unpaired(str(write_jsonl(tmp_path / "kto.jsonl", [kto])))
    assert tokenize_completion(example, tool_tokenizer()) == (ids(PROMPT_TEXT), ids(CHOSEN_TEXT))
    sft = {"messages": PROMPT + CHOSEN, "tools": json.dumps([WEATHER, TIME])}
    [example], _ = load_sft(str(write_jsonl(tmp_path / "sft.jsonl", [sft])))
    assert tokenize_completion(example, tool_tokenizer()) == (ids(PROMPT_TEXT), ids(CHOSEN_TEXT))
    # paired rows read for KTO keep their tools on both halves
    [halves], _ = load_unpaired(str(write_jsonl(tmp_path / "pairs.jsonl", [tool_row()])))
    assert [h.tools for h in halves] == [[WEATHER, TIME]] * 2


def test_doctor_warns_with_the_row_when_the_template_drops_the_tools(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            tool_row(),
            {
                "prompt": PROMPT,
                "chosen": [{"role": "assistant", "content": "Sunny."}],
                "rejected": [{"role": "assistant", "content": "sunny"}],
            },
        ],
    )
    plain = run_doctor(str(path), tokenizer=tool_tokenizer(CHATML_TEMPLATE), sample_size=0).check("tools")
    assert plain.verdict == "warn" and plain.examples == [f"{path}:1"]
    assert plain.numbers == {"rows_with_tools": 1, "tools_dropped": 1} and "template" in plain.advice
    good = run_doctor(str(path), tokenizer=tool_tokenizer(), sample_size=0).check("tools")
    assert good.verdict == "ok" and good.numbers == {"rows_with_tools": 1, "tools_dropped": 0}


def test_the_row_examples_in_docs_data_md_load_as_documented(tmp_path):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    layouts = []
    for i, body in enumerate(re.findall(r"^```json\n(.*?)^```", text, flags=re.S | re.M)):
        if '"images"' in body:
            continue  # read with data.vision and a processor: tests/test_vlm_rows.py
        examples, report = load_preferences(str(write_jsonl(tmp_path / f"{i}.jsonl", [json.loads(body)])))
        layouts.append((*report.layouts, len(examples), examples[0].tools is not None))
    assert ("prompt_chosen_rejected", 1, True) in layouts  # the tools example
    assert ("every_turn", 2, False) in layouts and ("step_dpo", 1, False) in layouts
