"""The one record every stage passes around, and the JSONL files it lives in.

Humback works on (instruction, output) pairs:

* seed data are human-written pairs (both fields filled);
* unlabelled data are outputs only (``instruction == ""``) until the backward model
  writes an instruction for them (self-augmentation);
* held-out prompts are instructions only (``output == ""``).

Every pair has a stable ``id`` (the same input gives the same id on every run), so a
stage that crashed half-way can re-read its own output file and skip the ids already
done (:func:`read_done_ids`). That is also why the writers here are careful: ``append_jsonl``
fsyncs each batch (a crash loses at most the batch being written) and ``write_jsonl_atomic``
replaces a file in one step (a reader never sees half a file).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import random
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, IO, TypeVar


T = TypeVar("T")


class DataError(ValueError):
    """Input data that cannot be used, with a one-line message saying where and why.

    Messages name the file (and line, where there is one) and what was expected, so a
    command-line tool can print ``str(error)`` alone, without a traceback.
    """


@dataclass
class Pair:
    """One training example (or half of one).

    Attributes:
        id: stable identifier, unique within a file (see :func:`make_id`).
        instruction: the user's request; ``""`` for unlabelled text.
        output: the answer; ``""`` for a prompt with no answer yet.
        source: where the pair came from ("guanaco", "lima", "web", ...).
        meta: optional extra string fields a source carries (e.g. the homework CSV's
            ``fail_mode``); left out of the JSON when empty.
    """

    id: str
    instruction: str
    output: str
    source: str = ""
    meta: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to a JSONL file (``meta`` only when non-empty)."""
        row: dict[str, Any] = {
            "id": self.id,
            "instruction": self.instruction,
            "output": self.output,
            "source": self.source,
        }
        if self.meta:
            row["meta"] = dict(self.meta)
        return row

    @classmethod
    def from_dict(cls, row: Mapping[str, Any], where: str = "") -> "Pair":
        """Build a Pair from a JSON object, or raise DataError naming ``where``.

        ``instruction`` and ``output`` are required strings; ``id`` (derived from the
        content with :func:`make_id` when absent), ``source`` and ``meta`` are optional.
        """
        prefix = f"{where}: " if where else ""
        missing = [k for k in ("instruction", "output") if k not in row]
        if missing:
            raise DataError(
                f"{prefix}missing field(s) {missing}; expected a pair "
                '{"instruction", "output"[, "id", "source"]}'
            )
        if "id" not in row:  # a plain {instruction, output} file: derive a stable id from the content
            row = {**row, "id": make_id(str(row.get("source") or "pair"), str(row["instruction"]), str(row["output"]))}
        for key in ("id", "instruction", "output", "source"):
            if key in row and not isinstance(row[key], str):
                raise DataError(f"{prefix}field {key!r} must be a string, got {type(row[key]).__name__}")
        if not row["id"]:
            raise DataError(f"{prefix}field 'id' is empty")
        meta = row.get("meta") or {}
        if not isinstance(meta, dict):
            raise DataError(f"{prefix}field 'meta' must be an object, got {type(meta).__name__}")
        return cls(
            id=row["id"],
            instruction=row["instruction"],
            output=row["output"],
            source=row.get("source", ""),
            meta={str(k): str(v) for k, v in meta.items()},
        )


def make_id(source: str, instruction: str, output: str) -> str:
    """A stable id from the pair's content: ``"<source>-<12 hex digits>"``.

    Hashing the content (rather than numbering rows) keeps an id the same when a filter
    or a sample changes which rows come before it, so a resumed run still recognises the
    pairs it has already processed. Two identical pairs get the same id; the readers
    drop such exact duplicates (see :func:`dedupe`).
    """
    digest = hashlib.sha1(f"{instruction}\x1f{output}".encode("utf-8")).hexdigest()
    return f"{source}-{digest[:12]}"


def dedupe(pairs: Iterable[Pair]) -> tuple[list[Pair], int]:
    """Keep the first pair of each id; return (kept pairs, number dropped)."""
    seen: set[str] = set()
    kept: list[Pair] = []
    dropped = 0
    for pair in pairs:
        if pair.id in seen:
            dropped += 1
        else:
            seen.add(pair.id)
            kept.append(pair)
    return kept, dropped


def require_unique_ids(pairs: Iterable[Pair], what: str) -> None:
    """Raise DataError naming a few repeated ids: every resumable stage (augmentation, rating)
    skips the ids its output already holds, so a repeated id would silently lose a row."""
    counts = Counter(p.id for p in pairs)
    dupes = sorted(i for i, c in counts.items() if c > 1)
    if dupes:
        raise DataError(f"duplicate ids in {what} (e.g. {dupes[:3]}); resuming needs unique ids")


def as_unlabelled(pairs: Iterable[Pair]) -> list[Pair]:
    """The same pairs with the instruction removed: outputs to backtranslate.

    Used to turn a labelled set (e.g. LIMA's answers) into unlabelled data, so that
    a generated instruction can be compared with the human one it replaces.
    """
    return [dataclasses.replace(p, instruction="") for p in pairs]


def sample(pairs: list[Pair], n: int, seed: int) -> list[Pair]:
    """A deterministic random subset of ``n`` pairs, in their original order.

    The same (pairs, n, seed) always gives the same subset; keeping the input order
    makes two samples easy to diff. ``n >= len(pairs)`` returns all of them.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n >= len(pairs):
        return list(pairs)
    chosen = sorted(random.Random(seed).sample(range(len(pairs)), n))
    return [pairs[i] for i in chosen]


def sample_to_budget(pairs: list[Pair], budget: int, size: Callable[[Pair], int], seed: int) -> list[Pair]:
    """A deterministic random subset whose sizes add up to ``budget``, in input order.

    Pairs are taken in a seeded random order until ``size(pair)`` summed reaches ``budget`` (the
    last one may overshoot). With ``size`` = the answer tokens a pair trains on, this is the fair
    "random set of the same size" for a selection whose answers are shorter or longer than
    average: as much training text, not as many pairs.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total >= budget:
            break
        chosen.append(i)
        total += size(pairs[i])
    return [pairs[i] for i in sorted(chosen)]


# ---------------------------------------------------------------------------- JSONL


def _open_text(path: Path, mode: str = "r") -> IO[str]:
    """Open a text file, transparently gunzipping ``*.gz`` (hub exports often are)."""
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8")  # type: ignore[return-value]
    return open(path, mode, encoding="utf-8")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file.

    Line numbers start at 1, so readers can point at ``file:line`` when a row's
    *content* is wrong. Raises DataError for a missing file, a line that is not a JSON
    object, or a file with no rows at all.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    n_rows = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue  # blank lines (often a trailing one) carry no row
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); "
                        "expected one JSON object per line"
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(
                        f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}"
                    )
                n_rows += 1
                yield lineno, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:  # e.g. a truncated .gz
        raise DataError(f"{path}: cannot read ({e})") from None
    if n_rows == 0:
        raise DataError(f"{path}: file is empty; expected one JSON object per line")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a JSONL file as dicts (errors as in :func:`iter_jsonl`)."""
    return [row for _, row in iter_jsonl(path)]


def read_pairs(path: str | Path) -> list[Pair]:
    """Read a file of Pair rows (as written by :func:`append_jsonl` / :func:`write_jsonl_atomic`)."""
    return [Pair.from_dict(row, where=f"{path}:{lineno}") for lineno, row in iter_jsonl(path)]


def _as_row(row: Pair | Mapping[str, Any]) -> Mapping[str, Any]:
    return row.to_dict() if isinstance(row, Pair) else row


def _dump(row: Pair | Mapping[str, Any]) -> str:
    # ensure_ascii=False keeps non-English text readable in the file.
    return json.dumps(_as_row(row), ensure_ascii=False) + "\n"


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that has no newline: the remains of a write a crash interrupted.

    Every complete row ends with "\\n", so bytes after the last newline are a row that
    was never finished; it is not "done", and a resumed run will redo it.
    """
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Walk back to the last newline (rows are small; read the tail in chunks).
        pos = size
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                f.truncate(pos + cut + 1)
                return
        f.truncate(0)


class WriteError(OSError):
    """Writing a batch of rows failed (a full disk, a lost mount): the message names the file and
    what was being written, and says the file still ends at its last whole row."""


def append_jsonl(path: str | Path, rows: Iterable[Pair | Mapping[str, Any]], what: str = "rows") -> int:
    """Append rows to a JSONL file and make them durable; return how many were written.

    Append-only, so earlier results are never rewritten. The whole batch goes out in one
    ``write`` of whole lines, then flush and fsync, so once this returns the rows survive a
    crash or power loss; call it once per batch (not per row: fsync is slow). If the write
    fails (say the disk is full), the file is cut back to where it ended before, so it never
    ends in a torn line, and :class:`WriteError` names the file and ``what`` was being written.
    A torn last line left by an earlier crash (a kill in mid-write) is removed first
    (:func:`_drop_torn_tail`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        _drop_torn_tail(path)
    text = "".join(_dump(r) for r in rows)
    n = text.count("\n")
    try:
        with open(path, "a", encoding="utf-8") as f:
            start = f.tell()
            try:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                f.truncate(start)  # all of this batch or none of it
                raise
    except OSError as e:
        raise WriteError(f"{path}: appending {n} {what} failed ({e.strerror or e}); the file still ends at its "
                         f"last whole row, and a rerun resumes from there") from None
    return n


@contextmanager
def atomic_writer(path: str | Path, newline: str | None = None) -> Iterator[IO[str]]:
    """Open a text file that replaces ``path`` in one step when the ``with`` block ends.

    Writes go to a temporary file in the same folder, which is fsync'ed and then renamed over
    ``path`` with ``os.replace`` (atomic on POSIX and Windows): a reader, or a run that crashes
    mid-write, sees either the old file or the new one, never a mix. An exception inside the
    block leaves ``path`` untouched and removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(f"{path}: writing it failed ({e.strerror or e}); the file is as it was before") from None
        raise


def write_jsonl_atomic(path: str | Path, rows: Iterable[Pair | Mapping[str, Any]]) -> int:
    """Replace ``path`` with these rows in one step (:func:`atomic_writer`); return how many
    were written."""
    n = 0
    with atomic_writer(path) as f:
        for row in rows:
            f.write(_dump(row))
            n += 1
    return n


# ------------------------------------------------------------------------- resuming


def batches(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive chunks of ``size`` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [list(items[k:k + size]) for k in range(0, len(items), size)]


def unfinished_batches(items: Sequence[T], size: int, done: set[str]) -> list[list[T]]:
    """The batches of ``items`` (:func:`batches`, by position in the whole input) that hold an item
    whose ``id`` is not in ``done``, each whole, done items included.

    This is the resume rule of every append-only stage: a batch is formed from the input as an
    uninterrupted run would have formed it, and is redone whole if any of its rows is missing
    (only the missing rows are written). Forming batches from the unfinished items alone would
    shift every later batch after a crash in mid-batch, and a row's output can depend on its
    batch (padding, the batch's sampling seed), so a resumed run would differ from an
    uninterrupted one. With this rule it equals it, wherever the crash fell.
    """
    return [batch for batch in batches(items, size) if any(x.id not in done for x in batch)]


def dropped_path(out_path: str | Path) -> Path:
    """The sidecar file for dropped rows: ``aug.jsonl`` -> ``aug.dropped.jsonl``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name.removesuffix(".jsonl") + ".dropped.jsonl")


def read_done_ids(*paths: str | Path) -> set[str]:
    """The ids already in these JSONL files (missing files count as empty).

    A last line without its newline is the remains of a write that a crash cut short:
    it is ignored here (so that row is done again) and removed by the next
    :func:`append_jsonl`. Any other unreadable line is an error, because
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
