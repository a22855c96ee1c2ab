"""Self-augmentation: the backward model writes an instruction for every unlabelled text.

Step 1 of instruction backtranslation (Li et al. 2023, Section 2.2). A backward model
p(instruction | output), fine-tuned on the seed pairs read "the other way round", is shown
each unlabelled text (a web passage, or a LIMA answer with its question removed) as if
it were an answer::

    ### Response:
    <the unlabelled text>

    ### Instruction:
    <the model writes here>

and whatever it writes becomes the text's instruction: a candidate training pair
(instruction, output). Many candidates are poor; self-curation (:mod:`data.curate`)
rates them and keeps the best. This module only drops the ones that are broken in
ways no rater is needed to see (empty, a copy of the text, a stuck loop), so the
rater's time is not wasted on them.

The model work is a parameter, ``complete(prompts) -> texts``, so the stage can be read
and tested without a model; ``generate.py`` passes a lambda around
:func:`model.sampling.generate`.

Long runs get killed. Results are appended to the output file one batch at a time
(:func:`data.pairs.append_jsonl` fsyncs each batch), dropped texts go to a sidecar file
``<out>.dropped.jsonl`` with the reason, and a re-run skips every id found in either
file. An interrupted run therefore resumes where it stopped, losing at most the batch
that was being generated, and no id is ever written twice.

Several processes (``torchrun``, see ``generate.py``): rank r of n takes every n-th *batch*
(:func:`shard_batches`), appends to its own part file (``aug.jsonl`` -> ``aug.rank{r}-of-{n}.jsonl``,
resumable like any output), and rank 0 finally merges the parts into ``<out>`` in input order
(:func:`merge_parts`). Since every batch is one a single process would have formed, and
``generate.py`` seeds sampling by a batch's content, the merged file of an uninterrupted run
holds exactly what one process would have written.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from data.pairs import DataError, Pair, append_jsonl, require_unique_ids
from data.templates import backward_prompt

T = TypeVar("T")

# A generated instruction must be at least this long to be a request at all ("Hi", "?"),
# and at most this long: a backward model that never stopped has written a text, not a
# question. Instructions in the seed data are 20-300 characters; LIMA's longest are
# a few thousand.
MIN_CHARS = 10
MAX_CHARS = 2000

# The backward prompt's headers. A model that has finished the instruction often goes
# on with the next header, as in its training text; everything from there on is cut.
_HEADER = re.compile(r"^[ \t]*#{2,}[ \t]*(?:Instruction|Response|Input)\b", re.IGNORECASE | re.MULTILINE)

# What the sampler should stop at, to save the tokens after the instruction
# (``generate(..., stop=AUGMENT_STOPS)``); :func:`clean_instruction` cuts them anyway.
AUGMENT_STOPS = ("\n### ", "\n\n\n")

Complete = Callable[[list[str]], list[str]]


# ------------------------------------------------------------------------ cleaning


def clean_instruction(text: str) -> str:
    """The instruction in a backward model's raw text: cut at the next header, strip."""
    match = _HEADER.search(text)
    if match:
        text = text[:match.start()]
    return text.strip()


def _normalise(text: str) -> str:
    """Lower case, single spaces: how we compare texts that differ only in layout."""
    return " ".join(text.lower().split())


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def is_repetitive(text: str, min_repeats: int = 3, share: float = 0.5) -> bool:
    """True when one word n-gram (n = 1..4) repeated ``min_repeats``+ times makes up at
    least ``share`` of the words, or one character repeats 10+ times in a row.

    That is the signature of a sampler stuck in a loop ("how to how to how to ...",
    "?????????"). Ordinary sentences reuse short words, but not half of themselves.
    """
    if re.search(r"(.)\1{9,}", text):
        return True
    words = text.lower().split()
    for n in range(1, 5):
        if len(words) < (8 if n == 1 else 6):
            continue  # too few words to call anything a loop (single words: "the" is common)
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        _, count = grams.most_common(1)[0]
        if count >= min_repeats and count * n >= share * len(words):
            return True
    return False


def degenerate_reason(instruction: str, output: str, min_chars: int = MIN_CHARS,
                      max_chars: int = MAX_CHARS) -> str | None:
    """Why a (cleaned) generated instruction is unusable, or None if it looks fine.

    Reasons, checked in this order: ``empty``; ``too_short`` (under ``min_chars``
    characters); ``too_long`` (over ``max_chars``); ``copies_output`` (the instruction is
    the start of the text it should ask for, e.g. its first sentence: a backward model's
    laziest guess, which teaches nothing); ``repetitive`` (see :func:`is_repetitive`).
    """
    if not instruction:
        return "empty"
    if len(instruction) < min_chars:
        return "too_short"
    if len(instruction) > max_chars:
        return "too_long"
    ni = _normalise(instruction).rstrip(" .?!:;,")
    no = _normalise(output)
    # Copy if the texts agree on the instruction's whole length, or on 40+ characters
    # (a long copy that drifts off later is still a copy).
    if ni and _common_prefix(ni, no) >= min(len(ni), 40):
        return "copies_output"
    if is_repetitive(instruction):
        return "repetitive"
    return None


# ---------------------------------------------------------------------- resuming


def dropped_path(out_path: str | Path) -> Path:
    """The sidecar file for dropped rows: ``aug.jsonl`` -> ``aug.dropped.jsonl``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name.removesuffix(".jsonl") + ".dropped.jsonl")


def read_done_ids(*paths: str | Path) -> set[str]:
    """The ids already in these JSONL files (missing files count as empty).

    A last line without its newline is the remains of a write that a crash cut short:
    it is ignored here (so that row is done again) and removed by the next
    :func:`data.pairs.append_jsonl`. Any other unreadable line is an error, because
    silently redoing it could write its id twice.
    """
    done: set[str] = set()
    for path in map(Path, paths):
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        # split("\n") leaves "" after the final newline; anything else there is torn.
        for lineno, line in enumerate(lines[:-1], start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); cannot tell which rows are done") from None
            if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                raise DataError(f"{path}:{lineno}: expected a JSON object with a string 'id'")
            done.add(row["id"])
    return done


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with 0 <= i < n, or ValueError with a one-line message."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard {spec!r}: expected i/n, e.g. 0/4 for the first of four shards") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {spec!r}: need 0 <= i < n")
    return i, n


def shard(items: Sequence[T], i: int, n: int) -> list[T]:
    """Shard ``i`` of ``n``: every n-th item starting at position i (``items[i::n]``).

    The n shards together hold every item exactly once, whatever the lengths, so n
    machines can each run one shard (each with its own output file; concatenate after).
    Splitting by position rather than by hash keeps the shards equal in size.
    """
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need 0 <= i < n")
    return list(items[i::n])


def batches(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive chunks of ``size`` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [list(items[k:k + size]) for k in range(0, len(items), size)]


def shard_batches(items: Sequence[T], size: int, i: int, n: int) -> list[T]:
    """Shard ``i`` of ``n`` by whole batches: batches i, i + n, i + 2n, ... of ``batches(items, size)``.

    Unlike :func:`shard` (every n-th item), each shard is made of the very batches one process
    would form, so batch by batch it computes the same thing: the same padding, and the same
    sampling seed where the seed depends on the batch's prompts (``generate.batch_seed``)."""
    return [x for batch in shard(batches(items, size), i, n) for x in batch]


# ------------------------------------------------------------- parts of a distributed run


def part_path(out_path: str | Path, rank: int, world: int) -> Path:
    """Rank ``rank`` of ``world``'s own output: ``aug.jsonl`` -> ``aug.rank0-of-2.jsonl``."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.rank{rank}-of-{world}{out_path.suffix}")


def part_files(out_path: str | Path) -> list[Path]:
    """The part files of ``out_path`` on disk, whatever the number of ranks that wrote them
    (an interrupted run may have used another number)."""
    out_path = Path(out_path)
    name = re.compile(re.escape(out_path.stem) + r"\.rank\d+-of-\d+" + re.escape(out_path.suffix))
    folder = out_path.parent
    return sorted(p for p in folder.iterdir() if name.fullmatch(p.name)) if folder.is_dir() else []


def done_elsewhere(out_path: str | Path, part: Path) -> list[Path]:
    """The files, besides ``part`` and its sidecar, whose ids a rank writing ``part`` must skip:
    ``out_path`` and every other part file, with their dropped sidecars."""
    files = [Path(out_path)] + [p for p in part_files(out_path) if p != part]
    return [f for path in files for f in (path, dropped_path(path))]


def _append_missing(target: Path, sources: Sequence[Path], position: dict[str, int]) -> int:
    """Append to ``target`` the rows of ``sources`` whose ids it lacks, in ``position`` order."""
    seen = read_done_ids(target)
    rows = []
    for source in sources:
        if not source.is_file():
            continue
        # Complete lines only: a last line without "\n" is a write that a crash cut short.
        for line in source.read_text(encoding="utf-8").split("\n")[:-1]:
            if line.strip() and (row := json.loads(line))["id"] not in seen:
                seen.add(row["id"])
                rows.append(row)
    rows.sort(key=lambda row: position.get(row["id"], len(position)))  # stable; unknown ids last
    return append_jsonl(target, rows) if rows else 0


def merge_parts(out_path: str | Path, order: Sequence[str]) -> int:
    """Append the rows of every part file of ``out_path`` to it, then delete the parts.

    Rows are appended sorted by their id's position in ``order`` (the input order), so a fresh
    run's merged file equals a single process's output. Ids already in ``out_path`` are skipped,
    so merging again after a crash never writes a row twice. Dropped sidecars are merged the same
    way, and the parts are deleted only once both merges are durable. Returns the number of rows
    appended to ``out_path``.
    """
    position = {id_: k for k, id_ in enumerate(order)}
    parts = part_files(out_path)
    appended = _append_missing(Path(out_path), parts, position)
    _append_missing(dropped_path(out_path), [dropped_path(p) for p in parts], position)
    for p in parts:
        p.unlink()
        dropped_path(p).unlink(missing_ok=True)
    return appended


# ------------------------------------------------------------------------- the stage


def augment(unlabelled: list[Pair], complete: Complete, out_path: str | Path, batch_size: int = 16,
            progress: bool = True, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS,
            done_files: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Write an instruction for every unlabelled text; append the pairs to ``out_path``.

    Args:
        unlabelled: the texts to backtranslate, as pairs whose ``output`` is the text
            (the instruction, if any, is ignored). Ids must be unique: they are how a
            re-run recognises finished work.
        complete: the backward model: a list of prompts in, one generated text per
            prompt out, in order.
        out_path: JSONL of ``{id, instruction, output, source[, meta]}`` rows, appended
            to. Dropped rows go to :func:`dropped_path` as ``{id, reason, generated}``.
        batch_size: prompts per ``complete`` call, and rows per durable write.
        done_files: more files whose ids count as done (a distributed rank's: see
            :func:`done_elsewhere`).

    Returns:
        counts: ``input`` (texts given), ``skipped_done`` (already in one of the files from
        an earlier run), ``written`` (pairs appended now), ``dropped`` (total now) and
        ``dropped_by_reason`` (reason -> count, see :func:`degenerate_reason`).
    """
    require_unique_ids(unlabelled, "the unlabelled data")
    out_path = Path(out_path)
    side = dropped_path(out_path)
    done = read_done_ids(out_path, side, *done_files)
    todo = [p for p in unlabelled if p.id not in done]
    stats: dict[str, Any] = dict(input=len(unlabelled), skipped_done=len(unlabelled) - len(todo),
                                 written=0, dropped=0, dropped_by_reason={})
    reasons: Counter[str] = Counter()
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="augment", unit="text")
    for batch in batches(todo, batch_size):
        texts = complete([backward_prompt(p.output) for p in batch])
        if len(texts) != len(batch):
            raise ValueError(f"complete() returned {len(texts)} texts for {len(batch)} prompts")
        kept: list[Pair] = []
        dropped: list[dict[str, str]] = []
        for pair, raw in zip(batch, texts):
            instruction = clean_instruction(raw)
            reason = degenerate_reason(instruction, pair.output, min_chars, max_chars)
            if reason is None:
                kept.append(Pair(pair.id, instruction, pair.output, pair.source, dict(pair.meta)))
            else:
                reasons[reason] += 1
                dropped.append({"id": pair.id, "reason": reason, "generated": raw})
        # Kept rows first: if we die between the two writes, only dropped rows are redone.
        if kept:
            append_jsonl(out_path, kept)
        if dropped:
            append_jsonl(side, dropped)
        stats["written"] += len(kept)
        stats["dropped"] += len(dropped)
        if bar:
            bar.update(len(batch))
    if bar:
        bar.close()
    stats["dropped_by_reason"] = dict(sorted(reasons.items()))
    return stats


def format_counts(stats: dict[str, Any]) -> str:
    """One line for the terminal, e.g. ``input=150 skipped_done=0 written=141 dropped=9 (empty=2, ...)``."""
    head = " ".join(f"{k}={v}" for k, v in stats.items() if not isinstance(v, dict))
    by_reason = stats.get("dropped_by_reason") or {}
    tail = " (" + ", ".join(f"{k}={v}" for k, v in by_reason.items()) + ")" if by_reason else ""
    return head + tail
