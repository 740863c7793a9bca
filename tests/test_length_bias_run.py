"""A planted length bias (chosen always longer) is flagged before training and while training."""

import json
import random

import pytest

from dpokit.demo import world


def _length_biased_pairs(path, n=1000, seed=0):
    """Same opening, random sentiment on both sides, chosen at least 8 words longer than rejected."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        opening = world.sample_opening(rng, "train")
        a = world.sample_continuation(rng, rng.choice(["positive", "negative"]))
        b = world.sample_continuation(rng, rng.choice(["positive", "negative"]))
        if len(a.split()) >= len(b.split()) + 8:
            rows.append({"prompt": opening, "chosen": a, "rejected": b})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_doctor_flags_the_planted_length_bias(tmp_path):
    from dpokit.doctor import run_doctor

    report = run_doctor(str(_length_biased_pairs(tmp_path / "biased.jsonl")))
    assert report.check("length_bias").verdict in ("warn", "fail")


@pytest.mark.slow
def test_length_detector_fires_while_training_on_the_planted_bias(tmp_path):
    from dpokit.demo.assets import demo_paths
    from dpokit.training.loop import train

    data = _length_biased_pairs(tmp_path / "biased.jsonl")
    result = train(
        {
            "model": {"name_or_path": demo_paths()["sentiment-sft"]},
            "data": {"path": str(data), "eval_fraction": 0.1, "max_length": 64, "max_prompt_length": 16},
            "loss": {"beta": 0.1},
            "optim": {"lr": 1e-3},
            "train": {
                "batch_size": 32,
                "max_steps": 100,
                "logging_steps": 10,
                "eval_steps": 20,
                "eval_generate": 32,
                "progress_bar": False,
                "save_steps": 0,
            },
            "out_dir": str(tmp_path / "run"),
        }
    )
    assert "length_drift" in result.metrics["diagnoses"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lengths = [r["eval_mean_length"] for r in records if "eval_mean_length" in r]
    assert max(lengths) > 1.5 * lengths[0]  # the sampled completions really grew
    assert any(r.get("diagnosis", {}).get("mode") == "length_drift" for r in records)
