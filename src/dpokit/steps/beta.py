"""beta-DPO's adaptive beta for the paired steps (loss.beta_schedule=adaptive): the beta of each micro-batch.

The paper's batch is what one loss call sees: here a global micro-batch, i.e. the pairs of one
micro-batch on every process (as the authors' code, which gathers the margins over GPUs per
micro-batch). Each micro-batch: the mean margin over all processes (one all-reduce of two numbers through
ctx.group), M_0 moves, and the beta of the formulas in losses/adaptive_beta.py goes into that micro-batch's
loss, the same on every process. With train.grad_accum=1 on one process that is one update per optimizer
step. A micro-batch whose margins are not finite (its step is skipped) leaves M_0 alone and uses beta_0;
a dummy micro-batch adds no margin but joins the all-reduce. Evaluation has no `ctx.beta`: beta_0, M_0 unmoved.

`MovingThreshold` is the one optimizer step's M_0, handed to its micro-batches in their StepContext; the
run reads it from RunState.beta_threshold before the step and writes it back after (training/adaptive_beta.py),
so every checkpoint carries it and a resume continues it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dpokit.losses import adaptive_beta, moved_threshold
from dpokit.steps.base import StepContext


@dataclass
class MovingThreshold:
    """M_0 over one optimizer step: each micro-batch's `batch_beta` moves it, in micro-batch order."""

    threshold: float = 0.0  # M_0

    def batch_beta(self, margins: torch.Tensor, ctx: StepContext) -> float:
        """margins M_i (B,) of this micro-batch -> its beta; M_0 moves by the global micro-batch's mean margin."""
        loss = ctx.cfg.loss
        margins = margins.detach().double()
        packed = torch.stack(
            [margins.sum(), torch.tensor(float(margins.numel()), dtype=torch.float64, device=margins.device)]
        )
        if ctx.dummy:
            packed = torch.zeros_like(packed)
        if ctx.processes > 1:
            packed = ctx.group.reduce(packed, reduction="sum")
        total, count = packed.tolist()
        mean = total / count if count > 0 else math.nan
        if not math.isfinite(mean):
            return loss.beta
        self.threshold = moved_threshold(self.threshold, mean, loss.beta_adaptive_momentum)
        return adaptive_beta(loss.beta, loss.beta_adaptive_alpha, mean, self.threshold)
