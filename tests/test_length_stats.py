"""`--suite length_stats`: each model's answer lengths (tokens): mean, median, 90th percentile, finished share."""

from __future__ import annotations

import json
import math

from dpokit.cli import main
from dpokit.generation import Sample
from dpokit.online.suites.length_stats import length_stats, of_samples
from tiny_assets import tiny_model_dir


def test_the_statistics_by_hand():
    s = length_stats([4, 1, 10, 3, 2], [True, True, False, True, True])
    # sorted 1 2 3 4 10: median 3; p90 at rank 0.9 x 4 = 3.6, between 4 and 10: 4 + 0.6 x 6 = 7.6
    assert s["num_answers"] == 5 and s["mean_length"] == 4.0 and s["median_length"] == 3.0 and s["max_length"] == 10
    assert math.isclose(s["p90_length"], 7.6) and s["finished_share"] == 0.8 and s["lengths"] == [4, 1, 10, 3, 2]
    assert math.isclose(s["mean_length_sem"], math.sqrt(((0 + 9 + 36 + 1 + 4) / 4) / 5))
    assert length_stats([6, 7], [True, True])["median_length"] == 6.5
    empty = length_stats([], [])
    assert empty["num_answers"] == 0 and math.isnan(empty["mean_length"]) and math.isnan(empty["p90_length"])


def test_the_eos_is_not_counted():
    ended = Sample("p", "a b", [1], [5, 6, 2], finished=True)  # two tokens and the EOS
    cut = Sample("p", "a b c", [1], [5, 6, 7], finished=False)  # stopped at the token limit
    assert of_samples([ended, cut])["lengths"] == [2, 3] and of_samples([ended, cut])["finished_share"] == 0.5


def test_length_stats_through_dpokit_eval_on_the_policy_and_the_baseline(tmp_path):
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--policy",
                str(tiny_model_dir(seed=0)),
                "--reference",
                str(tiny_model_dir(seed=1)),
                "--suite",
                "length_stats",
                "--max-prompts",
                "4",
                "--suite-max-new-tokens",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())["suites"]["length_stats"]
    for side in ("policy", "baseline"):
        s = result[side]
        assert s["num_answers"] == 4 and len(s["lengths"]) == 4 and max(s["lengths"]) == s["max_length"] <= 5
        assert (
            s["mean_length"] == sum(s["lengths"]) / 4
            and min(s["lengths"]) <= s["median_length"] <= s["p90_length"] <= s["max_length"]
        )
    table = out.with_suffix(".md").read_text()
    for label in (
        "mean length (tokens)",
        "median length (tokens)",
        "90th percentile length (tokens)",
        "finished (EOS) share",
    ):
        assert f"| length_stats | {label} |" in table
