"""beta-DPO's batch-adaptive beta (Wu et al. 2024, arXiv 2407.08639, Sec. 4.2): pure numbers, no state.

    M_i     = beta_0 * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]   the pair's implicit reward margin
    M_0    <- m * M_0 + (1 - m) * mean_i M_i                                          the moving threshold (momentum m)
    beta    = beta_0 * (1 + alpha * (mean_i M_i - M_0)), at least BETA_FLOOR            the batch's beta

M_0 moves first and the batch's beta reads the moved M_0, as the authors' code does (so the
batch's own margin counts with weight m: mean - M_0_new = m * (mean - M_0_old)). M_0 starts at 0,
the margin of a policy that still equals its reference. The floor keeps beta positive (a negative
beta would train towards the rejected completion); the authors' code clamps at the same 1e-3.
Their code measures M without beta_0, so their `a` is alpha * beta_0 here. The trainer keeps M_0
(training/adaptive_beta.py); the loss gets the batch's beta as an ordinary loss.beta.
"""

from __future__ import annotations

BETA_FLOOR = 1e-3


def moved_threshold(threshold: float, batch_margin: float, momentum: float) -> float:
    """M_0 after one batch of mean margin `batch_margin`: m * M_0 + (1 - m) * mean_i M_i."""
    return momentum * threshold + (1.0 - momentum) * batch_margin


def adaptive_beta(beta0: float, alpha: float, batch_margin: float, threshold: float) -> float:
    """beta_0 * (1 + alpha * (mean_i M_i - M_0)), floored at BETA_FLOOR; `threshold` is the already moved M_0."""
    return max(BETA_FLOOR, beta0 * (1.0 + alpha * (batch_margin - threshold)))
