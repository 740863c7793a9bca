"""Every fast path gives the plain path's per-pair log-probs, loss, metrics and gradients.

The plain path is `forward_pairs` on a `collate_pairs` batch: 2B padded rows, full logits.
The fast path (`forward_pairs_fast` on a `make_collate` batch) lays pairs out padding-free
(packing), computes each prompt once for both completions (prefix sharing) and never
builds the logits of all tokens (chunked LM head with recomputation in backward).
"""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator

from dpokit.config import load_config
from dpokit.data.collate import collate_pairs
from dpokit.data.packing import Layout, collate_packed, count_pairs
from dpokit.data.records import PreferenceExample
from dpokit.data.tokenization import TokenizedPair, tokenize_pairs
from dpokit.logprobs import IGNORE_INDEX, chunked_token_logps
from dpokit.training.metrics import MetricSums
from dpokit.models import load_policy
from dpokit.reference import make_reference
from dpokit.packed_attention import allowed
from dpokit.config import SpeedConfig
from dpokit.steps.base import StepContext
from dpokit.steps.paired import forward_pairs, forward_pairs_fast, make_collate
from dpokit.steps import FastPairedStep, PairedStep, Step
from dpokit.training.loop import accumulate_gradients
from dpokit.training.step_runner import StepJob
from tiny_assets import synthetic_pairs, tiny_model_dir, word_tokenizer

ATOL = 1e-5

SETTINGS = {
    "plain_layout_chunked": SpeedConfig(packing=False, prefix_sharing=False, chunked_logps=True),
    "packing": SpeedConfig(packing=True, prefix_sharing=False, chunked_logps=False, pack_length=64),
    "prefix_sharing": SpeedConfig(packing=False, prefix_sharing=True, chunked_logps=False),
    "chunked": SpeedConfig(packing=False, prefix_sharing=False, chunked_logps=True, logps_chunk_size=7),
    "packing+prefix": SpeedConfig(packing=True, prefix_sharing=True, chunked_logps=False, pack_length=64),
    "all": SpeedConfig(packing=True, prefix_sharing=True, chunked_logps=True, pack_length=64, logps_chunk_size=5),
    "all_defaults": SpeedConfig(),
}


def _cfg(speed: SpeedConfig | None = None, **overrides):
    base = {"model.name_or_path": str(tiny_model_dir()), "loss.beta": 0.5}
    base.update(overrides)
    cfg = load_config(None, base)
    if speed is not None:
        cfg.speed = speed
    return cfg


def _pairs(n=8, seed=0, empty_prompt=False):
    rows = synthetic_pairs(n, seed)
    examples = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    pairs, _ = tokenize_pairs(examples, word_tokenizer(), max_length=32, max_prompt_length=16)
    if empty_prompt:
        pairs[0] = TokenizedPair([], pairs[0].chosen_ids, pairs[0].rejected_ids)
    return pairs


def _moved(policy, seed=1, scale=0.02):
    """The policy after a random step, so that policy and reference differ (rewards, KL non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return policy


def _run(forward, policy, reference, batch, cfg):
    policy.zero_grad(set_to_none=True)
    out, metrics = forward(policy, reference, batch, StepContext(cfg))
    out.losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return out, metrics, grads


def _compare(plain, fast, kl=True):
    out0, m0, g0 = plain
    out1, m1, g1 = fast
    torch.testing.assert_close(out1.losses, out0.losses, rtol=0, atol=ATOL)
    for name, values in m0.items():
        if name == "kl/chosen" and not kl:
            assert name not in m1
            continue
        torch.testing.assert_close(m1[name], values, rtol=1e-5, atol=ATOL, msg=name)
    assert g0.keys() == g1.keys() and g0
    for name, g in g0.items():
        torch.testing.assert_close(g1[name], g, rtol=1e-4, atol=ATOL, msg=name)


@pytest.fixture(scope="module")
def models():
    cfg = _cfg()
    policy = load_policy(cfg)
    reference = make_reference(policy, cfg, needs_reference=True)
    return _moved(policy), reference


@pytest.fixture(scope="module")
def plain_result(models):
    policy, reference = models
    cfg = _cfg()
    return _run(forward_pairs, policy, reference, collate_pairs(_pairs(), 0), cfg)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_fast_path_matches_the_plain_path(models, plain_result, name):
    policy, reference = models
    speed = SETTINGS[name]
    cfg = _cfg(speed)
    batch = make_collate(speed)(_pairs(), 0)
    _compare(plain_result, _run(forward_pairs_fast, policy, reference, batch, cfg))
    assert plain_result[1]["kl/chosen"].abs().max() > 1e-4  # the policy really differs from the reference


def test_layout_scores_exactly_the_plain_tokens_at_the_plain_positions():
    """Every completion token scored once, with the same target, and its predictor at the same position id."""
    pairs = _pairs(6, seed=4, empty_prompt=True)
    plain = collate_pairs(pairs, 0)
    labels = plain["labels"][:, 1:]
    expected = sorted(
        (s, int(t), k) for s in range(labels.shape[0]) for k, t in enumerate(labels[s].tolist()) if t != IGNORE_INDEX
    )
    for layout in (
        Layout(False, False),
        Layout(True, False, 40),
        Layout(False, True),
        Layout(True, True, 40),
        Layout(single_row=True),
    ):
        b = collate_packed(pairs, 0, layout)
        flat_pos = b["position_ids"].reshape(-1)
        got = sorted(zip(b["score_seq"].tolist(), b["score_target"].tolist(), flat_pos[b["score_pos"]].tolist()))
        assert got == expected, layout
        assert b["seq_lengths"].tolist() == (labels != IGNORE_INDEX).sum(1).tolist()
        assert count_pairs(b) == len(pairs)


def test_prefix_sharing_mask_rejected_never_sees_chosen():
    pair = TokenizedPair([5, 6, 7], [8, 9], [10, 11, 12])
    b = collate_packed([pair], 0, Layout(packing=False, prefix_sharing=True))
    assert b["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]  # rejected continues from the prompt end
    m = allowed(b["segment_ids"], b["branch"])[0, 0]
    assert m[5].tolist() == [True, True, True, False, False, True, False, False]  # first rejected: prompt + itself
    assert m[7].tolist() == [True, True, True, False, False, True, True, True]
    assert m[4].tolist() == [True, True, True, True, True, False, False, False]  # chosen: prompt + chosen so far


def test_packed_units_do_not_attend_across_units():
    pairs = [TokenizedPair([5, 6], [7], [8]), TokenizedPair([9], [10, 11], [12])]
    b = collate_packed(pairs, 0, Layout(packing=True, prefix_sharing=False, pack_length=100))
    assert b["input_ids"].shape[0] == 1  # all four sequences in one row
    m = allowed(b["segment_ids"], b["branch"])[0, 0]
    seg = b["segment_ids"][0]
    cross = seg[:, None] != seg[None, :]
    assert not (m & cross).any()
    assert b["position_ids"][0].tolist().count(0) == 4  # positions restart at every sequence


def test_chunked_lm_head_gradients_are_exact_float64():
    torch.manual_seed(0)
    hidden = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (11,))

    def f(h, w, b):
        return chunked_token_logps(h, w, b, targets, chunk_size=4)[0]

    assert torch.autograd.gradcheck(lambda h, w, b: f(h, w, b).double(), (hidden, weight, bias))
    # and it equals log_softmax of the full logits
    full = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(f(hidden, weight, bias).double(), full, rtol=0, atol=1e-6)


def test_wpo_ld_dpo_and_loss_mixes_match(models):
    policy, reference = models
    overrides = {
        "loss.type": ["sigmoid", "sft"],
        "loss.weights": [1.0, 0.5],
        "loss.ld_alpha": 0.5,
        "loss.use_weighting": True,
    }
    plain = _run(forward_pairs, policy, reference, collate_pairs(_pairs(), 0), _cfg(**overrides))
    speed = SETTINGS["all"]
    fast = _run(forward_pairs_fast, policy, reference, make_collate(speed)(_pairs(), 0), _cfg(speed, **overrides))
    _compare(plain, fast)


def test_lora_policy_with_adapters_off_as_reference():
    cfg = _cfg(**{"lora.enabled": True, "lora.r": 4, "lora.dropout": 0.0})
    policy = load_policy(cfg)
    with torch.no_grad():  # LoRA B starts at zero: give the adapters an effect
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    plain = _run(forward_pairs, policy, None, collate_pairs(_pairs(), 0), cfg)
    speed = SETTINGS["all"]
    fast = _run(
        forward_pairs_fast, policy, None, make_collate(speed)(_pairs(), 0), _cfg(speed, **{"lora.enabled": True})
    )
    _compare(plain, fast)
    assert any("lora" in n for n in fast[2]) and all("lora" in n for n in fast[2])


def test_gradient_checkpointing_with_the_fast_path(models, plain_result):
    _, reference = models
    cfg = _cfg(**{"train.gradient_checkpointing": True})
    policy = _moved(load_policy(cfg))
    policy.train()
    speed = SETTINGS["all"]
    _compare(plain_result, _run(forward_pairs_fast, policy, reference, make_collate(speed)(_pairs(), 0), _cfg(speed)))


def test_eager_attention_uses_the_dense_mask(plain_result, models):
    _, reference = models
    cfg = _cfg(**{"model.attn_implementation": "eager"})
    policy = _moved(load_policy(cfg))
    speed = SETTINGS["all"]
    fast = _run(forward_pairs_fast, policy, reference, make_collate(speed)(_pairs(), 0), _cfg(speed))
    _compare(plain_result, fast)


def test_single_varlen_row_and_grouped_query_attention():
    """The flash-attention layout (everything in one row) and a GQA model, on SDPA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    reference = _moved(copy.deepcopy(policy)).requires_grad_(False)
    cfg = _cfg()
    plain = _run(forward_pairs, policy, reference, collate_pairs(_pairs(), 0), cfg)
    speed = SpeedConfig(prefix_sharing=False, logps_chunk_size=9)
    batch = collate_packed(_pairs(), 0, Layout(prefix_sharing=False, single_row=True))
    assert batch["input_ids"].shape[0] == 1
    _compare(plain, _run(forward_pairs_fast, policy, reference, batch, _cfg(speed)))
    _compare(
        plain,
        _run(forward_pairs_fast, policy, reference, make_collate(SETTINGS["all"])(_pairs(), 0), _cfg(SETTINGS["all"])),
    )


def test_accumulated_step_through_the_trainer_matches(models):
    """accumulate_gradients with a fast Task (as the trainer builds it) = with the plain PAIRED task."""
    policy, reference = models
    speed = SETTINGS["all_defaults"]
    fast_task = FastPairedStep(speed)
    assert isinstance(fast_task, Step)
    pairs = _pairs(8, seed=5)
    results = []
    for task, cfg in ((PairedStep(), _cfg()), (fast_task, _cfg(speed))):
        policy.zero_grad(set_to_none=True)
        sums = MetricSums()
        micro = [task.collate(pairs[:3], 0), task.collate(pairs[3:], 0)]
        accumulate_gradients(
            StepJob(policy, reference, task, StepContext(cfg, group=Accelerator(cpu=True))), micro, sums
        )
        results.append(({n: p.grad.clone() for n, p in policy.named_parameters()}, sums.reduce()))
    (g0, m0), (g1, m1) = results
    for name in m0:
        assert abs(m0[name] - m1[name]) < ATOL, name
    for name, g in g0.items():
        torch.testing.assert_close(g1[name], g, rtol=1e-4, atol=ATOL)


def test_generation_after_the_switch_to_dpokit_sdpa_is_unchanged(models):
    """The fast path switches sdpa to dpokit_sdpa, which is plain sdpa for calls without units."""
    policy, reference = models
    forward_pairs_fast(policy, reference, make_collate(SpeedConfig())(_pairs(4), 0), StepContext(_cfg(SpeedConfig())))
    batch = collate_pairs(_pairs(4), 0)
    with torch.no_grad():
        before_cfg = policy.config._attn_implementation
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        fresh = load_policy(_cfg())
        _moved(fresh)
        ref_logits = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert before_cfg == "dpokit_sdpa" and fresh.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
