"""Length-controlled win rate, after AlpacaEval 2 (Dubois et al. 2024, arXiv:2404.04475, section 3).

A judge that prefers longer answers inflates the win rate of a policy that learned to write longer ones.
AlpacaEval 2 fits a logistic model (a GLM) of the judge's preference and reads the win rate off it with the
length term set to zero: "what the win rate would be if the two answers had the same length".

Per judgment i (policy vs baseline on prompt g(i), preference y_i in [0, 1], ties 0.5):

    logit P(policy wins) = theta + phi * tanh(delta_i / sd(delta)) + gamma_g(i)

  delta_i   policy length minus baseline length (tokens here), scaled by its standard deviation and squashed
            by tanh, as AlpacaEval does, so a few very long answers cannot dominate the fit
  theta     the policy's quality advantage at equal length
  phi       how much the judge rewards length
  gamma_g   the prompt's difficulty (AlpacaEval's instance term). AlpacaEval estimates instance difficulty across
            many models; with one policy and one baseline it is a per-prompt intercept with an L2 penalty
            (a random effect), identified when a prompt has several samples; it shrinks to 0 otherwise.

    LC win rate = mean_i sigmoid(theta + gamma_g(i))      (the length term removed)
    raw win rate = mean_i y_i

The fit maximises the penalised log-likelihood by Newton's method (numpy). theta and phi have a small L2
penalty too, which keeps the fit finite when length separates the judgments perfectly ("longer always wins"):
the penalty then splits the credit by the margin, and theta stays near 0. The standard error is a bootstrap
over prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class LCFit:
    theta: float  # quality advantage at equal length (log-odds)
    phi: float  # length effect (log-odds per unit of tanh(delta / sd))
    gamma: np.ndarray  # per-prompt terms
    lc_win_rate: float
    raw_win_rate: float


def fit_lc(
    wins: Sequence[float],
    length_diff: Sequence[float],
    groups: Sequence | None = None,
    *,
    l2_fixed: float = 0.01,
    l2_instance: float = 1.0,
    iters: int = 100,
) -> LCFit:
    """Fit the GLM above to judgments `wins` (1 policy better, 0 baseline better, 0.5 tie) with their length differences.

    groups: the prompt of each judgment (any hashable ids); None: no instance terms.
    """
    y = np.asarray(wins, dtype=float)
    delta = np.asarray(length_diff, dtype=float)
    if y.shape != delta.shape or y.ndim != 1 or len(y) == 0:
        raise ValueError(f"need as many length differences as judgments (got {len(y)} and {len(delta)}), at least one")
    scale = delta.std()
    x = np.column_stack([np.ones_like(delta), np.tanh(delta / scale) if scale > 0 else np.zeros_like(delta)])  # (N, 2)
    if groups is None:
        index, num_groups, l2_g = np.zeros(len(y), dtype=int), 1, 1e12  # one group pinned at 0: no instance terms
    else:
        ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        index, num_groups, l2_g = np.array([ids[g] for g in groups]), len(ids), l2_instance
    beta, gamma = np.zeros(2), np.zeros(num_groups)
    for _ in range(iters):
        # Newton steps on the penalised log-likelihood (concave, so this converges). The Hessian is a 2x2 block for
        # (theta, phi), a diagonal block for the prompt terms and their coupling: solved by its Schur complement.
        p = 1.0 / (1.0 + np.exp(-(x @ beta + gamma[index])))
        weight, residual = p * (1 - p), y - p
        grad_b = x.T @ residual - l2_fixed * beta
        grad_g = np.bincount(index, residual, num_groups) - l2_g * gamma
        h_bb = (x * weight[:, None]).T @ x + l2_fixed * np.eye(2)
        h_bg = np.stack([np.bincount(index, weight * x[:, k], num_groups) for k in range(2)])  # (2, G)
        h_gg = np.bincount(index, weight, num_groups) + l2_g  # the diagonal
        step_b = np.linalg.solve(h_bb - (h_bg / h_gg) @ h_bg.T, grad_b - h_bg @ (grad_g / h_gg))
        step_g = (grad_g - h_bg.T @ step_b) / h_gg
        beta, gamma = beta + step_b, gamma + step_g
        if max(np.abs(step_b).max(), np.abs(step_g).max()) < 1e-10:
            break
    lc = float(np.mean(1.0 / (1.0 + np.exp(-(beta[0] + gamma[index])))))
    return LCFit(theta=float(beta[0]), phi=float(beta[1]), gamma=gamma, lc_win_rate=lc, raw_win_rate=float(y.mean()))


def lc_win_rate(
    wins: Sequence[float],
    length_diff: Sequence[float],
    groups: Sequence[int] | None = None,
    *,
    bootstrap: int = 200,
    seed: int = 0,
) -> dict:
    """The LC and raw win rates with bootstrap standard errors (resampling prompts), and the fitted terms."""
    fit = fit_lc(wins, length_diff, groups)
    y, delta = np.asarray(wins, dtype=float), np.asarray(length_diff, dtype=float)
    labels = list(range(len(y))) if groups is None else list(groups)
    by_group: dict = {}
    for i, g in enumerate(labels):
        by_group.setdefault(g, []).append(i)
    members = list(by_group.values())
    rng = np.random.default_rng(seed)
    lc_draws, raw_draws = [], []
    for _ in range(bootstrap if len(members) > 1 else 0):
        chosen = rng.integers(0, len(members), len(members))
        rows = np.concatenate([members[c] for c in chosen])
        draw_groups = None if groups is None else np.repeat(np.arange(len(chosen)), [len(members[c]) for c in chosen])
        resampled = fit_lc(y[rows], delta[rows], draw_groups)
        lc_draws.append(resampled.lc_win_rate)
        raw_draws.append(resampled.raw_win_rate)

    def sem(draws):
        return float(np.std(draws, ddof=1)) if len(draws) > 1 else math.nan

    return {
        "lc_win_rate": fit.lc_win_rate,
        "lc_win_rate_sem": sem(lc_draws),
        "raw_win_rate": fit.raw_win_rate,
        "raw_win_rate_sem": sem(raw_draws),
        "lc_theta": fit.theta,
        "lc_length_coef": fit.phi,
        "num_judgments": len(y),
        "num_prompts": len(members),
        "mean_length_diff": float(delta.mean()),
    }
