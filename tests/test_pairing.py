"""Pair construction from scored samples: exact on a fixture, every drop counted."""

from __future__ import annotations

import json

import pytest

from dpokit.data.layouts import load_preferences
from dpokit.config import PairingConfig
from dpokit.online.pairing import build_pairs, format_summary, pair_file


def group(prompt, scored):
    """Rows of one prompt: scored = [(completion, score, completion_tokens), ...]."""
    return [
        {"prompt": prompt, "sample_index": j, "completion": c, "score": s, "completion_tokens": n, "finished": True}
        for j, (c, s, n) in enumerate(scored)
    ]


# Scores are exact binary fractions, so every margin comparison below is exact.
FIXTURE = [
    # A: best 0.875 (two of them), worst 0.125
    group("A", [(" a0", 0.875, 10), (" a1", 0.125, 30), (" a2", 0.5, 12), (" a3", 0.875, 26), (" a4", 0.25, 11)]),
    # B: every sample ties
    group("B", [(" b0", 0.5, 5), (" b1", 0.5, 6), (" b2", 0.5, 7)]),
    # C: small differences only (largest margin 0.125)
    group("C", [(" c0", 0.625, 8), (" c1", 0.5, 8), (" c2", 0.5625, 8)]),
    # D: one completion has no score (an unreadable judge reply), leaving one
    group("D", [(" d0", None, 8), (" d1", 0.75, 8)]),
    # E: the two ends differ a lot in length
    group("E", [(" e0", 1.0, 40), (" e1", 0.0, 10), (" e2", 0.375, 12)]),
]


def pairs_of(pairs):
    return [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]


def test_best_vs_worst_exact():
    pairs, summary = build_pairs(FIXTURE, PairingConfig())
    # A: the largest margin 0.75 twice: (a0, a1) 20 tokens apart, (a3, a1) 4 apart -> the closer in length
    assert pairs_of(pairs) == [("A", " a3", " a1"), ("C", " c0", " c1"), ("E", " e0", " e1")]
    assert [p["margin"] for p in pairs] == [0.75, 0.125, 1.0]
    assert pairs[0]["score_chosen"] == 0.875 and pairs[0]["chosen_tokens"] == 26 and pairs[0]["rejected_tokens"] == 30
    assert summary["pairs"] == 3 and summary["prompts"] == 5 and summary["prompts_paired"] == 3
    assert summary["prompts_all_tied"] == 1  # B
    assert summary["tied_pairs"] == 3 + 1  # B's 3 pairs, and A's (a0, a3)
    assert summary["prompts_fewer_than_two"] == 1 and summary["completions_unscored"] == 1  # D
    assert summary["pairs_below_margin"] == summary["pairs_length_ratio"] == 0


def test_min_margin_drops_small_differences():
    pairs, summary = build_pairs(FIXTURE, PairingConfig(min_margin=0.3))
    assert pairs_of(pairs) == [("A", " a3", " a1"), ("E", " e0", " e1")]
    assert summary["prompts_below_margin"] == 1  # C
    # below 0.3: A's (a4, a1) 0.125 and (a2, a4) 0.25; all three of C's
    assert summary["pairs_below_margin"] == 2 + 3
    # a margin equal to min_margin passes
    pairs, _ = build_pairs(FIXTURE, PairingConfig(min_margin=0.125))
    assert pairs_of(pairs)[1] == ("C", " c0", " c1")


def test_length_ratio_and_closest_length():
    pairs, summary = build_pairs(FIXTURE, PairingConfig(max_length_ratio=2.0))
    # E: (e0, e1) 40/10 and (e0, e2) 40/12 exceed 2; (e2, e1) 12/10 passes, margin 0.375
    assert pairs_of(pairs) == [("A", " a3", " a1"), ("C", " c0", " c1"), ("E", " e2", " e1")]
    # A over the ratio: (a0,a1) 30/10, (a2,a1) 30/12, (a4,a1) 30/11, (a3,a2) 26/12, (a3,a4) 26/11; E: 2
    assert summary["pairs_length_ratio"] == 5 + 2
    everything_too_long, summary = build_pairs([FIXTURE[4]], PairingConfig(max_length_ratio=1.1))
    assert everything_too_long == [] and summary["prompts_length_ratio"] == 1
    closest, _ = build_pairs(FIXTURE, PairingConfig(length_balance="closest"))
    # A: (a0, a4) and (a2, a4) are 1 token apart; the larger margin (0.625) wins
    assert pairs_of(closest) == [("A", " a0", " a4"), ("C", " c0", " c1"), ("E", " e2", " e1")]


def test_all_pairs_with_margin_and_cap():
    pairs, summary = build_pairs([FIXTURE[0]], PairingConfig(strategy="all_pairs", min_margin=0.375))
    # largest margin first, then the smaller length difference
    assert pairs_of(pairs) == [
        ("A", " a3", " a1"),
        ("A", " a0", " a1"),  # 0.75: 4 and 20 tokens apart
        ("A", " a0", " a4"),
        ("A", " a3", " a4"),  # 0.625: 1 and 15
        ("A", " a0", " a2"),
        ("A", " a3", " a2"),
        ("A", " a2", " a1"),
    ]  # 0.375: 2, 14, 18
    assert summary["tied_pairs"] == 1 and summary["pairs_below_margin"] == 2  # (a4, a1) 0.125, (a2, a4) 0.25
    capped, summary = build_pairs(
        [FIXTURE[0]], PairingConfig(strategy="all_pairs", min_margin=0.375, max_pairs_per_prompt=2)
    )
    assert pairs_of(capped) == pairs_of(pairs)[:2] and summary["pairs_over_cap"] == 5


def test_identical_completions_and_unfinished():
    rows = group("F", [(" same", 1.0, 3), (" same", 0.0, 3), (" other", 0.5, 3)])
    pairs, summary = build_pairs([rows])
    assert pairs_of(pairs) == [("F", " same", " other")] and summary["identical_pairs"] == 1
    rows[0]["finished"] = False
    pairs, summary = build_pairs([rows], PairingConfig(drop_unfinished=True))
    assert pairs_of(pairs) == [("F", " other", " same")] and summary["completions_unfinished"] == 1


def test_conversational_prompts_give_assistant_messages():
    prompt = [{"role": "user", "content": "hi"}]
    pairs, _ = build_pairs([group(prompt, [("hello", 2.0, 2), ("go away", 1.0, 3)])])
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "hello"}]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": "go away"}]


def test_pair_file_output_trains(tmp_path):
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps(r) + "\n" for g in FIXTURE for r in g))
    summary = pair_file(scored, tmp_path / "pairs.jsonl")
    assert summary["pairs"] == 3
    assert json.loads((tmp_path / "pairs.jsonl.summary.json").read_text())["prompts_all_tied"] == 1
    examples, report = load_preferences(str(tmp_path / "pairs.jsonl"))  # the extra columns are ignored
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == [
        ("A", " a3", " a1"),
        ("C", " c0", " c1"),
        ("E", " e0", " e1"),
    ]
    assert report.rows_used == 3
    line = format_summary(summary)
    assert "3 pairs from 3/5 prompts" in line and "1 all tied" in line


def test_bad_options():
    for bad in (dict(strategy="best"), dict(min_margin=-1), dict(length_balance="x"), dict(max_length_ratio=0.5)):
        with pytest.raises(ValueError):
            PairingConfig(**bad)
