"""Numerical faults: a NaN/Inf loss or gradient skips the update, is counted, and stops the run past a limit.

Faults are injected by wrapping the paired task's forward: a NaN loss on chosen steps, or a
finite loss whose gradient is NaN. Skipped steps never enter the metric averages; past
`train.max_skipped_steps` the run stops with a checkpoint of the last finite weights, the
detectors' non_finite diagnosis, and a message naming the step and the likely cause.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpokit
import dpokit.training.loop
from dpokit.training.checkpoint import list_checkpoints
from dpokit.config import load_config
from dpokit.training.metrics import read_metrics
from dpokit.steps.paired import forward_pairs
from dpokit.steps import PairedStep
from dpokit.training.loop import likely_cause
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


def inject(monkeypatch, bad_steps: set[int], kind: str = "loss") -> None:
    """Corrupt every micro-batch of the given optimizer steps (grad_accum 1: one forward per step)."""
    calls = []

    def forward(policy, reference, batch, ctx):
        out, metrics = forward_pairs(policy, reference, batch, ctx)
        if not torch.is_grad_enabled():  # evaluation
            return out, metrics
        calls.append(1)
        if len(calls) in bad_steps:
            losses = out.losses * math.nan if kind == "loss" else _NanGradient.apply(out.losses)
            out = dataclasses.replace(out, losses=losses)
            metrics = {**metrics, "loss": losses.detach()}
        return out, metrics

    class FaultyStep(PairedStep):
        def forward(self, *args):
            return forward(*args)

    monkeypatch.setattr(dpokit.training.loop, "step_for", lambda cfg: FaultyStep())


def _config(tmp_path: Path, **train) -> dict:
    data = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(32, seed=1))
    return {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {"path": str(data), "max_length": 32, "max_prompt_length": 16},
        "optim": {"lr": 3e-3, "scheduler": "constant"},
        "train": {"batch_size": 8, "max_steps": 8, "logging_steps": 1, "save_steps": 0, "progress_bar": False, **train},
        "out_dir": str(tmp_path / "run"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_non_finite_step_is_skipped_counted_and_kept_out_of_the_averages(tmp_path, monkeypatch, kind):
    inject(monkeypatch, {3, 5}, kind)
    result = dpokit.train(_config(tmp_path, logging_steps=2))
    assert result.stop_reason is None and (result.model_dir / "model.safetensors").exists()
    records = read_metrics(result.run_dir / "metrics.jsonl")
    skips = [r for r in records if "skipped_step" in r]
    assert [r["step"] for r in skips] == [3, 5]
    assert skips[0]["skipped_step"]["reason"] == f"non-finite {kind}"
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    assert [r["skipped_steps"] for r in train] == [0, 1, 2, 2]
    for record in train:  # steps 3 and 5 are out of the averages of the records at 4 and 6: all finite
        assert all(math.isfinite(v) for v in record.values() if isinstance(v, float))
    assert "non_finite" not in result.metrics["diagnoses"]
    weights = load_file(str(result.model_dir / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_past_the_limit_the_run_stops_with_a_checkpoint_of_the_last_finite_weights(tmp_path, monkeypatch, capsys):
    inject(monkeypatch, set(range(3, 100)))  # from step 3 on, every step is NaN
    cfg = _config(tmp_path, max_skipped_steps=3, save_steps=2, save_total_limit=0)
    result = dpokit.train(cfg)
    out = capsys.readouterr().out
    assert result.stop_reason == "non_finite"
    assert not (result.run_dir / "final").exists()
    # steps 3, 4, 5 skipped; the 4th non-finite step (6) stops the run
    assert "stopped at step 6: 4 steps had a non-finite loss" in out
    assert "Likely cause:" in out and "optim.lr=0.003" in out and "train.resume=auto" in out
    records = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["diagnosis"]["mode"] for r in records if "diagnosis" in r] == ["non_finite"]
    stop_ckpt = list_checkpoints(result.run_dir)[-1]
    assert stop_ckpt.name == "checkpoint-6"
    before = load_file(str(result.run_dir / "checkpoints" / "checkpoint-2" / "model.safetensors"))
    after = load_file(str(stop_ckpt / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update since step 2 reached the weights

    # Resume with a lower learning rate (and no more faults): the run finishes from the stop checkpoint.
    monkeypatch.setattr(dpokit.training.loop, "step_for", lambda cfg: PairedStep())
    cfg["optim"]["lr"] = 1e-3
    resumed = dpokit.train(cfg)
    out = capsys.readouterr().out
    assert "resumed from" in out and "checkpoint-6" in out and "optim.lr: 0.003 -> 0.001" in out
    assert resumed.stop_reason is None and (resumed.model_dir / "model.safetensors").exists()
    records = read_metrics(resumed.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("loss") is not None] == [1, 2, 7, 8]  # 3-6 skipped, no step twice
    assert [r["step"] for r in records if "loss" in r and r["loss"] is None] == [6]  # the record that stopped the run


@pytest.mark.slow
def test_zero_tolerance_stops_at_the_first_non_finite_step(tmp_path, monkeypatch, capsys):
    inject(monkeypatch, {2})
    result = dpokit.train(_config(tmp_path, max_skipped_steps=0))
    assert result.stop_reason == "non_finite"
    assert "stopped at step 2" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["checkpoint-2"]  # saved even with save_steps=0


def test_likely_cause_names_the_usual_suspects():
    cfg = load_config(None, {"train.mixed_precision": "fp16", "optim.lr": 0.1})
    assert "float16 overflow" in likely_cause(cfg, bad_loss=True, applied_steps=5)
    assert "learning rate is probably too high (optim.lr=0.1)" in likely_cause(cfg, bad_loss=True, applied_steps=5)
    assert "empty or fully truncated completions" in likely_cause(load_config(), bad_loss=True, applied_steps=0)
    no_clip = load_config(None, {"optim.max_grad_norm": 0})
    assert "turn clipping on" in likely_cause(no_clip, bad_loss=False, applied_steps=3)
