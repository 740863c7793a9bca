"""Crafted run directories for the report tests: healthy, with warnings, stopped, and with missing keys.

Each history is written the way the trainer writes it: train records every
`every` steps, eval records prefixed eval_, NaN as null, and (when `record`)
the diagnosis records the live detectors would have appended after the record
that raised them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import yaml

from dpokit.config import Config
from dpokit.detectors import FailureDetectors


def _wiggle(step: int, scale: float) -> float:
    """Deterministic batch noise, so the curves look like training curves and the tests stay exact."""
    return scale * math.sin(step * 1.7) * math.cos(step * 0.3)


def healthy_records(steps: int = 60, every: int = 2, eval_every: int = 10) -> list[dict]:
    records = []
    for step in range(every, steps + 1, every):
        progress = 1 - math.exp(-step / 18)
        margin = 1.6 * progress + _wiggle(step, 0.05)
        records.append(
            {
                "loss": 0.693 - 0.45 * progress + _wiggle(step, 0.02),
                "rewards/chosen": 0.4 * progress,
                "rewards/rejected": 0.4 * progress - margin,
                "rewards/margins": margin,
                "rewards/accuracies": min(1.0, 0.5 + 0.45 * progress + _wiggle(step, 0.03)),
                "logps/chosen": -42.0 + 2 * progress,
                "logps/rejected": -44.0 - 10 * progress,
                "logits/chosen": -1.2,
                "logits/rejected": -1.3,
                "kl/chosen": 1.4 * progress,
                "entropy": 1.9 - 0.2 * progress,
                "mean_token_accuracy": 0.42 + 0.05 * progress,
                "grad_norm": 2.5 * math.exp(-step / 25) + 0.4 + _wiggle(step, 0.1),
                "step": step,
                "epoch": round(step / steps, 4),
                "learning_rate": 5e-6 * (1 - (step - every) / steps),
                "tokens_per_second": 1800.0 + _wiggle(step, 60.0),
                "padding_fraction": 0.04,
                "mfu": 0.31 + _wiggle(step, 0.01),
            }
        )
        if step == every:  # the run-level peak, written once (training/throughput.py)
            records[-1].update(mfu_peak=989e12, mfu_peak_source="table: NVIDIA H100 80GB HBM3, bf16 dense")
        if step % eval_every == 0:
            records.append(
                {
                    "step": step,
                    "eval_loss": 0.70 - 0.42 * progress,
                    "eval_rewards/chosen": 0.35 * progress,
                    "eval_rewards/rejected": -1.2 * progress,
                    "eval_rewards/margins": 1.55 * progress,
                    "eval_rewards/accuracies": 0.5 + 0.42 * progress,
                    "eval_logps/chosen": -41.0 + 2 * progress,
                    "eval_logps/rejected": -43.5 - 9 * progress,
                    "eval_kl/chosen": 1.3 * progress,
                    "eval_mean_length": 20.0 + 2 * progress,
                    "eval_entropy": 1.9 - 0.2 * progress,
                }
            )
    return records


def drifting_records(steps: int = 60, every: int = 2, eval_every: int = 10) -> list[dict]:
    """KL past 5 then 10 nats, eval loss rising at the end, sampled completions growing: warnings."""
    records = []
    for record in healthy_records(steps, every, eval_every):
        step = record["step"]
        if "loss" in record:
            record["kl/chosen"] = 0.2 * step
            record["rewards/margins"] = 0.08 * step + _wiggle(step, 0.05)
        else:
            record["eval_loss"] = 0.5 + 0.004 * (step - 30) ** 2 / 10
            record["eval_mean_length"] = 20.0 * (1 + step / 40)
            record["eval_kl/chosen"] = 0.19 * step
        records.append(record)
    return records


def stopped_records() -> list[dict]:
    """A run whose loss went NaN at step 24: the trainer logged it as null and stopped."""
    records = [r for r in healthy_records(24, 2, 10)]
    records[-1]["loss"] = None
    records[-1]["grad_norm"] = None
    return records


def kto_records(steps: int = 20) -> list[dict]:
    """KTO's metrics: no rewards/margins, no kl/chosen (its KL baseline is `kl`), no eval records."""
    return [
        {
            "loss": 0.69 - 0.01 * s,
            "kl": 0.05 * s,
            "rewards/chosen": 0.02 * s,
            "rewards/rejected": -0.02 * s,
            "rewards/accuracies": 0.5 + 0.01 * s,
            "logps/chosen": -30.0,
            "logps/rejected": -31.0 - 0.1 * s,
            "grad_norm": 1.0,
            "step": s,
            "learning_rate": 1e-5,
        }
        for s in range(1, steps + 1)
    ]


def with_diagnoses(records: list[dict]) -> list[dict]:
    """The records as the trainer writes them: each followed by the diagnoses it raised."""
    detectors, out = FailureDetectors(), []
    for record in records:
        out.append(record)
        for diagnosis in detectors.update(record):
            out.append({"step": diagnosis.step, "diagnosis": dataclasses.asdict(diagnosis)})
        if detectors.should_stop:
            break
    return out


def default_summary(pairs: int = 240, eval_pairs: int = 60) -> dict:
    lengths = {
        "prompt": {"min": 2, "p50": 4, "p90": 5, "p99": 5, "max": 5},
        "chosen": {"min": 2, "p50": 3, "p90": 5, "p99": 5, "max": 5},
        "rejected": {"min": 2, "p50": 3, "p90": 5, "p99": 5, "max": 5},
    }
    split = lambda n, skipped: {  # noqa: E731
        "rows_read": n + skipped,
        "rows_used": n,
        "rows_skipped": skipped,
        "held_out": 0,
        "skipped_by_reason": {"empty chosen": skipped} if skipped else {},
        "skipped_examples": {"empty chosen": ["train.jsonl:7 (chosen)"]} if skipped else {},
        "layouts": {"prompt_chosen_rejected": n + skipped},
        "pairs": n,
        "truncated": {"prompt": 0, "chosen": 1, "rejected": 0},
        "token_lengths": lengths,
    }
    return {"train": split(pairs, 3), "eval": split(eval_pairs, 0)}


def write_run(
    run_dir: Path,
    records: list[dict],
    *,
    config: Optional[dict] = None,
    summary: Optional[dict] = None,
    final: bool = True,
    cut_last_line: bool = False,
) -> Path:
    """A run directory with metrics.jsonl, and config.yaml / data_summary.json / final/ unless told otherwise."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records]
    if cut_last_line:
        lines[-1] = lines[-1][: len(lines[-1]) // 2]
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if config is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if summary is not None:
        (run_dir / "data_summary.json").write_text(json.dumps(summary, indent=2))
    if final:
        (run_dir / "final").mkdir(exist_ok=True)
    return run_dir


def demo_config(**train) -> dict:
    cfg = Config().to_dict()
    cfg["model"]["name_or_path"] = "Qwen/Qwen2.5-0.5B-Instruct"
    cfg["data"]["path"] = "data/prefs.jsonl"
    cfg["optim"]["lr"] = 5e-6
    cfg["train"].update({"max_steps": 60, "logging_steps": 2, "eval_steps": 10, **train})
    cfg["out_dir"] = "runs/crafted"
    return cfg
