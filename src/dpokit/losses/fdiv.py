"""f-DPO: the divergence that keeps the policy near the reference (Wang et al. 2023, arXiv 2309.16240).

Under an f-divergence constraint the implicit reward is beta * f'(pi/ref) instead of
beta * log(pi/ref). Each entry maps the log-ratio
u = log pi(y|x) - log ref(y|x) (summed over tokens) to the score f'(exp(u)); the losses
built on the chosen-minus-rejected score difference then use these scores. The
beta * log Z(x) term cancels only in that difference, so losses that use one
completion's reward on its own have no f-divergence form and reject a non-default type.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from dpokit.losses.base import LossConfig, PairLogps, log_ratios

# exp() of a clamped exponent must survive the cast back to the input dtype (TRL's thresholds):
# exp(11) < float16 max 65504; exp(80) < float32/bfloat16 max 3.4e38.
_EXP_CLAMP = {torch.float16: 11.0}
_EXP_CLAMP_DEFAULT = 80.0


def _reverse_kl(u: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    return u  # f(t) = t log t, f'(t) = log t + 1; the constant cancels: standard DPO


def _forward_kl(u: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    return 1 - torch.exp(-u)  # f(t) = -log t, f'(t) = -1/t; shifted by the constant 1 as TRL


def _js(u: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    return math.log(2) + F.logsigmoid(u)  # f'(t) = log(2t / (1 + t)) = log 2 + log sigmoid(log t)


def _alpha(u: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """f'(t) = (t^(alpha - 1) - 1) / (alpha - 1); alpha -> 1 is reverse KL."""
    alpha = cfg.f_alpha_divergence_coef
    if abs(alpha - 1.0) < 1e-6:  # the limit is log t; the formula would divide by ~0
        return u
    # Work in at least float32 and clamp: for alpha < 1 a very negative log-ratio makes exp overflow.
    work = torch.promote_types(u.dtype, torch.float32)
    exponent = ((alpha - 1.0) * u).to(work).clamp(max=_EXP_CLAMP.get(u.dtype, _EXP_CLAMP_DEFAULT))
    return (torch.expm1(exponent) / (alpha - 1.0)).to(u.dtype)


F_DIVERGENCES: dict[str, Callable[[torch.Tensor, LossConfig], torch.Tensor]] = {
    "reverse_kl": _reverse_kl,
    "forward_kl": _forward_kl,
    "js": _js,
    "js_divergence": _js,  # TRL's spelling
    "alpha_divergence": _alpha,
}


def scores(x: PairLogps, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """f'(pi/ref) of the chosen and rejected completions under `f_divergence_type`. (B,), (B,)"""
    f_prime = F_DIVERGENCES[cfg.f_divergence_type]
    chosen_ratio, rejected_ratio = log_ratios(x, cfg)
    return f_prime(chosen_ratio, cfg), f_prime(rejected_ratio, cfg)
