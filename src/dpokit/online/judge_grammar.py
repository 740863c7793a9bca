"""How every judge's reply is read: one grammar for ratings, one for pairwise verdicts.

Every judge that reads a reply uses these two functions: the pointwise judge (JudgeScorer), the pairwise
judge (PairwiseJudge) and the MT-Bench-style judge of the multiturn suite. (The local judge reads no reply:
it takes the probabilities of the letters A and B at the answer position.) The grammar, as docs/evaluation.md
shows it:

    Ratings, on the judge's scale (1 to 10):
      Rating: [[N]]              MT-Bench's verdict form (Score: [[N]] too); every copy in a reply must agree.
      Rating: N    Score: N      read only without a Rating: [[N]]; the last such statement counts (a judge
                                 may score criteria first); N may be written N/10 or N out of 10.
      N/10    N out of 10        read only without a statement above; several must agree.
    N is a plain decimal number (7, 7.5) on the statement's line. Unscored (NaN, counted): a rating outside
    the scale or not a plain finite number (11, -3, [[1e308]]), another denominator (4/5, 4 out of 5), a
    range (7-8), [[N]] ratings or fractions that differ (6/10 ... 9/10), and anything else: a bare number
    ("I'd give it a 7"), a number in an enumeration ("1."), a number in the scale's description ("on a
    scale of 1 to 10").

    Pairwise verdicts:
      [[A]]  [[B]]  [[C]] (a tie; [[tie]] too)      anywhere in the reply
      Verdict: A  (B, C, tie)                       as the reply's last line (earlier ones must agree)
    Every verdict in a reply must agree. Anything else is unjudged (NaN, counted): "Response A is worse
    than B", "I prefer neither A nor B", "A", "It's a tie".

    Emphasis marks (* and `) are ignored: "**Rating:** 8" is "Rating: 8".
"""

from __future__ import annotations

import math
import re

# A number-like token: checked by _number, so "1e308", "7th" or "7.5.1" are read as what they are (no
# plain number), never as their first digit.
_TOKEN = r"[-+\u2212]?\d[\w.]*"
_AMOUNT = re.compile(
    rf"(?P<num>{_TOKEN})"
    rf"(?:[ \t]*/[ \t]*(?P<den>{_TOKEN})|[ \t]+out[ \t]+of[ \t]+(?P<den_words>{_TOKEN}))?"
    r"(?P<range>[ \t]*(?:[-\u2013\u2014\u2212]|to\b)[ \t]*\d)?"
    r"(?P<date>/\d)?",  # 7/10/2024 is a date, not a fraction
    re.IGNORECASE,
)
_LABEL = re.compile(r"\b(?:rating|score)[ \t]*:[ \t]*", re.IGNORECASE)
_BRACKETED = re.compile(r"\[\[[ \t]*([^\]\n]*?)[ \t]*\]\]")
# A fraction standing alone: not the end of a word, a number or a range ("7-8/10", "x3/10").
_FRACTION = re.compile(rf"(?<![\w.+\-\u2212/])(?={_TOKEN}(?:[ \t]*/|[ \t]+out[ \t]+of[ \t]))", re.IGNORECASE)
_RANGE_BEFORE = re.compile(r"\d[ \t]*(?:[-\u2013\u2014\u2212]|to)[ \t]*$", re.IGNORECASE)
_PLAIN = re.compile(r"[-+]?\d+(?:\.\d+)?")

_VERDICTS = {"A": 1.0, "B": 0.0, "C": 0.5, "TIE": 0.5}
_VERDICT_BRACKET = re.compile(r"\[\[[ \t]*(A|B|C|tie)[ \t]*\]\]", re.IGNORECASE)
_VERDICT_LINE = re.compile(
    r"^[ \t>#-]*(?:final[ \t]+)?verdict[ \t]*:[ \t]*(?:(?:response|assistant|answer|output)[ \t]+)?"
    r"(A|B|C|tie)[ \t]*[.!]?[ \t]*$",
    re.IGNORECASE,
)


def _plain(reply: str) -> str:
    return reply.replace("*", "").replace("`", "")


def _number(token: str | None) -> float | None:
    """A plain decimal number ("7", "7.5", "-3"; a sentence's full stop after it is not part of it), else None."""
    if token is None:
        return None
    token = token.rstrip(".").replace("\u2212", "-")
    return float(token) if _PLAIN.fullmatch(token) else None


def _amount(match: re.Match, low: float, high: float) -> float:
    """The rating an amount states (N, N/high, N out of high), NaN when it is not one on the scale [low, high]."""
    value = _number(match.group("num"))
    den = match.group("den") or match.group("den_words")
    if value is None or match.group("range") or match.group("date") or (den is not None and _number(den) != high):
        return math.nan
    return value if low <= value <= high else math.nan


def _agreed(values: list[float]) -> float:
    """The one value all of `values` hold; NaN when they differ (or one is NaN)."""
    return values[0] if all(v == values[0] for v in values) else math.nan


def parse_rating(reply: str, low: float = 1.0, high: float = 10.0) -> float:
    """The rating a judge's reply states, by the grammar of this module's docstring; NaN when it is unscored."""
    text = _plain(reply)
    bracketed, labelled = [], []
    for label in _LABEL.finditer(text):
        bracket = _BRACKETED.match(text, label.end())
        if bracket:
            number = _number(bracket.group(1))  # the range check refuses a long one that overflows to inf
            bracketed.append(number if number is not None and low <= number <= high else math.nan)
            continue
        amount = _AMOUNT.match(text, label.end())
        if amount and not text.startswith(")", amount.end("num")):  # "Rating: 1) ..." opens an enumeration
            labelled.append(_amount(amount, low, high))
    if bracketed:
        return _agreed(bracketed)
    if labelled:
        return labelled[-1]
    fractions = []
    for start in _FRACTION.finditer(text):
        amount = _AMOUNT.match(text, start.start())
        if amount and (amount.group("den") or amount.group("den_words")) and not amount.group("date"):
            ranged = _RANGE_BEFORE.search(text, max(0, start.start() - 16), start.start())
            fractions.append(math.nan if ranged else _amount(amount, low, high))
    return _agreed(fractions) if fractions else math.nan


def parse_verdict(reply: str) -> float:
    """1.0 for A, 0.0 for B, 0.5 for a tie, by the grammar of this module's docstring; NaN when it is unjudged."""
    text = _plain(reply)
    verdicts = [_VERDICTS[m.group(1).upper()] for m in _VERDICT_BRACKET.finditer(text)]
    lines = [line for line in text.splitlines() if line.strip()]
    final = _VERDICT_LINE.match(lines[-1]) if lines else None
    if final:  # "Verdict: A" ... "Verdict: B" is two verdicts: every Verdict line must agree
        verdicts += [_VERDICTS[m.group(1).upper()] for line in lines if (m := _VERDICT_LINE.match(line))]
    return _agreed(verdicts) if verdicts else math.nan
