"""parse_score on realistic rater outputs."""
from __future__ import annotations

import pytest

from humback.scores import parse_score

CASES = [
    # (rater output, expected score)
    ("The answer is complete and clearly written.\nScore: 5", 5),
    ("Reasoning: it only gives a high-level method.\nScore: 2", 2),
    ("score: 5.", 5),
    ("The response is helpful but reads like a blog.\nScore: 3/5", 3),
    ("Score: 4 / 5", 4),
    ("Score: 3 out of 5", 3),
    ("**Score: 4**", 4),
    ("Score: **1**", 1),
    ("Final Score: 4!", 4),
    ("Score:2", 2),
    ("  SCORE: 4  ", 4),
    # the last line mentioning a score decides
    ("A score of 5 means a perfect answer; this one is not.\nScore: 3", 3),
    ("Score: 2\nOn reflection the answer is complete.\nScore: 4", 4),
    ("Score: 5\nThe score reflects how clear it is.", None),
    # out of range, other scales, not integers
    ("Score: 10", None),
    ("Score: 0", None),
    ("Score: 6", None),
    ("Score: 8/10", None),
    ("Score: 4.5", None),
    ("Score: -3", None),
    # no score at all
    ("", None),
    ("This answer is fine.", None),
    ("Score: five", None),
    ("Rating: 4", None),
    ("4", None),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_parse_score(text: str, expected: int | None) -> None:
    assert parse_score(text) == expected
