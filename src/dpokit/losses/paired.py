"""Reference-based paired losses: functions of the policy/reference log-ratios of (chosen, rejected).

Notation: r_w = log pi(y_w|x) - log ref(y_w|x), r_l likewise for the rejected completion,
log-probs summed over completion tokens unless a docstring says otherwise; s_w, s_l are
the f-divergence scores f'(pi/ref) (= r_w, r_l under the default reverse KL; see fdiv.py);
sigma is the logistic function; eps = label_smoothing. Every loss reports DPO's implicit
rewards beta * r_w, beta * r_l (as TRL does for all its DPO loss types). All tensors (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpokit.losses.base import (
    LossConfig,
    LossOutput,
    PairLogps,
    dpo_output,
    lengths,
    log_ratios,
    policy_logps,
    ref_logps,
    sigmoid_smoothed,
)
from dpokit.losses.fdiv import scores


def _margin(x: PairLogps, cfg: LossConfig) -> torch.Tensor:
    chosen_scores, rejected_scores = scores(x, cfg)
    return chosen_scores - rejected_scores  # (B,) s_w - s_l


def sigmoid_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7), with cDPO label smoothing (Mitchell 2023).

    h = beta * (s_w - s_l);  loss = -(1 - eps) log sigma(h) - eps log sigma(-h). Summed log-probs.
    eps = 0 is DPO. (TRL 1.16's "sigmoid" ignores label_smoothing; we keep cDPO here.)
    """
    return dpo_output(sigmoid_smoothed(cfg.beta * _margin(x, cfg), cfg.label_smoothing), x, cfg)


def robust_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409, its unbiased loss): unbiased under label flips with prob. eps.

    h = beta * (s_w - s_l);  loss = [-(1 - eps) log sigma(h) + eps log sigma(-h)] / (1 - 2 eps). Summed log-probs.
    """
    h = cfg.beta * _margin(x, cfg)
    eps = cfg.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)
    return dpo_output(losses, x, cfg)


def ipo_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17; beta is their tau).

    loss = (s_w / |y_w| - s_l / |y_l| - 1 / (2 beta))^2 with `ipo_normalize` (TRL's default: per-token
    average log-ratios, confirmed with the IPO authors according to TRL), or
    loss = (s_w - s_l - 1 / (2 beta))^2 with summed log-probs (the paper's own code) when False.
    """
    chosen_scores, rejected_scores = scores(x, cfg)
    if cfg.ipo_normalize:
        chosen_len, rejected_len = lengths(x, why="ipo with ipo_normalize")
        chosen_scores, rejected_scores = chosen_scores / chosen_len, rejected_scores / rejected_len
    return dpo_output((chosen_scores - rejected_scores - 1 / (2 * cfg.beta)) ** 2, x, cfg)


def hinge_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """SLiC-HF calibration loss (Zhao et al. 2023, arXiv 2305.10425, calibration loss with margin 1/beta, scaled by beta).

    loss = max(0, 1 - beta * (s_w - s_l)). Summed log-probs.
    """
    return dpo_output(F.relu(1 - cfg.beta * _margin(x, cfg)), x, cfg)


def exo_pair_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """EXO-pref (Ji et al. 2024, arXiv 2402.00856, Eq. 16): KL(p_theta || p_target) over the two completions.

    p_theta = (sigma(h), sigma(-h)) with h = beta * (s_w - s_l); p_target = (1 - eps, eps), eps > 0 (paper: 1e-3).
    loss = sigma(h) (log sigma(h) - log(1 - eps)) + sigma(-h) (log sigma(-h) - log eps). Summed log-probs.
    """
    h = cfg.beta * _margin(x, cfg)
    eps = torch.tensor(cfg.label_smoothing, dtype=h.dtype, device=h.device)
    chosen_term = torch.sigmoid(h) * (F.logsigmoid(h) - torch.log1p(-eps))
    rejected_term = torch.sigmoid(-h) * (F.logsigmoid(-h) - torch.log(eps))
    return dpo_output(chosen_term + rejected_term, x, cfg)


def nca_pair_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """NCA, pairwise (Chen et al. 2024, arXiv 2402.05369, NCA with K=2 responses): pushes the chosen reward up in absolute terms.

    loss = -log sigma(beta r_w) - 1/2 log sigma(-beta r_w) - 1/2 log sigma(-beta r_l). Summed log-probs.
    """
    chosen_ratio, rejected_ratio = log_ratios(x, cfg)
    chosen, rejected = cfg.beta * chosen_ratio, cfg.beta * rejected_ratio
    losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    return dpo_output(losses, x, cfg)


def bco_pair_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """BCO, paired (Jung et al. 2024, arXiv 2404.04656, BCO loss with reward shift delta = 0).

    loss = -log sigma(beta r_w) - log sigma(-beta r_l): each completion classified good/bad on its own.
    Summed log-probs. TRL 1.16 uses no running-mean shift either.
    """
    chosen_ratio, rejected_ratio = log_ratios(x, cfg)
    losses = -F.logsigmoid(cfg.beta * chosen_ratio) - F.logsigmoid(-cfg.beta * rejected_ratio)
    return dpo_output(losses, x, cfg)


def sppo_hard_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv 2405.00675, Eq. 4.7 with P = 1 / 0).

    loss = (r_w - 1 / (2 beta))^2 + (r_l + 1 / (2 beta))^2. Summed log-probs.
    """
    chosen_ratio, rejected_ratio = log_ratios(x, cfg)
    losses = (chosen_ratio - 0.5 / cfg.beta) ** 2 + (rejected_ratio + 0.5 / cfg.beta) ** 2
    return dpo_output(losses, x, cfg)


def aot_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """AOT, paired (Melnyk et al. 2024, arXiv 2406.05882): first-order stochastic dominance via sorting.

    d_i = sort_i(log pi(y_w) - log pi(y_l)) - sort_i(log ref(y_w) - log ref(y_l)), sorted over the batch;
    loss_i = -(1 - eps) log sigma(beta d_i) - eps log sigma(-beta d_i). Summed log-probs.
    The i-th loss belongs to the i-th order statistic, not to pair i: it needs a batch, and
    WPO's per-pair weights do not apply.
    """
    policy_chosen, policy_rejected = policy_logps(x, cfg)
    ref_chosen, ref_rejected = ref_logps(x, cfg)
    policy_sorted, _ = torch.sort(policy_chosen - policy_rejected, dim=0)
    ref_sorted, _ = torch.sort(ref_chosen - ref_rejected, dim=0)
    return dpo_output(sigmoid_smoothed(cfg.beta * (policy_sorted - ref_sorted), cfg.label_smoothing), x, cfg)


def aot_unpaired_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """AOT, unpaired (Melnyk et al. 2024, arXiv 2406.05882): sorted r_w against sorted r_l.

    d_i = sort_i(r_w) - sort_i(r_l) over the batch; loss_i = -(1 - eps) log sigma(beta d_i) - eps log sigma(-beta d_i).
    Summed log-probs. Batch-coupled like aot.
    """
    chosen_ratio, rejected_ratio = log_ratios(x, cfg)
    chosen_sorted, _ = torch.sort(chosen_ratio, dim=0)
    rejected_sorted, _ = torch.sort(rejected_ratio, dim=0)
    return dpo_output(sigmoid_smoothed(cfg.beta * (chosen_sorted - rejected_sorted), cfg.label_smoothing), x, cfg)


def apo_zero_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7): chosen better than the model's own outputs.

    loss = (1 - sigma(beta r_w)) + sigma(beta r_l): raise the chosen likelihood, lower the rejected. Summed log-probs.
    """
    chosen_ratio, rejected_ratio = log_ratios(x, cfg)
    losses = 1 - torch.sigmoid(cfg.beta * chosen_ratio) + torch.sigmoid(cfg.beta * rejected_ratio)
    return dpo_output(losses, x, cfg)


def apo_down_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 8): chosen worse than the model's own outputs.

    loss = sigma(beta r_w) + (1 - sigma(beta (r_w - r_l))): lower both, the rejected more. Summed log-probs.
    """
    chosen_ratio, rejected_ratio = log_ratios(x, cfg)
    losses = torch.sigmoid(cfg.beta * chosen_ratio) + 1 - torch.sigmoid(cfg.beta * (chosen_ratio - rejected_ratio))
    return dpo_output(losses, x, cfg)


def discopop_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """DiscoPOP / log-ratio modulated loss (Lu et al. 2024, arXiv 2406.08414, Eq. 5).

    h = beta * (s_w - s_l), m = sigma(h / tau);  loss = (1 - m) * (-log sigma(h)) + m * exp(-h). Summed log-probs.
    """
    h = cfg.beta * _margin(x, cfg)
    mix = torch.sigmoid(h / cfg.discopop_tau)
    return dpo_output((1 - mix) * -F.logsigmoid(h) + mix * torch.exp(-h), x, cfg)


def sigmoid_norm_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """Length-normalised DPO (as in Tulu 3, Lambert et al. 2024, arXiv 2411.15124, length-normalised DPO).

    loss = -log sigma(beta * (s_w / |y_w| - s_l / |y_l|)): per-token average log-ratios, so a longer
    completion earns no larger margin. Rewards stay the summed beta * r (as TRL).
    """
    chosen_scores, rejected_scores = scores(x, cfg)
    chosen_len, rejected_len = lengths(x, why="sigmoid_norm")
    losses = -F.logsigmoid(cfg.beta * (chosen_scores / chosen_len - rejected_scores / rejected_len))
    return dpo_output(losses, x, cfg)
