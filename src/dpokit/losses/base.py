"""The loss contract (config, inputs, outputs) and the pieces every loss shares.

A loss is a pure function `(PairLogps, LossConfig) -> LossOutput`. It sees only
per-sequence numbers: log-probs summed over completion tokens, completion lengths,
and, for two optional knobs, a few more per-sequence sums documented on PairLogps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch


@dataclass
class LossConfig:
    """Every loss knob; the CLI sets them as `loss.<field>=value`."""

    type: Union[str, list[str]] = "sigmoid"  # a name from LOSSES, or a list of names whose losses are summed
    weights: Optional[list[float]] = None  # one weight per name in `type`; None = all 1.0
    beta: float = 0.1  # KL coefficient (IPO: tau; ORPO: lambda; SimPO: ~2.0): higher stays closer to the reference
    label_smoothing: float = (
        0.0  # probability a label is flipped: cDPO (sigmoid, aot*, simpo, cpo), robust; EXO's epsilon
    )
    ipo_normalize: bool = (
        True  # ipo: divide each log-ratio by its completion length (TRL); False = summed (Azar et al.)
    )
    f_divergence_type: str = "reverse_kl"  # reverse_kl | forward_kl | js | alpha_divergence (f-DPO)
    f_alpha_divergence_coef: float = 0.5  # alpha of alpha_divergence
    ld_alpha: Optional[float] = None  # LD-DPO: weight in [0, 1] of tokens past the shorter completion; None = off
    use_weighting: bool = (
        False  # WPO: weight each pair by the policy's length-normalised probability of both completions
    )
    discopop_tau: float = 0.05  # discopop: temperature of the logistic/exponential blend
    simpo_gamma: float = 0.5  # simpo: target reward margin gamma
    cpo_alpha: float = 1.0  # cpo: weight of the NLL term on the chosen completion
    nll_normalize: str = "tokens"  # NLL terms (sft, cpo, orpo): tokens = token mean over the batch (TRL) | sequence
    desirable_weight: float = 1.0  # kto_loss: weight of desirable examples
    undesirable_weight: float = 1.0  # kto_loss: weight of undesirable examples
    # TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656): every ref_sync_steps optimizer steps (after the update),
    # ref <- ref_sync_alpha * policy + (1 - ref_sync_alpha) * ref, weight by weight. 0 = a fixed reference.
    # A live reference only: the reference cache is turned off (with a notice). TRL: sync_ref_model,
    # ref_model_sync_steps (tau), ref_model_mixup_alpha (alpha, TRL's default 0.6).
    ref_sync_steps: int = 0
    ref_sync_alpha: float = 0.6  # in (0, 1]; 1 = hard update (the reference becomes the policy)
    # beta-DPO (Wu et al. 2024, arXiv 2407.08639): constant | adaptive. adaptive: per micro-batch,
    # M_0 <- m * M_0 + (1 - m) * mean_i M_i, then beta = beta_0 * (1 + alpha * (mean_i M_i - M_0)), floored at 1e-3,
    # where M_i = beta_0 * (r_w - r_l) is the pair's implicit reward margin (loss.beta is beta_0; docs/losses.md)
    beta_schedule: str = "constant"
    beta_adaptive_alpha: float = 0.6  # alpha: how strongly beta follows the batch's margin (0 = constant beta)
    beta_adaptive_momentum: float = 0.9  # m: momentum of the moving average M_0 of the batch margins (starts at 0)
    # SFT mixing (with data.sft_mix_path): weight of the token-mean completion NLL of the mixed SFT rows, added to
    # the step's mean preference loss. Not RPO's NLL on the chosen answers (loss.type=[sigmoid, sft] does that).
    sft_mix_weight: float = 1.0
    # Mixture-of-experts models: weight of the router's load-balancing loss (logged as aux_loss, steps/router_aux.py).
    # None = the model config's router_aux_loss_coef; 0 = logged but not trained on. A dense model refuses a value > 0.
    router_aux_coef: Optional[float] = None


@dataclass
class PairLogps:
    """Per-sequence numbers for a batch of B preference pairs; every tensor is (B,).

    policy_* / ref_*: log pi(y|x) summed over the completion tokens.
    *_lengths: completion token counts (needed by the length-normalised losses and NLL terms).
    LD-DPO (`ld_alpha`) also needs, for all four sequences, the log-prob summed over the
    first min(chosen_length, rejected_length) completion tokens (`*_shared`); the rest
    ("tail") is the full sum minus it. `shared_prefix_logps` computes them from token log-probs.
    WPO (`use_weighting`) needs, for the policy only, sum_t [log pi(y_t|x,y<t) - log sum_v pi(v|x,y<t)^2]
    over the completion tokens (`policy_*_wpo`); the second term is logsumexp(2 * log_softmax(logits)).
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: Optional[torch.Tensor] = None
    ref_rejected: Optional[torch.Tensor] = None
    chosen_lengths: Optional[torch.Tensor] = None
    rejected_lengths: Optional[torch.Tensor] = None
    policy_chosen_shared: Optional[torch.Tensor] = None  # LD-DPO
    policy_rejected_shared: Optional[torch.Tensor] = None
    ref_chosen_shared: Optional[torch.Tensor] = None
    ref_rejected_shared: Optional[torch.Tensor] = None
    policy_chosen_wpo: Optional[torch.Tensor] = None  # WPO
    policy_rejected_wpo: Optional[torch.Tensor] = None


@dataclass
class LossOutput:
    losses: torch.Tensor  # (B,) per-example loss; the batch loss is its mean
    chosen_rewards: torch.Tensor  # (B,) detached implicit reward of the chosen completion
    rejected_rewards: torch.Tensor  # (B,)


LossFn = Callable[[PairLogps, LossConfig], LossOutput]


def _require(x: PairLogps, *names: str, why: str) -> list[torch.Tensor]:
    missing = [n for n in names if getattr(x, n) is None]
    if missing:
        raise ValueError(f"{why} needs PairLogps.{', PairLogps.'.join(missing)}")
    return [getattr(x, n) for n in names]


def lengths(x: PairLogps, why: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion lengths as floats, at least 1 so an empty completion cannot divide by zero (as TRL)."""
    chosen, rejected = _require(x, "chosen_lengths", "rejected_lengths", why=why)
    dtype = x.policy_chosen.dtype
    return chosen.to(dtype).clamp(min=1.0), rejected.to(dtype).clamp(min=1.0)


def _ld(total: torch.Tensor, shared: torch.Tensor, alpha: float) -> torch.Tensor:
    # LD-DPO (Liu et al. 2024, arXiv 2409.06411): log pi_ld = shared + alpha * (total - shared)
    return shared + alpha * (total - shared)


def shared_prefix_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LD-DPO inputs (the `*_shared` fields) from per-token log-probs of a [chosen; rejected] batch.

    token_logps, mask: (2B, T) per-token log-probs and completion-token mask; rows 0..B-1 are the
    chosen completions, rows B..2B-1 the rejected ones of the same pairs.
    returns (2B,): each row's log-probs summed over its first min(|y_w|, |y_l|) completion tokens.
    """
    mask = mask.bool()
    position = mask.cumsum(dim=1)  # (2B, T) 1-based index of each completion token
    chosen_len, rejected_len = mask.sum(dim=1).chunk(2)
    shared = torch.minimum(chosen_len, rejected_len).repeat(2)  # (2B,)
    in_prefix = mask & (position <= shared[:, None])
    return token_logps.masked_fill(~in_prefix, 0.0).sum(dim=1)


def policy_logps(x: PairLogps, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy (chosen, rejected) sequence log-probs, LD-DPO-weighted when `ld_alpha` is set. (B,), (B,)"""
    if cfg.ld_alpha is None:
        return x.policy_chosen, x.policy_rejected
    chosen_shared, rejected_shared = _require(x, "policy_chosen_shared", "policy_rejected_shared", why="ld_alpha")
    return _ld(x.policy_chosen, chosen_shared, cfg.ld_alpha), _ld(x.policy_rejected, rejected_shared, cfg.ld_alpha)


def ref_logps(x: PairLogps, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (chosen, rejected) sequence log-probs, LD-DPO-weighted when `ld_alpha` is set. (B,), (B,)"""
    ref_chosen, ref_rejected = _require(x, "ref_chosen", "ref_rejected", why="this loss (it is reference-based)")
    if cfg.ld_alpha is None:
        return ref_chosen, ref_rejected
    chosen_shared, rejected_shared = _require(x, "ref_chosen_shared", "ref_rejected_shared", why="ld_alpha")
    return _ld(ref_chosen, chosen_shared, cfg.ld_alpha), _ld(ref_rejected, rejected_shared, cfg.ld_alpha)


def log_ratios(x: PairLogps, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y|x) - log ref(y|x) for chosen and rejected, summed over tokens (LD-weighted if set). (B,), (B,)"""
    policy_chosen, policy_rejected = policy_logps(x, cfg)
    ref_chosen, ref_rejected = ref_logps(x, cfg)
    return policy_chosen - ref_chosen, policy_rejected - ref_rejected


def dpo_output(losses: torch.Tensor, x: PairLogps, cfg: LossConfig) -> LossOutput:
    """Attach DPO's implicit rewards beta * (log pi - log ref) (Rafailov et al. 2023, Eq. 5), as TRL reports."""
    chosen_ratio, rejected_ratio = log_ratios(x, cfg)
    return LossOutput(losses, (cfg.beta * chosen_ratio).detach(), (cfg.beta * rejected_ratio).detach())


# nll_normalize -> the per-example divisor of -log pi(y_w|x), given the chosen lengths (B,)
NLL_NORMALIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tokens": lambda n: n.mean(),
    "sequence": lambda n: n,
}


def chosen_nll(x: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """Per-example NLL term of the chosen completion, length-normalised. (B,)

    nll_normalize="tokens" (TRL's sft/CPO): the batch's token-mean NLL, -sum_i logp_i / sum_i len_i,
    written per example as -logp_i / mean_j(len_j), so the batch mean is exactly TRL's value and
    each example keeps its own share (a real per-example loss, not one number broadcast).
    nll_normalize="sequence": -logp_i / len_i, every example the same weight whatever its length.
    Uses the plain log-probs: LD-DPO reweights only the preference terms (as TRL's sft).
    """
    chosen_len, _ = lengths(x, why="an NLL term")
    return -x.policy_chosen / NLL_NORMALIZE[cfg.nll_normalize](chosen_len)


def sigmoid_smoothed(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """cDPO's smoothed logistic loss (Mitchell 2023): -(1 - eps) log s(h) - eps log s(-h). (B,)"""
    log_sigmoid = torch.nn.functional.logsigmoid
    return -(1 - label_smoothing) * log_sigmoid(logits) - label_smoothing * log_sigmoid(-logits)


def wpo_weights(x: PairLogps) -> torch.Tensor:
    """WPO pair weights (Zhou et al. 2024, arXiv 2406.11827, Eq. 2), detached. (B,)

    w(y) = exp( (1/|y|) sum_t log[ pi(y_t|x,y<t) / sum_v pi(v|x,y<t)^2 ] ): the policy's length-normalised
    probability of y, each token's probability divided by sum_v pi(v)^2, the expected probability of a
    token the policy samples itself, so a peaked distribution alone does not make y look on-policy.
    The pair weight is w(y_w) * w(y_l). A weight, not a target: no gradient flows through it.
    """
    chosen_wpo, rejected_wpo = _require(x, "policy_chosen_wpo", "policy_rejected_wpo", why="use_weighting (WPO)")
    chosen_len, rejected_len = lengths(x, why="use_weighting (WPO)")
    return torch.exp(chosen_wpo / chosen_len + rejected_wpo / rejected_len).detach()
