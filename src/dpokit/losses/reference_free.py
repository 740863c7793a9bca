"""Reference-free losses: they read only the policy's log-probs, so no reference model is built or run.

Notation: log pi(y|x) summed over completion tokens; avg(y) = log pi(y|x) / |y| its per-token
average; eps = label_smoothing. With `ld_alpha` the preference terms use LD-DPO's
reweighted log-probs; NLL terms always use the plain ones. All tensors (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpokit.losses.base import (
    LossConfig,
    LossOutput,
    PairLogps,
    chosen_nll,
    dpo_output,
    lengths,
    policy_logps,
    sigmoid_smoothed,
)


def _average_logps(x: PairLogps, cfg: LossConfig, why: str) -> tuple[torch.Tensor, torch.Tensor]:
    policy_chosen, policy_rejected = policy_logps(x, cfg)
    chosen_len, rejected_len = lengths(x, why=why)
    return policy_chosen / chosen_len, policy_rejected / rejected_len  # (B,), (B,)


def _output(losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, cfg: LossConfig) -> LossOutput:
    # Without a reference the implicit reward is beta * (the log-prob the loss compares), as TRL's CPO/ORPO report.
    return LossOutput(losses, (cfg.beta * chosen).detach(), (cfg.beta * rejected).detach())


def simpo_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6): length-normalised, with a target margin gamma.

    h = beta * (avg(y_w) - avg(y_l)) - gamma;  loss = -(1 - eps) log sigma(h) - eps log sigma(-h).
    Per-token average log-probs. The paper uses beta ~ 2-2.5 and gamma/beta ~ 0.5 (not DPO's 0.1).
    Rewards: beta * avg(y).
    """
    chosen_avg, rejected_avg = _average_logps(x, cfg, why="simpo")
    logits = cfg.beta * (chosen_avg - rejected_avg) - cfg.simpo_gamma
    return _output(sigmoid_smoothed(logits, cfg.label_smoothing), chosen_avg, rejected_avg, cfg)


def cpo_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """CPO (Xu et al. 2024, arXiv 2401.08417, Eq. 3 plus the NLL term of its final objective).

    loss = -(1 - eps) log sigma(beta * (log pi(y_w) - log pi(y_l))) - eps log sigma(-...) + cpo_alpha * NLL(y_w).
    Summed log-probs in the preference term; NLL length-normalised (`nll_normalize`). Rewards: beta * log pi(y).
    """
    policy_chosen, policy_rejected = policy_logps(x, cfg)
    preference = sigmoid_smoothed(cfg.beta * (policy_chosen - policy_rejected), cfg.label_smoothing)
    return _output(preference + cfg.cpo_alpha * chosen_nll(x, cfg), policy_chosen, policy_rejected, cfg)


def _log1mexp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(logp)) for logp < 0, stable on both sides of -log 2 (Maechler 2012)."""
    return torch.where(logp < -0.6931471805599453, torch.log1p(-torch.exp(logp)), torch.log(-torch.expm1(logp)))


def orpo_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, Eqs. 4-7): SFT and preference in one stage; beta is lambda.

    log odds(y) = avg(y) - log(1 - exp(avg(y)))   (odds of the per-token average probability)
    loss = NLL(y_w) - beta * log sigma(log odds(y_w) - log odds(y_l)).
    Per-token average log-probs in the odds; NLL over the chosen completion (`nll_normalize`).
    Rewards: beta * avg(y).
    """
    chosen_avg, rejected_avg = _average_logps(x, cfg, why="orpo")
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    losses = chosen_nll(x, cfg) - cfg.beta * F.logsigmoid(log_odds)
    return _output(losses, chosen_avg, rejected_avg, cfg)


def sft_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """NLL of the chosen completion, length-normalised (`nll_normalize`; default TRL's token mean).

    tokens: loss_i = -log pi(y_w,i|x) / mean_j |y_w,j| (batch mean = TRL's -sum log pi / sum |y_w|);
    sequence: loss_i = -log pi(y_w,i|x) / |y_w,i|. [sigmoid, sft] is RPO (Pang et al. 2024,
    arXiv 2404.19733: DPO plus a length-normalised NLL); [sigmoid, bco_pair, sft] with weights
    [0.8, 0.2, 1.0] is MPO (Wang et al. 2024, arXiv 2411.10442). Rewards: DPO's beta * r when
    reference log-probs are given (as TRL reports), else beta * avg(y) as the other reference-free losses.
    """
    if x.ref_chosen is not None and x.ref_rejected is not None:
        return dpo_output(chosen_nll(x, cfg), x, cfg)
    chosen_len, rejected_len = lengths(x, why="sft")
    return _output(chosen_nll(x, cfg), x.policy_chosen / chosen_len, x.policy_rejected / rejected_len, cfg)
