"""Sharing self-augmentation and rating out over several processes, and joining their outputs.

Two ways to split the work:

* **by hand**, ``--shard i/n``: this process takes every n-th item from position i
  (:func:`shard`) and writes its own ``--out``; n such runs together cover every item once;
* **under torchrun** (N processes): rank r takes every N-th *batch* (:func:`shard_batches`),
  appends to its own part file (``aug.jsonl`` -> ``aug.rank{r}-of-{N}.jsonl``, resumable like any
  output, :func:`part_path`), and rank 0 finally merges the parts into ``aug.jsonl`` in input
  order (:func:`merge_parts`). Since every batch is one a single process would have formed, and
  a sampled prompt's randomness is its own (``model.engine.row_seed``), the merged file of an
  uninterrupted run holds exactly what one process would have written.

:func:`split_work` and :func:`merge_ranks` are the two calls a command makes: before its work
(which items, which file, which other files count as done) and after it.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from data.pairs import append_jsonl, batches, dropped_path, read_done_ids
from humback.cli import UsageError

T = TypeVar("T")

# Under torchrun, a rank that finishes its shard early waits for the others at the end; with
# sampled lengths the shards can finish hours apart on a big run, so the wait may be long.
RANKS_WAIT = timedelta(hours=24)


# ---------------------------------------------------------------------------- by hand


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with 0 <= i < n, or ValueError with a one-line message."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard {spec!r}: expected i/n, e.g. 0/4 for the first of four shards") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {spec!r}: need 0 <= i < n")
    return i, n


def shard_flag(spec: str | None) -> tuple[int, int]:
    """``--shard i/n`` as (i, n), (0, 1) without it; a UsageError for a bad spec, or for --shard
    under torchrun (which shares the work out itself: see :func:`split_work`)."""
    from lora import distributed
    if spec and distributed.launched_by_torchrun():
        raise UsageError("--shard splits the input by hand; under torchrun each process takes its share itself")
    try:
        return parse_shard(spec) if spec else (0, 1)
    except ValueError as e:
        raise UsageError(str(e)) from None


def shard(items: Sequence[T], i: int, n: int) -> list[T]:
    """Shard ``i`` of ``n``: every n-th item starting at position i (``items[i::n]``).

    The n shards together hold every item exactly once, whatever the lengths, so n
    machines can each run one shard (each with its own output file; concatenate after).
    Splitting by position rather than by hash keeps the shards equal in size.
    """
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need 0 <= i < n")
    return list(items[i::n])


def shard_batches(items: Sequence[T], size: int, i: int, n: int) -> list[T]:
    """Shard ``i`` of ``n`` by whole batches: batches i, i + n, i + 2n, ... of ``batches(items, size)``.

    Unlike :func:`shard` (every n-th item), each shard is made of the very batches one process
    would form, so batch by batch it computes the same thing: the same rows prefilled and decoded
    together."""
    return [x for batch in shard(batches(items, size), i, n) for x in batch]


# ------------------------------------------------------------- parts of a distributed run


def part_path(out_path: str | Path, rank: int, world: int) -> Path:
    """Rank ``rank`` of ``world``'s own output: ``aug.jsonl`` -> ``aug.rank0-of-2.jsonl``."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.rank{rank}-of-{world}{out_path.suffix}")


def part_files(out_path: str | Path) -> list[Path]:
    """The part files of ``out_path`` that ranks wrote, whatever their number (an interrupted run
    may have used another). A part counts when its file or its dropped sidecar is on disk: a rank
    whose every row was dropped wrote only the sidecar (``aug.rank0-of-2.dropped.jsonl``), and its
    rows must be merged and counted as done like any other."""
    out_path = Path(out_path)
    name = re.compile("(" + re.escape(out_path.stem) + r"\.rank\d+-of-\d+)(?:\.dropped)?" + re.escape(out_path.suffix))
    folder = out_path.parent
    if not folder.is_dir():
        return []
    return sorted({folder / (m.group(1) + out_path.suffix) for p in folder.iterdir() if (m := name.fullmatch(p.name))})


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
        p.unlink(missing_ok=True)  # a part may be its sidecar alone
        dropped_path(p).unlink(missing_ok=True)
    return appended


# ------------------------------------------------------------------- a command's two calls


def split_work(items: list, out: str, batch_size: int, i: int, n: int) -> tuple[list, Path, list[Path]]:
    """This process's share of ``items``, the file it appends to, and other files whose ids count as done.

    * under torchrun (N processes): rank r takes batches r, r + N, ... (whole batches, so each is
      one a single process would form) and appends to its part file (:func:`part_path`);
      :func:`merge_ranks` joins the parts at the end;
    * ``--shard i/n`` by hand: every n-th item from position i, to OUT (one OUT per shard);
    * otherwise: everything, to OUT.
    """
    from lora import distributed
    rank, world = distributed.rank(), distributed.world_size()
    if world > 1:
        part = part_path(out, rank, world)
        return shard_batches(items, batch_size, rank, world), part, done_elsewhere(out, part)
    return shard(items, i, n), Path(out), []


def add_counts(all_counts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several ranks' counts added up key by key (nested ones, like dropped_by_reason, too)."""
    total: dict[str, Any] = {}
    for counts in all_counts:
        for k, v in counts.items():
            if isinstance(v, dict):
                total[k] = dict(sorted((Counter(total.get(k, {})) + Counter(v)).items()))
            else:
                total[k] = total.get(k, 0) + v
    return total


def merge_ranks(out: str, order: list[str], counts: dict[str, Any]) -> dict[str, Any] | None:
    """Under torchrun: wait until every rank has finished its share, then rank 0 merges the part
    files into ``out`` in the input ``order`` (ids) and gets the counts added up over ranks; the
    other ranks get None (their work is done). Alone: ``counts`` as they are."""
    from lora import distributed
    if distributed.world_size() == 1:
        return counts
    distributed.barrier()  # from here on, every part file is complete
    all_counts = distributed.gather_objects(counts)
    if not distributed.is_main():
        return None
    merge_parts(out, order)
    return add_counts(all_counts)
