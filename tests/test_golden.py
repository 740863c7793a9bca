"""Golden values (issue 23): a fixed 4-step DPO run on the tiny model must give the stored metrics and weights.

The CI-sized version of the same-outputs gate (bench/compare_runs.py): any change that moves a metric of
metrics.jsonl or the final weights fails this test with a diff. Tolerances are relative 1e-4: the values are
the same on one machine run after run, and differ by float rounding between CPUs (AVX2 and AVX-512 sum in
different orders). The weights are summarised per tensor (sum, sum of squares, and its first and last value):
a changed weight moves them far past the tolerance.

An intended change regenerates them (and the diff of tests/golden/dpo_tiny.json goes in the commit):

    DPOKIT_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import dpokit
from dpokit.training.throughput import VOLATILE as THROUGHPUT_VOLATILE
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl

GOLDEN = Path(__file__).with_name("golden") / "dpo_tiny.json"
RTOL = 1e-4


def _run(tmp_path: Path) -> dict:
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(32, seed=11))
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {"path": str(data), "max_length": 32, "max_prompt_length": 16, "eval_fraction": 0.25},
        "loss": {"beta": 0.5},
        "optim": {"lr": 1e-2, "scheduler": "constant"},
        "out_dir": str(tmp_path / "run"),
        "train": {
            "batch_size": 4,
            "max_steps": 4,
            "logging_steps": 1,
            "eval_steps": 2,
            "progress_bar": False,
            "save_steps": 0,
            "seed": 7,
            "num_threads": 1,
        },
    }
    result = dpokit.train(cfg)
    records = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    from safetensors.torch import load_file

    weights = load_file(str(Path(result.model_dir) / "model.safetensors"))
    summary = {
        name: [float(t.double().sum()), float(t.double().pow(2).sum()), float(t.flatten()[0]), float(t.flatten()[-1])]
        for name, t in sorted(weights.items())
    }
    volatile = {
        "train_runtime",
        "train_samples_per_second",
        "train_steps_per_second",
        "epoch_seconds",
        "wall_seconds",
        *THROUGHPUT_VOLATILE,
    }
    return {"metrics": [{k: v for k, v in r.items() if k not in volatile} for r in records], "weights": summary}


def _differences(expected, got, where: str = "") -> list[str]:
    if isinstance(expected, dict) and isinstance(got, dict):
        out = [f"{where}{k}: missing" for k in expected if k not in got]
        out += [f"{where}{k}: new" for k in got if k not in expected]
        return out + [d for k in expected if k in got for d in _differences(expected[k], got[k], f"{where}{k}.")]
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return [f"{where.rstrip('.')}: {len(expected)} items, now {len(got)}"]
        return [d for i, (e, g) in enumerate(zip(expected, got)) for d in _differences(e, g, f"{where}[{i}].")]
    if isinstance(expected, float) and isinstance(got, (int, float)):
        if math.isclose(expected, got, rel_tol=RTOL, abs_tol=1e-7) or (math.isnan(expected) and math.isnan(got)):
            return []
    elif expected == got:
        return []
    return [f"{where.rstrip('.')}: {expected!r} -> {got!r}"]


@pytest.mark.slow
def test_four_dpo_steps_give_the_stored_metrics_and_weights(tmp_path):
    threads = torch.get_num_threads()
    try:
        got = _run(tmp_path)
    finally:
        torch.set_num_threads(threads)
    if os.environ.get("DPOKIT_REGENERATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"regenerated {GOLDEN}")
    expected = json.loads(GOLDEN.read_text())
    differences = _differences(expected, got)
    assert not differences, (
        "changed from tests/golden/dpo_tiny.json (regenerate only for an intended change):\n"
        + "\n".join(differences[:40])
    )


def test_the_comparison_finds_a_planted_change():
    expected = json.loads(GOLDEN.read_text())
    assert _differences(expected, json.loads(GOLDEN.read_text())) == []
    planted = json.loads(GOLDEN.read_text())
    planted["metrics"][1]["loss"] *= 1.001
    name = next(iter(planted["weights"]))
    planted["weights"][name][1] *= 1.001
    found = _differences(expected, planted)
    assert len(found) == 2 and "loss" in found[0] and name in found[1]
