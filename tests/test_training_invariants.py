"""Invariants of the training step: frozen reference, LoRA reference = base, accumulation equivalence."""

import copy

import torch
from accelerate import Accelerator

from dpokit.config import load_config
from dpokit.data.collate import collate_pairs
from dpokit.data.records import PreferenceExample
from dpokit.data.tokenization import tokenize_pairs
from dpokit.training.metrics import MetricSums
from dpokit.models import load_policy
from dpokit.reference import make_reference, reference_mode
from dpokit.steps import PairedStep
from dpokit.steps.base import StepContext
from dpokit.steps.paired import forward_pairs
from dpokit.training.loop import accumulate_gradients
from dpokit.training.step_runner import StepJob
from tiny_assets import synthetic_pairs, tiny_model_dir, word_tokenizer


def _cfg(**overrides):
    base = {"model.name_or_path": str(tiny_model_dir()), "loss.beta": 0.5, "optim.lr": 1e-2}
    base.update(overrides)
    return load_config(None, base)


def _pairs(n, seed=0):
    rows = synthetic_pairs(n, seed)
    examples = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    pairs, _ = tokenize_pairs(examples, word_tokenizer(), max_length=32, max_prompt_length=16)
    return pairs


def _sgd_steps(policy, reference, cfg, steps=3):
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.optim.lr)
    pairs = _pairs(8)
    for _ in range(steps):
        accumulate_gradients(
            StepJob(policy, reference, PairedStep(), StepContext(cfg, group=accelerator)),
            [collate_pairs(pairs, 0)],
            MetricSums(),
        )
        optimizer.step()
        optimizer.zero_grad()


def test_reference_is_frozen_and_unchanged_after_training():
    cfg = _cfg()
    policy = load_policy(cfg)
    reference = make_reference(policy, cfg, needs_reference=True)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    policy_before = {k: v.clone() for k, v in policy.state_dict().items()}
    _sgd_steps(policy, reference, cfg)
    assert all(not p.requires_grad and p.grad is None for p in reference.parameters())
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    changed = [k for k, v in policy.state_dict().items() if not torch.equal(v, policy_before[k])]
    assert len(changed) > 0, "the policy itself must have moved"


def test_lora_with_adapters_disabled_gives_the_base_models_logits():
    from transformers import AutoModelForCausalLM

    cfg = _cfg(**{"lora.enabled": True, "lora.r": 4, "lora.dropout": 0.0})
    policy = load_policy(cfg)
    assert make_reference(policy, cfg, needs_reference=True) is None  # no second copy
    _sgd_steps(policy, None, cfg)  # LoRA B starts at zero: train so the adapters really change the output
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path).eval()
    batch = collate_pairs(_pairs(4, seed=1), 0)
    with torch.no_grad():
        base_logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        policy.eval()
        adapted = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with reference_mode(policy, None) as ref:
        ref_logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ref_logits, base_logits, rtol=1e-5, atol=1e-5)
    assert (adapted - base_logits).abs().max() > 1e-3
    # and the adapters are enabled again afterwards
    with torch.no_grad():
        again = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(again, adapted)


def _grads_and_loss(micro_batches, cfg):
    policy = load_policy(cfg)
    reference = make_reference(policy, cfg, needs_reference=True)
    sums = MetricSums()
    accumulate_gradients(
        StepJob(policy, reference, PairedStep(), StepContext(cfg, group=Accelerator(cpu=True))), micro_batches, sums
    )
    return {n: p.grad.clone() for n, p in policy.named_parameters()}, sums.reduce()


def test_batch_8_by_1_equals_batch_4_by_2():
    cfg = _cfg()
    pairs = _pairs(8, seed=3)
    grads_a, metrics_a = _grads_and_loss([collate_pairs(pairs, 0)], cfg)
    grads_b, metrics_b = _grads_and_loss([collate_pairs(pairs[:4], 0), collate_pairs(pairs[4:], 0)], cfg)
    assert metrics_a["loss"] > 0
    for name in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert abs(metrics_a[name] - metrics_b[name]) < 1e-5, name
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-6)


def test_metrics_at_start_of_training_match_dpo_theory():
    """policy == reference: every implicit reward is 0, the loss is log 2 and the KL is 0."""
    cfg = _cfg()
    policy = load_policy(cfg)
    reference = copy.deepcopy(policy).requires_grad_(False)
    _, metrics = forward_pairs(policy, reference, collate_pairs(_pairs(6), 0), StepContext(cfg))
    torch.testing.assert_close(metrics["loss"], torch.full((6,), 0.6931472), rtol=0, atol=1e-6)
    assert metrics["rewards/margins"].abs().max() < 1e-6
    assert metrics["kl/chosen"].abs().max() < 1e-5
    assert metrics["rewards/accuracies"].sum() == 0  # ties are not counted as correct (TRL's rule)
