"""openassistant-guanaco: conversations flattened into one ``text`` field per row.

Two spellings of the same data are read, detected once per file from its first row:

* guanaco's own (``timdettmers/openassistant-guanaco``)::

      {"text": "### Human: q1### Assistant: a1### Human: q2### Assistant: a2"}

* the Llama-2 chat format (``mlabonne/guanaco-llama2-1k``)::

      {"text": "<s>[INST] q1 [/INST] a1 </s><s>[INST] q2 [/INST] a2 </s>"}

We keep the *first turn* (q1, a1) of every row: it is the only turn that makes sense
without the conversation before it, which is also how the paper builds its seed data
from Open Assistant. Rows with more turns are counted (``multi_turn_rows``) and, with
``single_turn_only=True``, dropped. Note that guanaco is multilingual and has no
language field, so nothing here filters by language.

A row that does not follow the detected format (no "### Human:" at the start, no
"### Assistant:" after it, no "[INST] ... [/INST]") raises DataError naming file:line:
that means the wrong file or a broken export, not a row to skip quietly.
"""
from __future__ import annotations

import re
from pathlib import Path

from data.hub import resolve
from data.pairs import DataError, Pair, dedupe, iter_jsonl, make_id

HUB_ID = "timdettmers/openassistant-guanaco"
HUB_FILE = "openassistant_best_replies_train.jsonl"
# Its eval split as a data.readers spec: the held-out pairs of evaluate.py and of the GPU
# presets (no stage trains on them).
EVAL_SPEC = f"guanaco:{HUB_ID}/openassistant_best_replies_eval.jsonl"

HUMAN, ASSISTANT = "### Human:", "### Assistant:"
_ROLE = re.compile(r"(### Human:|### Assistant:)")
# One Llama-2 turn: "[INST] question [/INST] answer", the answer ending at "</s>",
# at the next "[INST]" (a trailing unanswered question) or at the end of the text.
_INST_TURN = re.compile(r"\[INST\](.*?)\[/INST\](.*?)(?=</s>|\[INST\]|$)", re.S)
_SYS_BLOCK = re.compile(r"<<SYS>>.*?<</SYS>>", re.S)


def detect_format(text: str) -> str:
    """``"llama2"`` or ``"human_assistant"`` from one row's text; ``""`` if neither."""
    if "[INST]" in text:
        return "llama2"
    if text.lstrip().startswith(HUMAN):
        return "human_assistant"
    return ""


def _first_turn_human_assistant(text: str, where: str) -> tuple[str, str, int]:
    """(question, answer, number of human turns) of a "### Human:" row."""
    pieces = _ROLE.split(text)  # ["", "### Human:", q1, "### Assistant:", a1, ...]
    if pieces[0].strip() or len(pieces) < 3 or pieces[1] != HUMAN:
        raise DataError(f"{where}: expected the text to start with {HUMAN!r}")
    if len(pieces) < 5 or pieces[3] != ASSISTANT:
        raise DataError(f"{where}: expected {ASSISTANT!r} after the first {HUMAN!r} turn")
    n_human = pieces.count(HUMAN)
    return pieces[2].strip(), pieces[4].strip(), n_human


def _first_turn_llama2(text: str, where: str) -> tuple[str, str, int]:
    """(question, answer, number of [INST] turns) of a Llama-2 chat row."""
    turns = _INST_TURN.findall(text)
    if not turns:
        raise DataError(f"{where}: expected '[INST] question [/INST] answer'")
    question, answer = turns[0]
    question = _SYS_BLOCK.sub("", question)  # a system prompt is not the user's question
    return question.strip(), answer.strip(), text.count("[INST]")


def read_guanaco(
    source: str | Path = HUB_ID, *, single_turn_only: bool = False
) -> tuple[list[Pair], dict[str, int]]:
    """Read first turns from a guanaco file (either format) as seed pairs.

    Args:
        source: local file/folder, or hub id (default: guanaco's train split).
        single_turn_only: drop rows that continue after the first answer.

    Returns:
        (pairs, stats) with stats keys ``rows``, ``kept``, ``multi_turn_rows``,
        ``dropped_multi_turn``, ``dropped_empty``, ``dropped_duplicate``.
    """
    path = resolve(source, HUB_FILE)
    stats = dict(rows=0, kept=0, multi_turn_rows=0, dropped_multi_turn=0, dropped_empty=0,
                 dropped_duplicate=0)
    fmt = ""
    pairs: list[Pair] = []
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        stats["rows"] += 1
        text = row.get("text")
        if not isinstance(text, str):
            raise DataError(f"{where}: expected a string field 'text'")
        if not fmt:  # the first row decides the format of the whole file
            fmt = detect_format(text)
            if not fmt:
                raise DataError(
                    f"{where}: unrecognised guanaco text; expected it to start with "
                    f"{HUMAN!r} or '<s>[INST]'"
                )
        parse = _first_turn_llama2 if fmt == "llama2" else _first_turn_human_assistant
        question, answer, n_turns = parse(text, where)
        if n_turns > 1:
            stats["multi_turn_rows"] += 1
            if single_turn_only:
                stats["dropped_multi_turn"] += 1
                continue
        if not question or not answer:
            stats["dropped_empty"] += 1
            continue
        pairs.append(Pair(make_id("guanaco", question, answer), question, answer, "guanaco"))
    pairs, stats["dropped_duplicate"] = dedupe(pairs)
    stats["kept"] = len(pairs)
    return pairs, stats
