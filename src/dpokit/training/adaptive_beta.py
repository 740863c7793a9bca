"""beta-DPO's adaptive beta in the loop (loss.beta_schedule=adaptive): the moving threshold M_0 and the beta of each micro-batch.

The paper's batch is what one loss call sees: here a global micro-batch, i.e. the pairs of one
micro-batch on every process (as the authors' code, which gathers the margins over GPUs per
micro-batch). Each micro-batch: the mean margin over all processes (one all-reduce of two numbers),
M_0 moves, and the beta of the formulas in losses/adaptive_beta.py goes into that micro-batch's loss,
the same on every process. With train.grad_accum=1 on one process that is one update per optimizer
step. M_0 lives in RunState.beta_threshold, so every checkpoint carries it and a resume continues it.
A micro-batch whose margins are not finite (its step is skipped) leaves M_0 alone and uses beta_0.
Evaluation uses beta_0 and does not move M_0.
"""

from __future__ import annotations

import math

import torch

from dpokit.losses import LossConfig, adaptive_beta, moved_threshold
from dpokit.training.checkpoint import RunState


class AdaptiveBeta:
    """Gives each micro-batch its beta from its margins, moving M_0 (state.beta_threshold) on the way."""

    def __init__(self, cfg: LossConfig, accelerator, state: RunState) -> None:
        self.cfg, self.accelerator, self.state = cfg, accelerator, state

    def for_micro_batch(self, dummy: bool):
        """margins (B,) -> this micro-batch's beta; a dummy micro-batch (weight 0) adds no margin but joins the all-reduce."""

        def beta_for(margins: torch.Tensor) -> float:
            margins = margins.detach().double()
            packed = torch.stack([margins.sum(), torch.tensor(float(margins.numel()), dtype=torch.float64, device=margins.device)])
            if dummy:
                packed = torch.zeros_like(packed)
            if self.accelerator.num_processes > 1:
                packed = self.accelerator.reduce(packed, reduction="sum")
            total, count = packed.tolist()
            mean = total / count if count > 0 else math.nan
            if not math.isfinite(mean):
                return self.cfg.beta
            self.state.beta_threshold = moved_threshold(self.state.beta_threshold, mean, self.cfg.beta_adaptive_momentum)
            return adaptive_beta(self.cfg.beta, self.cfg.beta_adaptive_alpha, mean, self.state.beta_threshold)

        return beta_for
