"""beta-DPO's batch-adaptive beta (loss.beta_schedule=adaptive; Wu et al. 2024, arXiv 2407.08639).

M_i  = beta_0 * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]
M_0 <- m * M_0 + (1 - m) * mean_i M_i          (first)
beta = beta_0 * (1 + alpha * (mean_i M_i - M_0)), at least 1e-3
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dpokit
import dpokit.training.loop
from dpokit.config import ConfigError, load_config
from dpokit.losses import BETA_FLOOR, LossConfig, PairLogps, adaptive_beta, compute_loss, moved_threshold
from dpokit.steps import StepContext
from dpokit.training.adaptive_beta import AdaptiveBeta
from dpokit.training.checkpoint import RunState, list_checkpoints
from dpokit.training.metrics import read_metrics
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl

# A hand-worked batch of two pairs, beta_0 = 0.5, alpha = 0.6, m = 0.9, M_0 = 0.1 before it:
#   policy chosen/rejected  (-3.0, -4.0), (-5.0, -4.0);  reference (-3.5, -3.5), (-5.0, -4.2)
#   r_w = (0.5, 0.0), r_l = (-0.5, 0.2)  ->  r_w - r_l = (1.0, -0.2)  ->  M = 0.5 * that = (0.5, -0.1), mean 0.2
#   M_0  = 0.9 * 0.1 + 0.1 * 0.2 = 0.11
#   beta = 0.5 * (1 + 0.6 * (0.2 - 0.11)) = 0.5 * 1.054 = 0.527
#   losses -log sigma(0.527 * 1.0) = log(1 + e^-0.527) = log(1.59036) = 0.46397,
#   -log sigma(0.527 * -0.2) = log(1 + e^0.1054) = log(2.11115) = 0.74724
PAIR = PairLogps(
    torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0]), torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -4.2])
)
LOSS = LossConfig(beta=0.5, beta_schedule="adaptive", beta_adaptive_alpha=0.6, beta_adaptive_momentum=0.9)


def test_the_update_on_a_hand_worked_batch():
    assert moved_threshold(0.1, 0.2, 0.9) == pytest.approx(0.11, abs=1e-12)
    assert adaptive_beta(0.5, 0.6, 0.2, 0.11) == pytest.approx(0.527, abs=1e-12)
    assert adaptive_beta(0.5, 0.6, -5.0, 0.0) == BETA_FLOOR  # 0.5 * (1 - 3) < 0: floored, never a negative beta


def test_the_step_moves_m0_and_the_loss_gets_the_batch_beta():
    state = RunState(beta_threshold=0.1)
    run_side = AdaptiveBeta(LOSS, SimpleNamespace(num_processes=1), state)
    threshold = run_side.for_step()  # the optimizer step's M_0, in its micro-batches' StepContext
    ctx = StepContext(SimpleNamespace(loss=LOSS), beta=threshold, group=SimpleNamespace(num_processes=1))
    margins = LOSS.beta * ((PAIR.policy_chosen - PAIR.ref_chosen) - (PAIR.policy_rejected - PAIR.ref_rejected))
    torch.testing.assert_close(margins, torch.tensor([0.5, -0.1]))
    beta = threshold.batch_beta(margins, ctx)
    assert threshold.threshold == pytest.approx(0.11, abs=1e-7)
    assert state.beta_threshold == 0.1  # RunState moves only when the step is over
    assert beta == pytest.approx(0.527, abs=1e-7)
    out = compute_loss(PAIR, dataclasses.replace(LOSS, beta=beta))
    torch.testing.assert_close(out.losses, torch.tensor([0.46397, 0.74724]), atol=1e-5, rtol=0)
    assert (
        threshold.batch_beta(margins, dataclasses.replace(ctx, dummy=True)) == LOSS.beta
    )  # no pair anywhere: beta_0, M_0 unmoved
    assert threshold.threshold == pytest.approx(0.11, abs=1e-7)
    assert threshold.batch_beta(torch.tensor([math.nan, 1.0]), ctx) == LOSS.beta  # a non-finite batch (skipped)
    assert threshold.threshold == pytest.approx(0.11, abs=1e-7)
    run_side.keep(threshold)
    assert state.beta_threshold == pytest.approx(0.11, abs=1e-7)


def _config(tmp_path: Path, name: str, **train) -> dict:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, synthetic_pairs(24, seed=1))
    return {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {"path": str(data), "max_length": 32},
        "loss": {"beta": 0.5, "beta_schedule": "adaptive", "beta_adaptive_alpha": 2.0, "beta_adaptive_momentum": 0.5},
        "optim": {"lr": 3e-3},
        "train": {"batch_size": 4, "max_steps": 5, "logging_steps": 1, "save_steps": 3, "progress_bar": False, **train},
        "out_dir": str(tmp_path / name),
    }


def _records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]


def test_a_run_logs_beta_per_step_following_the_update(tmp_path):
    run_dir = dpokit.train(_config(tmp_path, "run")).run_dir
    records = _records(run_dir)
    threshold = 0.0  # M_0 starts at 0: the margin of a policy that equals its reference
    for r in records:  # one micro-batch, one process: the step's mean margin is the logged rewards/margins (at beta_0)
        threshold = 0.5 * threshold + 0.5 * r["rewards/margins"]
        assert r["beta"] == pytest.approx(0.5 * (1 + 2.0 * (r["rewards/margins"] - threshold)), abs=1e-5), r["step"]
    assert records[0]["beta"] == 0.5  # step 1: policy == reference, every margin 0
    assert len({round(r["beta"], 6) for r in records}) > 2  # it moves
    state = json.loads((list_checkpoints(run_dir)[-1] / "trainer_state.json").read_text())
    assert state["beta_threshold"] == pytest.approx(threshold, abs=1e-5)  # M_0 is saved with the checkpoint


def test_kill_and_resume_continues_m0_exactly(tmp_path, monkeypatch):
    whole = dpokit.train(_config(tmp_path, "whole")).run_dir
    original, calls = dpokit.training.loop.accumulate_gradients, []

    def crash_in_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(dpokit.training.loop, "accumulate_gradients", crash_in_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dpokit.train(_config(tmp_path, "run"))
    monkeypatch.undo()
    resumed = dpokit.train(_config(tmp_path, "run")).run_dir  # from checkpoint-3
    got, want = _records(resumed), _records(whole)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for a, b in zip(got, want):
        for key in ("beta", "loss", "rewards/margins", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)


def test_adaptive_beta_needs_paired_margins_against_a_reference():
    base = {"model": {"name_or_path": "x"}, "loss": {"beta_schedule": "adaptive"}}
    assert load_config(base).loss.beta_schedule == "adaptive"
    for override in ("loss.type=simpo", "loss.type=kto", "train.task=sft"):
        with pytest.raises(ConfigError, match="beta_schedule=adaptive"):
            load_config(base, [override])
    with pytest.raises(ConfigError, match="loss.beta_schedule"):
        load_config(base, ["loss.beta_schedule=linear"])
    with pytest.raises(ConfigError, match="loss.beta_adaptive_momentum"):
        load_config(base, ["loss.beta_adaptive_momentum=1.0"])
    with pytest.raises(ConfigError, match="loss.beta_adaptive_alpha"):
        load_config(base, ["loss.beta_adaptive_alpha=-1"])
