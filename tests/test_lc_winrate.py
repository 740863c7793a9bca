"""Length-controlled win rate: a judge that only rewards length gives LC near 0.5 while the raw win rate is near 1."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpokit.online.suites.lc_winrate import fit_lc, lc_win_rate


def _lengths(n, seed):
    """Policy minus baseline length, in tokens: the policy is longer on about 95% of the prompts."""
    return np.random.default_rng(seed).uniform(-20, 400, n)


@pytest.mark.parametrize("seed", range(4))
def test_longer_always_wins_and_quality_is_even(seed):
    delta = _lengths(1000, seed)
    wins = (delta > 0).astype(float)  # the judge picks the longer answer; which one is better is a coin flip it ignores
    out = lc_win_rate(wins, delta, bootstrap=30, seed=seed)
    assert out["raw_win_rate"] > 0.93
    # Length separates these judgments perfectly, so only the few pairs near equal length pin the LC win rate:
    # it lands in 0.39-0.58 over seeds 0-5 (measured), and its bootstrap error says so.
    assert abs(out["lc_win_rate"] - 0.5) < 0.15
    assert out["lc_length_coef"] > 10 and 0 < out["lc_win_rate_sem"] < 0.15


@pytest.mark.parametrize("seed", range(3))
def test_a_noisy_length_judge_with_even_quality_and_prompt_difficulty(seed):
    rng = np.random.default_rng(100 + seed)
    groups = np.repeat(np.arange(500), 4)  # 500 prompts x 4 samples
    delta = _lengths(2000, seed)
    difficulty = rng.normal(0, 1.0, 500)[groups]  # some prompts the policy wins more often, at any length
    p = 1 / (1 + np.exp(-(6.0 * np.tanh(delta / delta.std()) + difficulty)))
    wins = (rng.random(2000) < p).astype(float)
    out = lc_win_rate(wins, delta, groups, bootstrap=10)
    # measured over seeds 0-9: LC 0.43-0.55 with the raw win rate at 0.93
    assert out["raw_win_rate"] > 0.9 and abs(out["lc_win_rate"] - 0.5) < 0.1
    assert out["num_prompts"] == 500


def test_quality_without_a_length_effect_is_kept():
    rng = np.random.default_rng(3)
    delta = rng.normal(0, 30, 2000)  # lengths unrelated to the judgment
    wins = (rng.random(2000) < 1 / (1 + np.exp(-1.0))).astype(float)  # true quality advantage: logit 1 (73%)
    fit = fit_lc(wins, delta)
    assert fit.lc_win_rate == pytest.approx(fit.raw_win_rate, abs=0.03)
    assert fit.theta == pytest.approx(1.0, abs=0.15) and abs(fit.phi) < 0.3


def test_ties_and_equal_lengths():
    fit = fit_lc([0.5, 0.5, 0.5, 0.5], [0, 0, 0, 0])  # no length variation, all ties
    assert fit.lc_win_rate == pytest.approx(0.5) and fit.phi == 0.0
    with pytest.raises(ValueError, match="as many length differences"):
        fit_lc([1.0, 0.0], [3.0])


def test_the_fit_solves_the_penalised_score_equations():
    rng = np.random.default_rng(7)
    groups = np.repeat(np.arange(30), 3)
    delta = rng.normal(10, 40, 90)
    wins = rng.choice([0.0, 0.5, 1.0], 90)
    fit = fit_lc(wins, delta, groups)
    t = np.tanh(delta / delta.std())
    p = 1 / (1 + np.exp(-(fit.theta + fit.phi * t + fit.gamma[groups])))
    # d/d theta, d/d phi and d/d gamma_g of sum log-lik - penalty are all 0 at the optimum
    assert abs((wins - p).sum() - 0.01 * fit.theta) < 1e-8 and abs(((wins - p) * t).sum() - 0.01 * fit.phi) < 1e-8
    assert np.allclose(np.bincount(groups, wins - p) - 1.0 * fit.gamma, 0, atol=1e-8)


def test_an_unreadable_verdict_is_skipped_and_counted_not_turned_into_a_nan_win_rate():
    from dpokit.online.suites.runner import lc_from_judgments

    judgments = [
        {"prompt_index": i % 3, "win": w, "length_diff": d}
        for i, (w, d) in enumerate([(1.0, 2), (0.0, -1), (1.0, 0), (0.5, 3), (float("nan"), 1), (None, 0), (0.0, -2)])
    ]
    out = lc_from_judgments(judgments, bootstrap=20, seed=0)
    assert out["skipped_judgments"] == 2 and math.isfinite(out["lc_win_rate"]) and math.isfinite(out["raw_win_rate"])
    assert out["raw_win_rate"] == pytest.approx((1 + 0 + 1 + 0.5 + 0) / 5)
