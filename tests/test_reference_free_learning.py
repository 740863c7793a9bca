"""SimPO and ORPO learn the synthetic preference with no reference model, and what that saves.

Reference-free losses read only the policy's log-probs, so the trainer must neither build a
reference (a full copy of the weights under full fine-tuning) nor run one. Both are checked by
watching `make_reference` (what it returns) and `reference_mode` (it must never be entered).
For these losses the reported rewards are beta * the per-token average log-prob, so the eval
reward margin divided by beta is the held-out length-normalised chosen-minus-rejected gap.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import dpokit
import dpokit.models
import dpokit.steps.paired
import dpokit.reference
import dpokit.training.setup
import dpokit.training.loop
from dpokit.logprobs import completion_logps
from dpokit.training.metrics import read_metrics
from dpokit.tiny import build_tiny_llama, save_tiny
from tiny_assets import synthetic_pairs, tiny_model_dir, word_tokenizer, write_jsonl


def watch_reference(monkeypatch) -> list:
    """Record every reference the trainer builds; fail if it ever runs one."""
    built = []
    original = dpokit.training.setup.make_reference

    def make_reference(policy, cfg, needs_reference):
        reference = original(policy, cfg, needs_reference)
        built.append((needs_reference, reference))
        return reference

    def reference_mode(policy, reference):
        raise AssertionError("a reference forward ran for a reference-free loss")

    monkeypatch.setattr(dpokit.training.setup, "make_reference", make_reference)
    monkeypatch.setattr(dpokit.steps.paired, "reference_mode", reference_mode)
    return built


def held_out_signal(model, pairs: list[dict]) -> tuple[float, float]:
    """(mean of avg log p(chosen) - avg log p(rejected), share of pairs where chosen is higher), per-token averages."""
    tok = word_tokenizer()
    prompts = [tok(p["prompt"])["input_ids"] for p in pairs]
    chosen = [tok(p["chosen"] + tok.eos_token)["input_ids"] for p in pairs]
    rejected = [tok(p["rejected"] + tok.eos_token)["input_ids"] for p in pairs]
    chosen_avg = completion_logps(model, prompts, chosen, 0) / torch.tensor([len(c) for c in chosen])
    rejected_avg = completion_logps(model, prompts, rejected, 0) / torch.tensor([len(r) for r in rejected])
    gap = chosen_avg - rejected_avg
    return gap.mean().item(), (gap > 0).float().mean().item()


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss_type, beta", [("simpo", 2.0), ("orpo", 0.1)]
)  # SimPO's paper beta; ORPO's (TRL's) lambda
def test_reference_free_loss_learns_the_preference_without_a_reference(tmp_path, monkeypatch, loss_type, beta):
    built = watch_reference(monkeypatch)
    held_out = synthetic_pairs(64, seed=2)
    result = dpokit.train(
        {
            "model": {"name_or_path": str(tiny_model_dir())},
            "data": {
                "path": str(write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(256, seed=1))),
                "eval_path": str(write_jsonl(tmp_path / "eval.jsonl", held_out)),
                "max_length": 32,
                "max_prompt_length": 16,
            },
            "loss": {"type": loss_type, "beta": beta, "simpo_gamma": 0.5 * beta},
            "optim": {"lr": 3e-3, "scheduler": "constant"},
            "train": {"batch_size": 16, "max_steps": 10, "logging_steps": 5, "eval_steps": 5, "progress_bar": False},
            "out_dir": str(tmp_path / "run"),
        }
    )
    assert built == [(False, None)]  # asked for no reference, and got none

    before_gap, before_accuracy = held_out_signal(AutoModelForCausalLM.from_pretrained(tiny_model_dir()), held_out)
    after_gap, after_accuracy = held_out_signal(AutoModelForCausalLM.from_pretrained(result.model_dir), held_out)
    evals = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "eval_loss" in r]
    print(
        f"\n{loss_type}: held-out gap {before_gap:.3f} -> {after_gap:.3f} nats/token, accuracy {before_accuracy:.2f} -> {after_accuracy:.2f}"
    )
    # a random start: no preference (seen: gap 0.002, accuracy 0.52); after 10 steps a clear one
    assert abs(before_gap) < 0.1 and before_accuracy < 0.7
    assert after_gap > before_gap + 0.5 and after_accuracy >= 0.9  # seen: simpo ~2.4, orpo ~0.9
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"] > 0
    # the trainer's rewards are beta * avg log p: its final eval margin is the same gap
    assert abs(evals[-1]["eval_rewards/margins"] / beta - after_gap) < 1e-4


def parameter_bytes(model) -> int:
    return 0 if model is None else sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.slow
def test_no_reference_saves_one_copy_of_the_weights(tmp_path, monkeypatch):
    """Full fine-tuning with sigmoid keeps a frozen copy; simpo keeps none. Measured on a ~2.7M-parameter Llama.

    Parameter bytes, because peak RSS is noisy under a shared CPU. For scale, peak RSS of two steps on a
    42M-parameter tiny Llama (hidden 1024, 4 layers, fp32: 160 MiB of weights) in separate processes
    was ~1331 MiB with sigmoid and ~1155 MiB with simpo: 176 MiB saved, the weights plus the reference
    forward's activations.
    """
    tok = word_tokenizer()
    model_dir = save_tiny(
        build_tiny_llama(tok, hidden_size=256, num_layers=4, num_heads=4, seed=0), tok, tmp_path / "model"
    )
    data = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(8, seed=1))
    held: dict[str, int] = {}
    for loss_type in ("sigmoid", "simpo"):
        built = []
        original = dpokit.reference.make_reference

        def make_reference(policy, cfg, needs_reference, built=built):
            reference = original(policy, cfg, needs_reference)
            built.append((parameter_bytes(policy), parameter_bytes(reference)))
            return reference

        monkeypatch.setattr(dpokit.training.setup, "make_reference", make_reference)
        dpokit.train(
            {
                "model": {"name_or_path": str(model_dir)},
                "data": {"path": str(data), "max_length": 32, "max_prompt_length": 16},
                "loss": {"type": loss_type, "beta": 2.0 if loss_type == "simpo" else 0.1},
                "speed": {"ref_cache": False},  # a live reference (the default cache holds none in memory either)
                "train": {"batch_size": 8, "max_steps": 1, "logging_steps": 1, "progress_bar": False},
                "out_dir": str(tmp_path / loss_type),
            }
        )
        ((policy_bytes, reference_bytes),) = built
        held[loss_type] = reference_bytes
    saved = held["sigmoid"] - held["simpo"]
    print(
        f"\nreference weights: sigmoid {held['sigmoid'] / 2**20:.2f} MiB, simpo {held['simpo'] / 2**20:.2f} MiB; "
        f"saved {saved / 2**20:.2f} MiB = the policy's {policy_bytes / 2**20:.2f} MiB of fp32 weights"
    )
    assert held["simpo"] == 0 and saved == policy_bytes > 0
