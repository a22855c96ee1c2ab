"""LIMA (``GAIR/lima``): 1,000 carefully written single-turn examples, plus 300 test prompts.

Train rows are ``{"conversations": [user, assistant, user, assistant, ...], "source": ...}``.
We keep rows with exactly one user turn and one assistant turn (1,000 of the 1,029);
longer conversations are dropped and counted, because a later turn only makes sense
after the earlier ones. LIMA's answers are high-quality, self-contained texts, which
makes them a clean "unlabelled" source too: ``as_unlabelled(read_lima(...)[0])``
gives the outputs alone, ready for the backward model.

Test rows are ``{"conversations": [prompt]}``: held-out prompts with no answer, read by
:func:`read_lima_prompts` as pairs with an empty output.
"""
from __future__ import annotations

from pathlib import Path

from data.hub import resolve
from data.pairs import DataError, Pair, dedupe, iter_jsonl, make_id

HUB_ID = "GAIR/lima"
TRAIN_FILE = "train.jsonl"
TEST_FILE = "test.jsonl"


def _conversation(row: dict, where: str) -> list[str]:
    conv = row.get("conversations")
    if not isinstance(conv, list) or not all(isinstance(t, str) for t in conv):
        raise DataError(f"{where}: expected 'conversations' to be a list of strings")
    if not conv:
        raise DataError(f"{where}: 'conversations' is empty")
    return conv


def read_lima(source: str | Path = HUB_ID) -> tuple[list[Pair], dict[str, int]]:
    """Single-turn (instruction, output) pairs from LIMA's train file.

    Returns:
        (pairs, stats) with stats keys ``rows``, ``kept``, ``dropped_multi_turn``,
        ``dropped_empty``, ``dropped_duplicate``.
    """
    path = resolve(source, TRAIN_FILE)
    stats = dict(rows=0, kept=0, dropped_multi_turn=0, dropped_empty=0, dropped_duplicate=0)
    pairs: list[Pair] = []
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        stats["rows"] += 1
        conv = _conversation(row, where)
        if len(conv) == 1:
            raise DataError(
                f"{where}: a prompt with no answer; expected [user, assistant] turns "
                "(is this LIMA's test file? read it with read_lima_prompts)"
            )
        if len(conv) > 2:
            stats["dropped_multi_turn"] += 1
            continue
        instruction, output = conv[0].strip(), conv[1].strip()
        if not instruction or not output:
            stats["dropped_empty"] += 1
            continue
        pairs.append(Pair(make_id("lima", instruction, output), instruction, output, "lima"))
    pairs, stats["dropped_duplicate"] = dedupe(pairs)
    stats["kept"] = len(pairs)
    return pairs, stats


def read_lima_prompts(source: str | Path = f"{HUB_ID}/{TEST_FILE}") -> tuple[list[Pair], dict[str, int]]:
    """Held-out prompts from LIMA's test file, as pairs with ``output == ""``.

    Only the first turn of each row is used (LIMA's test rows have just one).

    Returns:
        (pairs, stats) with stats keys ``rows``, ``kept``, ``dropped_empty``,
        ``dropped_duplicate``.
    """
    path = resolve(source, TEST_FILE)
    stats = dict(rows=0, kept=0, dropped_empty=0, dropped_duplicate=0)
    pairs: list[Pair] = []
    for lineno, row in iter_jsonl(path):
        stats["rows"] += 1
        prompt = _conversation(row, f"{path}:{lineno}")[0].strip()
        if not prompt:
            stats["dropped_empty"] += 1
            continue
        pairs.append(Pair(make_id("lima-test", prompt, ""), prompt, "", "lima-test"))
    pairs, stats["dropped_duplicate"] = dedupe(pairs)
    stats["kept"] = len(pairs)
    return pairs, stats
