"""Response length per model (`--suite length_stats`): mean, median and 90th percentile, in tokens.

DPO tends to lengthen answers, and a judge that likes length rewards it (lc_winrate takes that out of the win
rate); this suite shows the lengths themselves, policy beside baseline, and their spread: a mean can hide a tail
of answers that run on to the token limit. Each model answers the IFEval-style prompts (--ifeval-prompts, the
shipped 48 unless given; --max-prompts caps them) greedily, as ifeval does, with at most --suite-max-new-tokens
tokens. Per model:

  num_answers     answers measured
  mean_length     completion tokens, EOS excluded (as the sampled evaluation's mean_length), with mean_length_sem
  median_length   the middle length (the mean of the two middle ones for an even count)
  p90_length      the 90th percentile, linear between the order statistics (numpy's default): 90% of the answers
                  are this long or shorter
  max_length      the longest answer
  finished_share  answers that ended with EOS; the others stopped at --suite-max-new-tokens, so their lengths
                  (and the statistics, when the share is low) are lower bounds
  lengths         every answer's length, in the prompts' order
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dpokit.generation import Sample
from dpokit.online.suites.answers import answer
from dpokit.online.suites.ifeval import load_ifeval
from dpokit.online.suites.stats import mean_sem
from dpokit.online.suites.suite import Suite, SuiteRun

ROWS = [
    ("mean length (tokens)", "mean_length", "{:.1f}"),
    ("median length (tokens)", "median_length", "{:.1f}"),
    ("90th percentile length (tokens)", "p90_length", "{:.1f}"),
    ("finished (EOS) share", "finished_share", "{:.1%}"),
]


def length_stats(lengths: Sequence[int], finished: Sequence[bool]) -> dict:
    """The statistics above of answer lengths (tokens, EOS excluded) and whether each answer ended with EOS."""
    if not lengths:
        return {
            "num_answers": 0,
            "mean_length": math.nan,
            "mean_length_sem": math.nan,
            "median_length": math.nan,
            "p90_length": math.nan,
            "max_length": None,
            "finished_share": math.nan,
            "lengths": [],
        }
    values = np.asarray(lengths, dtype=float)
    mean, sem = mean_sem(values.tolist())
    return {
        "num_answers": len(lengths),
        "mean_length": mean,
        "mean_length_sem": sem,
        "median_length": float(np.median(values)),
        "p90_length": float(np.percentile(values, 90)),
        "max_length": int(values.max()),
        "finished_share": sum(bool(f) for f in finished) / len(lengths),
        "lengths": [int(n) for n in lengths],
    }


def of_samples(samples: Sequence[Sample]) -> dict:
    return length_stats([len(s.completion_ids) - int(s.finished) for s in samples], [s.finished for s in samples])


def run(r: SuiteRun) -> dict:
    """Each model's greedy answers to the IFEval-style prompts, measured."""
    conversations = [
        [{"role": "user", "content": row["prompt"]}] for row in load_ifeval(r.cfg.ifeval_prompts, r.cfg.max_prompts)
    ]
    return r.per_model(
        lambda m: of_samples(
            answer(m, r.tokenizer, conversations, max_new_tokens=r.cfg.suite_max_new_tokens, seed=r.cfg.seed)
        )
    )


SUITE = Suite("response length per model: mean, median, 90th percentile, in tokens", run, ROWS)
