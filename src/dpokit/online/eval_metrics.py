"""The measures of `dpokit eval`'s sampled evaluation, from the samples (online/evaluation.py's docstring defines each).

Against the reference: the KL estimates from the policy's samples and the implicit reward's held-out preference
accuracy (their computation is in log_ratios). Against the baseline's samples: its mean length and score and the
win rate, by a pairwise judge or else the scorer. Then the table `dpokit eval` prints.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

from tqdm.auto import tqdm

from dpokit.config import EvalConfig
from dpokit.generation import Sample
from dpokit.online.log_ratios import KL_ESTIMATOR, examples_of, k3_kl, log_ratios, preference_accuracy
from dpokit.online.suites.stats import mean_sem


def completion_length(s: Sample) -> int:
    """Generated tokens without the EOS."""
    return len(s.completion_ids) - (1 if s.finished else 0)


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> tqdm:
    """A bar on stderr with the count, the rate and the time left, for a phase that would otherwise be silent."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def against_reference(
    policy, reference, tokenizer, samples: list[Sample], cfg: EvalConfig, pairs, bar, progress: bool
) -> dict:
    """The KL estimates from the policy's samples and, with held-out pairs, the implicit reward's preference accuracy."""
    out: dict[str, Any] = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with progress_bar(len(samples), bar("KL to the reference") or "", "sample", progress) as kl_bar:
        ratios, tokenwise = log_ratios(
            policy,
            reference,
            [s.prompt_ids for s in samples],
            [s.completion_ids for s in samples],
            pad,
            tokenwise=True,
            progress=kl_bar,
        )
    out["kl_to_reference"], out["kl_to_reference_sem"] = mean_sem(k3_kl(ratios).tolist())
    out["kl_estimator"] = KL_ESTIMATOR
    out["kl_tokenwise"], out["kl_tokenwise_sem"] = mean_sem(tokenwise.tolist())
    out["kl_estimator_biased"] = not (cfg.temperature == 1.0 and cfg.top_p == 1.0)
    if pairs is not None:
        examples = examples_of(pairs)
        used = examples if cfg.max_pairs is None else examples[: cfg.max_pairs]
        out["pairs_used"], out["pairs_total"] = len(used), len(examples)
        with progress_bar(2 * len(used), bar("held-out pairs (chosen + rejected)") or "", "seq", progress) as pair_bar:
            out["preference_accuracy"] = preference_accuracy(policy, reference, tokenizer, used, progress=pair_bar)
    return out


def against_baseline(samples, base_samples, sample_prompts, scores, scorer, judge, num_samples: int, judgments) -> dict:
    """The baseline's mean length (and score), and the win rate by the judge or else the scorer."""
    if len(base_samples) != len(samples):
        raise ValueError(f"baseline has {len(base_samples)} samples, the policy {len(samples)}")
    out: dict[str, Any] = {}
    out["baseline_mean_length"], _ = mean_sem([completion_length(s) for s in base_samples])
    if judge is not None:
        wins = judge.compare(sample_prompts, [s.completion for s in samples], [s.completion for s in base_samples])
        out["win_rate_by"] = getattr(judge, "name", "pairwise judge")
    elif scorer is not None:
        base_scores = scorer.score(sample_prompts, [s.completion for s in base_samples])
        out["baseline_mean_score"], out["baseline_mean_score_sem"] = mean_sem(base_scores)
        wins = [
            None
            if a is None or b is None or not (math.isfinite(a) and math.isfinite(b))
            else 1.0
            if a > b
            else 0.0
            if a < b
            else 0.5
            for a, b in zip(scores, base_scores)
        ]
        out["win_rate_by"] = getattr(scorer, "name", "scorer")
    else:
        return out
    out["win_rate"], out["win_rate_sem"] = mean_sem(wins)
    out["win_rate_unjudged"] = sum(w is None or not math.isfinite(w) for w in wins)  # left out of the win rate
    if judgments is not None:
        judgments.extend(
            {"prompt_index": i // num_samples, "win": w, "length_diff": completion_length(a) - completion_length(b)}
            for i, (w, a, b) in enumerate(zip(wins, samples, base_samples))
        )
    return out


_ROWS = [
    ("mean_score", "mean score", "{:.3f}"),
    ("baseline_mean_score", "baseline mean score", "{:.3f}"),
    ("win_rate", "win rate vs baseline", "{:.1%}"),
    ("win_rate_unjudged", "unjudged (left out of the win rate)", "{:d}"),
    ("kl_to_reference", "KL(policy || reference), nats/completion, k3 from the policy's samples", "{:.2f}"),
    (
        "kl_tokenwise",
        "KL(policy || reference), nats/completion, exact next-token KL summed along the samples",
        "{:.2f}",
    ),
    ("preference_accuracy", "held-out preference accuracy", "{:.1%}"),
    ("mean_length", "mean length (tokens)", "{:.1f}"),
    ("baseline_mean_length", "baseline mean length", "{:.1f}"),
    ("length_change", "length change", "{:+.1f}"),
    ("finished_share", "finished (EOS) share", "{:.1%}"),
    ("num_samples", "samples", "{:d}"),
]


def format_report(metrics: Mapping) -> str:
    rows = []
    for key, label, fmt in _ROWS:
        value = metrics.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        text = fmt.format(value)
        sem = metrics.get(f"{key}_sem")
        if isinstance(sem, float) and math.isfinite(sem):
            text += " ± " + (fmt.format(sem) if "%" in fmt else f"{sem:.3f}" if "3f" in fmt else f"{sem:.2f}")
        if key == "preference_accuracy" and "pairs_used" in metrics:
            text += f"  (on {metrics['pairs_used']} of {metrics['pairs_total']} pairs)"
        rows.append((label, text))
    width = max((len(r[0]) for r in rows), default=0)
    return "\n".join(f"{label:<{width}}  {text}" for label, text in rows)
