"""Preference losses: pure functions of per-sequence log-probs, chosen by name from one table.

Every loss takes a `PairLogps` (policy and reference log-probs of the chosen and
rejected completions, summed over completion tokens, plus completion lengths)
and the `LossConfig`, and returns a `LossOutput` of per-example losses and the
implicit rewards reported as `rewards/chosen` and `rewards/rejected`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass
class LossConfig:
    type: str = "sigmoid"  # a name from LOSSES
    beta: float = 0.1  # KL coefficient: higher keeps the policy closer to the reference
    label_smoothing: float = 0.0  # cDPO: assumed probability that a preference label is flipped


@dataclass
class PairLogps:
    """Per-sequence log-probs for a batch of B preference pairs; every tensor is (B,)."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: Optional[torch.Tensor] = None
    ref_rejected: Optional[torch.Tensor] = None
    chosen_lengths: Optional[torch.Tensor] = None
    rejected_lengths: Optional[torch.Tensor] = None


@dataclass
class LossOutput:
    losses: torch.Tensor  # (B,) per-example loss; the batch loss is its mean
    chosen_rewards: torch.Tensor  # (B,) detached implicit reward of the chosen completion
    rejected_rewards: torch.Tensor  # (B,)


def _log_ratios(x: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ref_chosen is None or x.ref_rejected is None:
        raise ValueError("this loss needs reference log-probs (ref_chosen, ref_rejected)")
    return x.policy_chosen - x.ref_chosen, x.policy_rejected - x.ref_rejected


def sigmoid_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """DPO (Rafailov et al. 2023, Eq. 7), with cDPO label smoothing (Mitchell 2023).

    h = beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]
    loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)
    Log-probs are summed over completion tokens. eps = label_smoothing = 0 is DPO.
    Rewards: beta * (log pi - log ref) for each completion.
    """
    chosen_ratio, rejected_ratio = _log_ratios(x)
    h = cfg.beta * (chosen_ratio - rejected_ratio)
    eps = cfg.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    return LossOutput(losses, (cfg.beta * chosen_ratio).detach(), (cfg.beta * rejected_ratio).detach())


LossFn = Callable[[PairLogps, LossConfig], LossOutput]

LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid_loss,
}

# Losses that never read reference log-probs: no reference model is built or run for them.
REFERENCE_FREE: set[str] = set()


def get_loss(name: str) -> LossFn:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss.type {name!r}; valid: {', '.join(sorted(LOSSES))}") from None


def compute_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    return get_loss(cfg.type)(x, cfg)
