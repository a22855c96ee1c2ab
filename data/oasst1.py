"""Open Assistant (``OpenAssistant/oasst1``) message trees: the paper's seed-data recipe.

The export has one JSON object per *message*; a conversation is a tree linked by
``parent_id``. The fields used here::

    message_id, parent_id  tree links (parent_id is null for the first message)
    role                   "prompter" (the user) or "assistant"
    lang                   language code, e.g. "en"
    rank                   0 = the reply human reviewers ranked best among its
                           siblings, 1, 2, ... worse; null when not ranked
    deleted                true for messages removed by moderators
    text                   the message

Humback's seed data (paper, Section 3.1): pairs chosen from the first turn of the
conversation tree, English only, with high-quality replies by their human-annotated
rank (rank 0). So for each
*root* message (a prompter message with no parent) in the requested language we take
its non-deleted assistant reply with ``rank == 0``. Trees whose best reply was never
ranked 0 are dropped and counted: the recipe asks for reviewer-ranked answers.
"""
from __future__ import annotations

from pathlib import Path

from data.hub import resolve
from data.pairs import DataError, Pair, dedupe, iter_jsonl, make_id

HUB_ID = "OpenAssistant/oasst1"
HUB_FILE = "2023-04-12_oasst_ready.messages.jsonl.gz"
_REQUIRED = ("message_id", "parent_id", "role", "text", "lang")


def read_oasst1(source: str | Path = HUB_ID, *, lang: str = "en") -> tuple[list[Pair], dict[str, int]]:
    """(first prompt, rank-0 reply) pairs from an oasst1 message export.

    Args:
        source: local messages file (``.jsonl`` or ``.jsonl.gz``) or hub id.
        lang: keep trees whose root message is in this language.

    Returns:
        (pairs, stats) with stats keys ``messages``, ``trees`` (root messages),
        ``kept``, ``dropped_lang``, ``dropped_deleted`` (the root was deleted),
        ``dropped_no_rank0_reply``, ``dropped_empty``, ``dropped_duplicate``.
    """
    path = resolve(source, HUB_FILE)
    roots: list[dict] = []
    best_reply: dict[str, dict] = {}  # parent message_id -> its rank-0 assistant reply
    n_messages = 0
    for lineno, msg in iter_jsonl(path):
        n_messages += 1
        missing = [k for k in _REQUIRED if k not in msg]
        if missing:
            raise DataError(
                f"{path}:{lineno}: missing field(s) {missing}; expected an oasst1 message "
                f"with {list(_REQUIRED)}"
            )
        if msg["parent_id"] is None:
            if msg["role"] == "prompter":
                roots.append(msg)
        elif msg["role"] == "assistant" and msg.get("rank") == 0 and not msg.get("deleted"):
            best_reply[msg["parent_id"]] = msg

    stats = dict(messages=n_messages, trees=len(roots), kept=0, dropped_lang=0, dropped_deleted=0,
                 dropped_no_rank0_reply=0, dropped_empty=0, dropped_duplicate=0)
    pairs: list[Pair] = []
    for root in roots:  # file order, so the output order is stable
        if root["lang"] != lang:
            stats["dropped_lang"] += 1
            continue
        if root.get("deleted"):
            stats["dropped_deleted"] += 1
            continue
        reply = best_reply.get(root["message_id"])
        if reply is None:
            stats["dropped_no_rank0_reply"] += 1
            continue
        instruction, output = str(root["text"]).strip(), str(reply["text"]).strip()
        if not instruction or not output:
            stats["dropped_empty"] += 1
            continue
        pairs.append(Pair(make_id("oasst1", instruction, output), instruction, output, "oasst1"))
    pairs, stats["dropped_duplicate"] = dedupe(pairs)
    stats["kept"] = len(pairs)
    return pairs, stats
