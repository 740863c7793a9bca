"""Step-DPO rows (examples/step_dpo.jsonl): question + accepted steps as the prompt, one next step judged; it trains."""

import json
from pathlib import Path

from dpokit.data.layouts import detect_layout, load_preferences
from dpokit.data.tokenization import tokenize_pairs
from dpokit.tiny import build_tiny_llama, build_tokenizer, save_tiny
from dpokit.training.metrics import read_metrics
from tiny_assets import write_jsonl

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "step_dpo.jsonl"


def _rows() -> list[dict]:
    return [json.loads(line) for line in EXAMPLE.read_text().splitlines()]


def _tokenizer():
    return build_tokenizer([json.dumps(row) for row in _rows()], kind="bpe", vocab_size=400)


def test_the_prompt_is_the_question_and_the_accepted_steps_and_only_the_next_step_is_a_completion(tmp_path):
    row = {
        "prompt": "Ana has 3 bags of 5 pens.",
        "initial_reason_steps": ["Step 1: 3 * 5 = 15 pens.", "Step 2: 15 - 3 = 12."],
        "chosen": "Step 3: The answer is 12.",
        "rejected": "Step 3: The answer is 18.",
    }
    assert detect_layout(row) == "step_dpo"
    [example], _ = load_preferences(str(write_jsonl(tmp_path / "d.jsonl", [row])))
    assert example.prompt == "Ana has 3 bags of 5 pens.\nStep 1: 3 * 5 = 15 pens.\nStep 2: 15 - 3 = 12.\n"
    tok = _tokenizer()
    [pair], _ = tokenize_pairs([example], tok, max_length=128, max_prompt_length=64)
    ids = lambda text: tok(text)["input_ids"]  # noqa: E731
    assert pair.prompt_ids == ids(example.prompt)
    assert pair.chosen_ids == ids("Step 3: The answer is 12.<|im_end|>")
    assert pair.rejected_ids == ids("Step 3: The answer is 18.<|im_end|>")
    # a text of steps, or none yet (the first step is judged)
    first = {**row, "initial_reason_steps": ""}
    [example], _ = load_preferences(str(write_jsonl(tmp_path / "e.jsonl", [first])))
    assert example.prompt == "Ana has 3 bags of 5 pens.\n"
    _, report = load_preferences(str(write_jsonl(tmp_path / "f.jsonl", [row, {**row, "initial_reason_steps": [1, 2]}])))
    assert report.rows_skipped == 1 and "initial_reason_steps must be a text or a list" in next(iter(report.skipped))


def test_the_example_file_trains_the_margin_up(tmp_path):
    import dpokit

    tok = _tokenizer()
    model_dir = save_tiny(
        build_tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=4, seed=0), tok, tmp_path / "model"
    )
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(EXAMPLE), "max_length": 128},
        "loss": {"beta": 0.5},
        "optim": {"lr": 3e-3, "scheduler": "constant"},
        "train": {"batch_size": 24, "max_steps": 8, "logging_steps": 1, "progress_bar": False},
        "out_dir": str(tmp_path / "run"),
    }
    result = dpokit.train(cfg)
    logs = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert json.loads((result.run_dir / "data_summary.json").read_text())["train"]["layouts"] == {"step_dpo": 24}
    assert abs(logs[0]["rewards/margins"]) < 1e-3  # policy == reference at step 1
    assert logs[-1]["rewards/margins"] > 0.5 and logs[-1]["rewards/accuracies"] >= 0.9
    assert logs[-1]["loss"] < logs[0]["loss"]
