"""The one grammar judge replies are read by (online/judge_grammar.py, issue 20): every form it accepts, the replies
it leaves unscored, and the replies that were misread before it (the issue's "Found" cases, marked so below)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from dpokit.online import judge_grammar
from dpokit.online.judge_grammar import parse_rating, parse_verdict
from dpokit.online.judges import JudgeScorer, PairwiseJudge, both_orders
from dpokit.online.suites.multiturn import MTBenchJudge

NAN = math.nan

RATINGS = [
    # Found in issue 20, each misread before: 1.0, 1.0, 4.0 and 1.0
    ("On a scale of 1 to 10, I'd give it a 7.", NAN),  # a bare number, and the scale's description
    ("1. Accuracy: good.\n2. Clarity: fine.\nFinal: 8/10", 8.0),  # the enumeration's numbers are not ratings
    ("Rating: 4 out of 5", NAN),  # another denominator, as 4/5 is
    ("Rating: [[1e308]]", NAN),  # not a plain number
    # Rating: [[N]]
    ("Rating: [[7]]", 7.0),
    ("Clear and correct. Rating: [[9]]", 9.0),
    ("Rating: [[ 6.5 ]]", 6.5),
    ("Rating: [[7]]. Score: 3 for style", 7.0),  # the verdict form comes first
    ("Rating: [[7]] and again Rating: [[7]]", 7.0),
    # Rating: N, Score: N: the last statement
    ("Rating: 7", 7.0),
    ("Score: 7", 7.0),
    ("final rating: 10.", 10.0),
    ("**Rating:** 8", 8.0),
    ("Rating: **8**/10", 8.0),
    ("Rating: 7/10", 7.0),
    ("Rating: 8 / 10.", 8.0),
    ("Rating: 7 out of 10!", 7.0),
    ("Accuracy score: 3. Style score: 9. Rating: 6", 6.0),
    ("Rating: 6. On reflection, Rating: 8", 8.0),
    ("4/5, so Rating: 8", 8.0),
    ("a 1-10 scale; Rating: 4", 4.0),
    # N/10, N out of 10
    ("I'd give it 8/10.", 8.0),
    ("I'd give it **8**/10", 8.0),
    ("8 out of 10", 8.0),
    ("7/10, and again 7/10", 7.0),
    ("Dated 3/10/2024; I'd say 9/10", 9.0),  # a date is not a fraction
    # unscored
    ("Rating: 4/5", NAN),
    ("Rating: **4**/5", NAN),
    ("4/5", NAN),
    ("I'd say 3 / 5 stars", NAN),
    ("Rating: [[7]] then Rating: [[8]]", NAN),  # several different ratings
    ("6/10 for accuracy, 9/10 for style", NAN),
    ("Rating: 11", NAN),
    ("Rating: 0", NAN),
    ("Rating: -3", NAN),
    ("Rating: \u22123", NAN),
    ("-3/10", NAN),
    ("Rating: 7-8", NAN),  # a range
    ("7 to 8 out of 10", NAN),
    ("Rating: 12. Sorry, I meant 6", NAN),  # the last statement is out of range; "I meant 6" is none
    ("Rating: 1e308", NAN),
    ("Rating: [[inf]]", NAN),
    ("Rating: [[nan]]", NAN),
    ("Rating: 7th", NAN),
    ("Rating:\n1. Accuracy: good", NAN),  # the number on the next line opens an enumeration
    ("Rating: 1) Accuracy", NAN),
    ("Rating: 1 to 10 scale, I'd say 7", NAN),
    ("rating = 7", NAN),
    ("7", NAN),
    ("**8**", NAN),
    ("no idea", NAN),
    ("", NAN),
]

VERDICTS = [
    # Found in issue 20, misread before as A, B and A
    ("Response A is worse than B", NAN),
    ("I prefer neither A nor B", NAN),
    ("The better one is not A, it's B", NAN),
    # accepted
    ("[[A]]", 1.0),
    ("[[B]]", 0.0),
    ("[[C]]", 0.5),
    ("[[tie]]", 0.5),
    ("Both are fine, but [[B]]", 0.0),
    ("B is fine but my verdict: [[A]]", 1.0),
    ("A is shorter; B is right.\nVerdict: B", 0.0),
    ("**Verdict:** A.", 1.0),
    ("Verdict: tie", 0.5),
    ("Final verdict: Assistant B", 0.0),
    ("[[A]]\n\nVerdict: A", 1.0),
    # unjudged
    ("A", NAN),
    ("B", NAN),
    ("It's a tie", NAN),
    ("Response B is better", NAN),
    ("A better answer is B", NAN),
    ("A clear winner: response B.", NAN),
    ("A is better.", NAN),
    ("The answer is A.", NAN),
    ("Assistant A", NAN),
    ("I cannot decide.", NAN),
    ("[[A]] if A is better, [[B]] if B is", NAN),  # several different verdicts
    ("[[A]]\nVerdict: B", NAN),
    ("Verdict: A\nOn second thought, B is better.", NAN),  # not the last line
    ("Verdict: A is better", NAN),
    ("Verdict: A\nVerdict: B", NAN),  # two Verdict lines that differ
    ("???", NAN),
    ("", NAN),
]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("reply, rating", RATINGS)
def test_ratings(reply, rating):
    assert _same(parse_rating(reply), rating), (reply, parse_rating(reply))


@pytest.mark.parametrize("reply, verdict", VERDICTS)
def test_verdicts(reply, verdict):
    assert _same(parse_verdict(reply), verdict), (reply, parse_verdict(reply))


def test_the_scale_is_the_judges():
    assert parse_rating("Rating: 4/5", low=1, high=5) == 4.0 and parse_rating("4 out of 5", low=1, high=5) == 4.0
    assert math.isnan(parse_rating("Rating: 7", low=1, high=5))
    assert math.isnan(parse_rating("Rating: 4/10", low=1, high=5))


def _judges_reading(reply: str) -> dict[str, float]:
    """What each judge that reads a reply makes of `reply` (its client answers `reply` to every request)."""
    url = "http://127.0.0.1:9/v1"  # never asked: each judge's client answers `reply`
    scorer, pairwise, mt_bench = JudgeScorer(url, "m"), PairwiseJudge(url, "m", swap=False), MTBenchJudge(url, "m")
    for judge in (scorer, pairwise, mt_bench):
        judge.client.chat = lambda messages: reply
    question = {"question_id": 1, "turns": ["q1", "q2"]}
    return {
        "pointwise": scorer.score(["p"], ["c"])[0],
        "mt_bench_rating": mt_bench.rate(question, ["a1", "a2"], 1)[0],
        "pairwise": pairwise.compare(["p"], ["a"], ["b"])[0],
        "mt_bench_verdict": mt_bench.compare(["p"], ["a"], ["b"])[0],
    }  # both orders: the same reply to each


@pytest.mark.parametrize("reply", [r for r, _ in RATINGS[:12]] + [v for v, _ in VERDICTS[:12]])
def test_every_judge_reads_by_the_one_grammar(reply):
    read = _judges_reading(reply)
    assert _same(read["pointwise"], parse_rating(reply)) and _same(read["mt_bench_rating"], parse_rating(reply))
    assert _same(read["pairwise"], parse_verdict(reply))
    assert _same(read["mt_bench_verdict"], both_orders(parse_verdict(reply), parse_verdict(reply)))


def test_unread_replies_are_counted():
    scorer = JudgeScorer("http://127.0.0.1:9/v1", "m", max_concurrency=1)
    replies = iter(["On a scale of 1 to 10, I'd give it a 7.", "Rating: 4 out of 5", "Rating: [[1e308]]", "Rating: 7"])
    scorer.client.chat = lambda messages: next(replies)
    scores = scorer.score(["p"] * 4, ["c"] * 4)
    assert all(math.isnan(s) for s in scores[:3]) and scores[3] == 7.0 and scorer.unparsed == 3
    pairwise = PairwiseJudge("http://127.0.0.1:9/v1", "m", swap=False, max_concurrency=1)
    replies = iter(
        ["Response A is worse than B", "I prefer neither A nor B", "The better one is not A, it's B", "[[B]]"]
    )
    pairwise.client.chat = lambda messages: next(replies)
    wins = pairwise.compare(["p"] * 4, ["a"] * 4, ["b"] * 4)
    assert all(math.isnan(w) for w in wins[:3]) and wins[3] == 0.0 and pairwise.unparsed == 3


def test_the_docs_show_the_grammar_of_the_docstring():
    """docs/evaluation.md carries the grammar block of judge_grammar's docstring word for word."""
    lines = judge_grammar.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    Ratings, on"))
    end = next((i for i in range(start, len(lines)) if lines[i] and not lines[i].startswith("    ")), len(lines))
    block = textwrap.dedent("\n".join(lines[start:end])).strip()
    docs = (Path(__file__).resolve().parent.parent / "docs" / "evaluation.md").read_text(encoding="utf-8")
    assert block in docs
