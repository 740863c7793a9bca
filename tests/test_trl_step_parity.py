"""Whole optimizer steps of `dpokit.train` against TRL 1.16's DPOTrainer: same metrics, same weights.

test_losses_trl_parity.py checks the loss formulas on given log-probs; this checks everything
around them end to end: tokenisation, padding and masking, the policy and reference forwards, the
mean over pairs, gradient clipping, AdamW and the schedule. Two steps on one batch of all rows:
step 1 runs with policy == reference (rewards are 0 by construction), so step 2, after one
update, is where rewards, margins and accuracies carry information, and its AdamW update depends
on gradient magnitudes (the first is nearly lr * sign(g)). AdamW: both sides' default, torch's fused kernel
(TRL through HF Trainer's adamw_torch_fused; dpokit's optim.fused).

TRL defaults that differ from dpokit's and are set here so both compute the same thing:
  bf16=True unless fp16 (TRL's base config)     -> bf16=False, fp32 like dpokit's default
  gradient_checkpointing=True                   -> False (numerically the same on CPU; just faster)
  max_length=1024, keep_start on the whole seq  -> None: dpokit cuts prompt (left) and completion (right)
  lr_scheduler_type linear                      -> constant, as dpokit's `optim.scheduler: constant`
  precompute_ref_log_probs False, padding_free False, disable_dropout True: the tiny model has no dropout
Differences that remain, each pinned by a test below:
  logits/chosen, logits/rejected: TRL averages over all completion tokens of the batch, dpokit over
    sequences (each sequence's token mean, then the mean over sequences).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

import dpokit  # noqa: E402
from dpokit.config import load_config  # noqa: E402
from dpokit.data.collate import collate_pairs  # noqa: E402
from dpokit.data.prepare import prepare_data  # noqa: E402
from dpokit.logprobs import IGNORE_INDEX  # noqa: E402
from dpokit.training.metrics import read_metrics  # noqa: E402
from tiny_assets import tiny_model_dir, write_jsonl  # noqa: E402

ROWS = [  # lengths differ, so padding and masking matter
    {"prompt": "the film was", "chosen": " good and very good", "rejected": " bad"},
    {"prompt": "it is a movie", "chosen": " great", "rejected": " awful plot and acting"},
    {"prompt": "hi how are you", "chosen": " i am fine thanks", "rejected": " no"},
    {"prompt": "what colour sky", "chosen": " blue", "rejected": " green maybe"},
    {"prompt": "tell me story", "chosen": " once upon time", "rejected": " no"},
    {"prompt": "the plot", "chosen": " is great", "rejected": " is awful but fine"},
]
BETA, LR, MAX_GRAD_NORM = 0.5, 1e-3, 1.0  # the gradient norm is ~2-6: clipping is active in both
METRICS = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "entropy",
    "mean_token_accuracy",
    "num_tokens",
]  # token means (chosen only for accuracy); running input-token count


def data_settings(path: Path) -> dict:
    return {"path": str(path), "max_length": 64, "max_prompt_length": 32}  # nothing is truncated


def run_dpokit(tmp_path: Path, loss_type: str, steps: int, weight_decay: float = 0.0):
    result = dpokit.train(
        {
            "model": {"name_or_path": str(tiny_model_dir())},
            "data": data_settings(tmp_path / "pairs.jsonl"),
            "loss": {"type": loss_type, "beta": BETA},
            "optim": {
                "lr": LR,
                "scheduler": "constant",
                "weight_decay": weight_decay,
                "max_grad_norm": MAX_GRAD_NORM,
                "adam_beta1": 0.9,
                "adam_beta2": 0.999,
                "adam_eps": 1e-8,
            },
            "train": {"batch_size": len(ROWS), "max_steps": steps, "logging_steps": 1, "progress_bar": False},
            "out_dir": str(tmp_path / "dpokit"),
        }
    )
    from transformers import AutoModelForCausalLM

    records = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    return records, AutoModelForCausalLM.from_pretrained(result.model_dir).state_dict()


def run_trl(tmp_path: Path, loss_type: str, steps: int, weight_decay: float = 0.0):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model_dir = str(tiny_model_dir())
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        use_cpu=True,
        seed=42,
        save_strategy="no",
        disable_tqdm=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        max_length=None,
        padding_free=False,
        precompute_ref_log_probs=False,
        per_device_train_batch_size=len(ROWS),
        max_steps=steps,
        logging_steps=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=weight_decay,
        max_grad_norm=MAX_GRAD_NORM,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        beta=BETA,
        loss_type=[loss_type],
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=model_dir,
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    ids = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r]
    return records, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, ids


def dpokit_data(tmp_path: Path):
    from transformers import AutoTokenizer

    cfg = load_config(
        {"model": {"name_or_path": str(tiny_model_dir())}, "data": data_settings(tmp_path / "pairs.jsonl")}
    )
    return prepare_data(cfg, AutoTokenizer.from_pretrained(tiny_model_dir())).train


def max_differences(ours: list[dict], theirs: list[dict]) -> dict[str, float]:
    assert [r["step"] for r in ours] == [1, 2] and len(theirs) == 2
    return {m: max(abs(o[m] - t[m]) for o, t in zip(ours, theirs)) for m in METRICS + ["grad_norm", "learning_rate"]}


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero"])
def test_two_steps_match_trl_dpo_trainer(tmp_path, loss_type):
    write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    ours, our_weights = run_dpokit(tmp_path, loss_type, steps=2)
    theirs, their_weights, trl_ids = run_trl(tmp_path, loss_type, steps=2)

    # identical token ids, so any difference below is in the computation, not the data
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in dpokit_data(tmp_path)] == trl_ids

    diffs = max_differences(ours, theirs)
    print(f"\n{loss_type}: max |dpokit - TRL| over 2 steps: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert all(diffs[m] <= 1e-4 for m in METRICS), diffs
    assert diffs["grad_norm"] <= 1e-4 * theirs[0]["grad_norm"] and diffs["learning_rate"] == 0
    assert ours[1]["rewards/margins"] > 0.1  # step 2 rewards are not trivially zero

    weight_diff = max((our_weights[k] - their_weights[k]).abs().max().item() for k in our_weights)
    initial = _initial_weights()
    moved = max((our_weights[k] - initial[k]).abs().max().item() for k in our_weights)  # the comparison is not vacuous
    print(f"{loss_type}: max weight difference {weight_diff:.1e} (largest update {moved:.1e})")
    assert weight_diff <= 1e-5 and moved > 1e-3


def _initial_weights() -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir()).state_dict()


@pytest.mark.slow
def test_logits_metrics_differ_only_by_token_versus_sequence_averaging(tmp_path):
    """Step 1 logits/*: dpokit's is the mean over sequences, TRL's the mean over all completion tokens."""
    write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    ours, _ = run_dpokit(tmp_path, "sigmoid", steps=1)
    theirs, _, _ = run_trl(tmp_path, "sigmoid", steps=1)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    batch = collate_pairs(dpokit_data(tmp_path), pad_token_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != IGNORE_INDEX  # (2B, T-1) completion positions
    per_token = logits.mean(-1)  # (2B, T-1) mean over the vocabulary
    n = len(ROWS)
    for name, rows in (("logits/chosen", slice(0, n)), ("logits/rejected", slice(n, 2 * n))):
        tok, m = per_token[rows], mask[rows]
        sequence_mean = ((tok * m).sum(1) / m.sum(1)).mean().item()
        token_mean = (tok[m].sum() / m.sum()).item()
        assert abs(ours[0][name] - sequence_mean) < 1e-6 and abs(theirs[0][name] - token_mean) < 1e-6
        assert abs(sequence_mean - token_mean) > 1e-4  # a real difference, not noise


@pytest.mark.slow
def test_weight_decay_skips_biases_and_norm_weights_like_hf_trainer(tmp_path):
    """HF's Trainer does not decay biases and norm weights, and neither does dpokit: after one step
    with weight_decay=0.1 every weight, norm weights included, equals TRL's."""
    write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    weight_decay = 0.1
    _, ours = run_dpokit(tmp_path, "sigmoid", steps=1, weight_decay=weight_decay)
    _, theirs, _ = run_trl(tmp_path, "sigmoid", steps=1, weight_decay=weight_decay)
    initial = _initial_weights()
    norms = [k for k in ours if "norm" in k]
    assert norms and all(k.endswith("norm.weight") for k in norms)
    moved = [name for name in ours if not torch.equal(ours[name], initial[name])]
    assert moved, "the step must change the weights"
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-5)
