"""Metric averaging over every micro-batch (and every rank) and the metrics.jsonl log.

TRL's names: loss, rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected, logits/chosen,
logits/rejected, entropy, mean_token_accuracy, num_tokens (a running total kept
by the trainer), grad_norm, learning_rate, epoch;
plus kl/chosen (with a live reference), KL(policy || reference) along the chosen
completions, in nats per sequence. A step returns per-example values, or per-token
values for token means (entropy, mean_token_accuracy): MetricSums averages over
whatever the entries are.
Eval metrics carry TRL's "eval_" prefix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


class MetricSums:
    """Sums of per-example values and example counts, so that an average over any
    number of micro-batches of any size is the average over examples, never the
    average of per-batch averages or the last batch's value."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, values: torch.Tensor) -> None:
        values = values.detach().float()
        self.sums[name] = self.sums.get(name, 0.0) + values.sum().item()
        self.counts[name] = self.counts.get(name, 0.0) + values.numel()

    def add_scalar(self, name: str, value: float, weight: float = 1.0) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value * weight
        self.counts[name] = self.counts.get(name, 0.0) + weight

    def reduce(self, accelerator=None) -> dict[str, float]:
        """Averages, summed across processes first when an Accelerator is given."""
        names = sorted(self.sums)
        if not names:
            return {}
        packed = torch.tensor([[self.sums[n] for n in names], [self.counts[n] for n in names]], dtype=torch.float64)
        if accelerator is not None and accelerator.num_processes > 1:
            packed = accelerator.reduce(packed.to(accelerator.device), reduction="sum").cpu()
        return {n: (packed[0, i] / packed[1, i]).item() if packed[1, i] > 0 else math.nan for i, n in enumerate(names)}

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
