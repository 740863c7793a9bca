"""Judge replies read as the judge meant them: ratings out of another scale, the article "A", MT-Bench verdicts."""

from __future__ import annotations

import math

import pytest

from dpokit.online.judges import parse_choice, parse_rating


@pytest.mark.parametrize("reply", ["Rating: 4/5", "4/5", "I'd say 3 / 5 stars", "Rating: **4**/5"])
def test_a_rating_on_another_scale_is_unscored_not_read_as_out_of_ten(reply):
    assert math.isnan(parse_rating(reply))


def test_ratings_out_of_ten_still_read():
    assert parse_rating("Rating: 8/10") == 8.0 and parse_rating("I'd give it **8**/10") == 8.0
    assert parse_rating("Rating: [[6]]") == 6.0 and parse_rating("4/5, so Rating: 8") == 8.0


@pytest.mark.parametrize("reply, choice", [
    ("A better answer is B", 0.0),  # the article is not the choice
    ("A clear winner: response B.", 0.0),
    ("A", 1.0), ("B", 0.0), ("A is better.", 1.0), ("A. It is clearer.", 1.0),
    ("Response B is better", 0.0), ("The answer is A.", 1.0), ("Assistant A", 1.0),
    ("[[A]]", 1.0), ("Both are fine, but [[B]]", 0.0), ("[[C]]", 0.5), ("It's a tie", 0.5),
])
def test_choices(reply, choice):
    assert parse_choice(reply) == choice


@pytest.mark.parametrize("reply", ["???", "", "I cannot decide.", "Both have merits."])
def test_no_readable_choice_is_nan_not_a_tie(reply):
    assert math.isnan(parse_choice(reply))
