"""bf16 end to end: bf16 weights (model.dtype=bfloat16) and bf16 autocast over float32 weights
(train.mixed_precision=bf16) both train, and reduce log-probs, losses and metrics in float32.

Tolerances: bf16 keeps 8 significant bits, so one rounding has relative error at most u = 2^-8.
The fast step (packed rows, shared prompt, chunked LM head) and the plain step do the same
arithmetic in a different order and shape (per-unit vs padded attention, LM head over chunks of
scored tokens vs over every position), so their bf16 roundings differ, but in both the logits'
log-softmax and every sum after it are float32 (logprobs.py), adding no bf16 error of their own.
  - per-token log-probs: each is at most a few bf16 roundings of its logits away from the other
    path's. All of them are <= 0, so sum_t |logp_t| = |sum_t logp_t| and a relative error of u
    per token stays a relative error of u on the per-sequence sum, however long the sequence:
    logps are compared with rtol = u (plus atol = 1e-3 nats for sums near zero).
  - rewards beta (pi - ref) and the sigmoid loss (Lipschitz in the margin with constant beta)
    inherit that: atol = beta * u * (|pi| + |ref|) per sequence, 2x that for the margin and loss.
  - gradients are sums over all tokens and pairs, back through both layers' attention and MLP,
    with bf16 roundings in the forward and the backward; entries that cancel to near zero have no
    meaningful relative error, so each parameter's gradient is compared as a whole:
    ||g_fast - g_plain|| <= 8u ||g_plain|| (2 layers x 2 blocks x forward and backward: 8 roundings
    on the longest path). Measured here: per-sequence logps within 0.14% (u = 0.39%), margins
    within 0.011 of 0.8, gradient norms within 1.0% (8u = 3.1%). No src change was needed for these:
    every log-softmax and per-sequence sum was already float32.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from accelerate.state import AcceleratorState

import dpokit
from dpokit.data.collate import collate_pairs
from dpokit.logprobs import chunked_token_logps, selective_log_softmax
from dpokit.models import load_policy
from dpokit.reference import make_reference
from dpokit.steps.base import StepContext
from dpokit.steps.paired import forward_pairs, forward_pairs_fast, make_collate
from dpokit.training.metrics import read_metrics
from test_fast_paths import SETTINGS, _cfg, _moved, _pairs
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl

U = 2.0**-8  # bf16 unit roundoff
MODES = {"bf16_weights": {"model.dtype": "bfloat16"}, "bf16_autocast": {"train.mixed_precision": "bf16"}}


def _run(forward, policy, reference, batch, cfg, autocast: bool):
    policy.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        out, metrics = forward(policy, reference, batch, StepContext(cfg))
    out.losses.sum().backward()
    return out, metrics, {n: p.grad.float() for n, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", list(MODES))
def test_fast_step_equals_plain_step_in_bf16_within_bf16_rounding(mode):
    overrides, autocast = MODES[mode], mode == "bf16_autocast"
    cfg = _cfg(**overrides)
    policy = load_policy(cfg)
    assert next(policy.parameters()).dtype == (torch.float32 if autocast else torch.bfloat16)
    reference = make_reference(policy, cfg, needs_reference=True)
    _moved(policy, scale=0.1)  # policy != reference, by margins well above the rewards tolerance
    plain = _run(forward_pairs, policy, reference, collate_pairs(_pairs(), 0), cfg, autocast)
    speed = SETTINGS["all"]
    fast = _run(
        forward_pairs_fast, policy, reference, make_collate(speed)(_pairs(), 0), _cfg(speed, **overrides), autocast
    )
    (out0, m0, g0), (out1, m1, g1) = plain, fast
    beta = cfg.loss.beta
    for out, m in ((out0, m0), (out1, m1)):  # reduced in float32 in both paths
        assert out.losses.dtype == out.chosen_rewards.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in m.values()), {k: v.dtype for k, v in m.items()}
    for name in ("logps/chosen", "logps/rejected"):
        torch.testing.assert_close(m1[name], m0[name], rtol=U, atol=1e-3, msg=name)
    pi = m0["logps/chosen"].abs() + m0["logps/rejected"].abs()
    ref = (m0["logps/chosen"] - m0["rewards/chosen"] / beta).abs() + (
        m0["logps/rejected"] - m0["rewards/rejected"] / beta
    ).abs()
    per_pair = beta * U * (pi + ref)
    assert m0["rewards/margins"].abs().max() > 5 * per_pair.max()  # the bound is tighter than the signal
    for name, bound in (
        ("rewards/chosen", per_pair),
        ("rewards/rejected", per_pair),
        ("rewards/margins", 2 * per_pair),
        ("loss", 2 * per_pair),
    ):
        assert ((m1[name] - m0[name]).abs() <= bound).all(), (name, (m1[name] - m0[name]).abs().max(), bound.min())
    assert ((out1.losses - out0.losses).abs() <= 2 * per_pair).all()
    torch.testing.assert_close(m1["entropy"], m0["entropy"], rtol=U, atol=U)
    torch.testing.assert_close(
        m1["kl/chosen"], m0["kl/chosen"], rtol=0, atol=U * float(m0["kl/chosen"].abs().max()) + 1e-4
    )
    assert g0.keys() == g1.keys() and g0
    for name, g in g0.items():
        assert torch.linalg.vector_norm(g1[name] - g) <= 8 * U * torch.linalg.vector_norm(g), name


def test_log_softmax_of_bf16_logits_is_float32():
    """selective_log_softmax and the chunked LM head: bf16 inputs, float32 log-probs equal to float32 math on the bf16 logits."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(7, 16).bfloat16(), torch.randn(50, 16).bfloat16()
    targets = torch.randint(0, 50, (7,))
    logits = hidden @ weight.T  # (7, 50) bf16
    expected = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]
    picked = selective_log_softmax(logits[None], targets[None])[0]
    chunked, _, _ = chunked_token_logps(hidden, weight, None, targets, chunk_size=3)
    assert picked.dtype == chunked.dtype == torch.float32
    torch.testing.assert_close(picked, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked, expected, rtol=0, atol=1e-6)


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one mixed-precision setting per process; each bf16 run, and the tests after it, start clean."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_bf16_run_trains_and_logs(tmp_path, monkeypatch, fresh_accelerator_state, mode):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(24, seed=5))
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {"path": str(data), "max_length": 32, "max_prompt_length": 16},
        "loss": {"beta": 0.5},
        "optim": {"lr": 1e-2, "scheduler": "constant"},
        "out_dir": str(tmp_path / "run"),
        "train": {"batch_size": 6, "max_steps": 4, "logging_steps": 1, "progress_bar": False, "save_steps": 0},
    }
    dpokit.train(cfg, overrides=MODES[mode])
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    losses = [r["loss"] for r in records]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1  # it learns the preference, in bf16 as in float32
    assert all(math.isfinite(r["rewards/margins"]) and math.isfinite(r["logps/chosen"]) for r in records)


@pytest.mark.slow
def test_runs_with_other_mixed_precision_follow_each_other_in_one_process(
    tmp_path, monkeypatch, fresh_accelerator_state
):
    """A notebook or a sweep calls dpokit.train() again with another train.mixed_precision: accelerate's one state
    per process raised "AcceleratorState has already been initialized" on the second run."""
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(12, seed=5))
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {"path": str(data), "max_length": 32},
        "train": {"batch_size": 6, "max_steps": 1, "progress_bar": False, "save_steps": 0},
    }
    for n, precision in enumerate(["no", "bf16", "no"]):
        result = dpokit.train({**cfg, "out_dir": str(tmp_path / f"run{n}")}, {"train.mixed_precision": precision})
        assert math.isfinite(result.metrics["loss"])
