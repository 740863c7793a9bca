"""Completions the chat template renders as nothing are counted skips, never trained on (issue 20).

The reported case: a template that ignores `tool_calls` (plain ChatML) turned every tool-call completion
into just the end marker "<|im_end|>\\n", and DPO learned that an empty reply beats a text answer. Each
completion is rendered with and without its tool calls; the same render is a skip naming the cause. More
generally, a completion that renders like an empty assistant reply is a skip too. Past
data.max_empty_render_fraction of the pairs, training stops (exit 2) and the doctor fails.
"""

import yaml

from dpokit.cli import main as cli_main
from dpokit.config import load_config
from dpokit.data.layouts import load_preferences
from dpokit.data.prepare import prepare_data
from dpokit.data.records import DataError
from dpokit.data.tokenization import END_MARKER_ONLY, TOOL_CALLS_IGNORED, tokenize_pairs
from dpokit.data.unpaired import load_unpaired, tokenize_groups
from dpokit.doctor import run_doctor
from dpokit.tiny import CHATML_TEMPLATE, TOOLS_CHATML_TEMPLATE, build_tiny_llama
from test_tool_rows import PROMPT, call, ids, tool_row, tool_tokenizer
from tiny_assets import write_jsonl

IGNORES_CALLS = CHATML_TEMPLATE  # renders message['content'] only: tool_calls vanish
TEXT_ROW = {
    "prompt": PROMPT,
    "chosen": [{"role": "assistant", "content": "Sunny."}],
    "rejected": [{"role": "assistant", "content": "sunny"}],
}
# A template that keeps only what follows </think> in an assistant turn (as reasoning templates do for history).
DROPS_THINKING = CHATML_TEMPLATE.replace(
    "message['content']",
    "(message['content'].split('</think>')[-1] if message['role'] == 'assistant' else message['content'])",
)


def _pairs(tmp_path, rows, template=TOOLS_CHATML_TEMPLATE):
    examples, report = load_preferences(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    pairs, _ = tokenize_pairs(examples, tool_tokenizer(template), max_length=512, max_prompt_length=256, report=report)
    return pairs, report


def test_tool_calls_the_template_ignores_are_a_counted_skip_naming_the_cause(tmp_path):
    with_text = tool_row(chosen=[{**call("get_weather", {"city": "Paris"}), "content": "Let me look."}])
    pairs, report = _pairs(tmp_path, [tool_row(), with_text, TEXT_ROW], IGNORES_CALLS)
    assert len(pairs) == 1 and pairs[0].chosen_ids == ids("Sunny.<|im_end|>\n")  # only the text row is trained on
    assert report.skipped == {TOOL_CALLS_IGNORED: 2} and report.rows_used == 1
    assert "tool_calls" in TOOL_CALLS_IGNORED and report.examples[TOOL_CALLS_IGNORED][0].endswith(":1 (chosen)")


def test_a_template_that_renders_tool_calls_keeps_the_rows(tmp_path):
    pairs, report = _pairs(tmp_path, [tool_row(), TEXT_ROW])
    assert len(pairs) == 2 and not report.skipped


def test_a_completion_rendered_as_only_the_end_marker_is_a_counted_skip(tmp_path):
    row = {**TEXT_ROW, "rejected": [{"role": "assistant", "content": "<think>it is sunny</think>"}]}
    pairs, report = _pairs(tmp_path, [row, TEXT_ROW], DROPS_THINKING)
    assert len(pairs) == 1 and report.skipped == {END_MARKER_ONLY: 1}
    assert report.examples[END_MARKER_ONLY] == [f"{tmp_path / 'd.jsonl'}:1 (rejected)"]


def test_kto_and_sft_completions_are_checked_alike(tmp_path):
    rows = [
        {"prompt": PROMPT, "completion": [call("get_weather", {"city": "Paris"})], "label": True},
        {"prompt": PROMPT, "completion": [{"role": "assistant", "content": "Sunny."}], "label": False},
    ]
    groups, report = load_unpaired(str(write_jsonl(tmp_path / "kto.jsonl", rows)))
    examples, _ = tokenize_groups(groups, tool_tokenizer(IGNORES_CALLS), 512, 256, report)
    assert (
        [e.label for e in examples] == [False] and report.skipped == {TOOL_CALLS_IGNORED: 1} and report.rows_used == 1
    )


def test_preparing_stops_past_data_max_empty_render_fraction(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [tool_row()] + [TEXT_ROW] * 3)  # 1 of 4 pairs
    cfg = load_config({"data": {"path": str(path), "max_length": 512, "max_empty_render_fraction": 0.25}})
    assert len(prepare_data(cfg, tool_tokenizer(IGNORES_CALLS)).train) == 3  # at the limit: skipped and counted
    cfg = load_config({"data": {"path": str(path), "max_length": 512, "max_empty_render_fraction": 0.2}})
    try:
        prepare_data(cfg, tool_tokenizer(IGNORES_CALLS))
    except DataError as error:
        message = str(error)
    else:
        raise AssertionError("prepare_data trained on 1 of 4 pairs whose tool calls render as nothing")
    assert "1 of 4 pairs" in message and "data.max_empty_render_fraction=0.2" in message and "tool_calls" in message


def test_train_exits_2_with_one_line_when_the_template_ignores_tool_calls(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tokenizer = tool_tokenizer(IGNORES_CALLS)
    build_tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "d.jsonl", [tool_row()] * 2 + [TEXT_ROW] * 2)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(model_dir)},
                "out_dir": str(tmp_path / "run"),
                "data": {"path": str(data), "max_length": 256},
                "train": {"max_steps": 1, "batch_size": 2, "progress_bar": False},
            }
        )
    )
    capsys.readouterr()
    assert cli_main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpokit: error:") and "2 of 4 pairs" in err[0], err


def test_the_doctor_fails_on_completions_rendered_as_nothing(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [tool_row(), TEXT_ROW])
    bad = run_doctor(str(path), tokenizer=tool_tokenizer(IGNORES_CALLS), sample_size=0).check("completion_render")
    assert bad.verdict == "fail" and bad.examples == [f"{path}:1 (chosen)"] and "tool_calls" in bad.summary
    assert bad.numbers["tool_calls_ignored"] == 1 and "template" in bad.advice
    good = run_doctor(str(path), tokenizer=tool_tokenizer(), sample_size=0).check("completion_render")
    assert good.verdict == "ok"
