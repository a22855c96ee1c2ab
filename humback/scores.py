"""Read the 1-5 rating out of the rater's free-text answer (self-curation).

Table 1 asks the model for "a brief reasoning" and then "Score: <rating>" on the last
line. Models do not always comply, so the parser is strict and predictable rather
than clever; a pair whose score cannot be read is simply not selected.

Rule: find the LAST line that contains the word "score" (any case). On that line,
take the last ``Score: N`` (colon required; markdown ``**`` around the number and a
``/5`` or ``out of 5`` suffix allowed). N must be an integer from 1 to 5. Anything else
gives None:

======================================  ======
rater's last "score" line               result
======================================  ======
``Score: 4``                            4
``score: 5.``                           5
``Score: 4/5``, ``Score: 3 out of 5``   4, 3
``**Score: 2**``, ``Score: **2**``      2
``Score: 10``, ``Score: 0``             None (off the 1-5 scale)
``Score: 4/10``, ``Score: 4.5``         None (another scale / not an integer)
``The score reflects clarity.``         None (the last score line has no number)
no line mentions a score                None
======================================  ======

Why the *last* line: the reasoning often quotes the rubric ("a score of 5 means...")
before the verdict, and a model may revise itself ("Score: 3 ... on reflection,
Score: 4"); the final statement is the verdict.
"""
from __future__ import annotations

import re

MIN_SCORE, MAX_SCORE = 1, 5
SCORES = tuple(range(MIN_SCORE, MAX_SCORE + 1))  # 1, 2, 3, 4, 5

_SCORE = re.compile(
    r"score\s*:\s*\**\s*(\d+)(?!\d|\.\d)"  # "Score:", optional bold, a whole integer (not 4.5)
    r"(?:\s*(?:/|out\s+of)\s*(\d+))?",  # optional "/5" or "out of 5"
    re.IGNORECASE,
)


def parse_score(text: str) -> int | None:
    """The 1-5 score on the last line mentioning "score", or None (see module docstring)."""
    score_lines = [line for line in text.splitlines() if "score" in line.lower()]
    if not score_lines:
        return None
    matches = list(_SCORE.finditer(score_lines[-1]))
    if not matches:
        return None
    value, scale = matches[-1].groups()
    if scale is not None and int(scale) != MAX_SCORE:
        return None
    score = int(value)
    return score if MIN_SCORE <= score <= MAX_SCORE else None
