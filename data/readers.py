"""One entry point for every data source: ``load_source("kind:path_or_hub_id")``.

Each reader lives in its own module and returns ``(pairs, stats)``:

=============  ==========================================  ===============================
kind           reader                                      gives
=============  ==========================================  ===============================
guanaco        :func:`data.guanaco.read_guanaco`           seed pairs (first turns)
lima           :func:`data.lima.read_lima`                 seed pairs (single-turn rows)
lima-prompts   :func:`data.lima.read_lima_prompts`         held-out prompts (no output)
oasst1         :func:`data.oasst1.read_oasst1`             seed pairs (paper's recipe)
web            :func:`data.web.read_web`                   unlabelled passages
csv            :func:`data.csvfile.read_csv`               homework pairs
pairs          :func:`data.pairs.read_pairs`               our own Pair JSONL (demo, outputs)
=============  ==========================================  ===============================

A spec is ``kind:source`` (``"lima:GAIR/lima"``, ``"web:/data/c4.jsonl"``), or a bare
local path whose kind is guessed from the file (see :func:`guess_kind`). A hub id
always needs its kind: guessing would mean downloading first.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from data.csvfile import read_csv
from data.guanaco import detect_format, read_guanaco
from data.lima import read_lima, read_lima_prompts
from data.oasst1 import read_oasst1
from data.pairs import DataError, Pair, iter_jsonl, read_pairs
from data.web import read_web

Reader = Callable[..., tuple[list[Pair], dict[str, int]]]


def _read_pairs_with_stats(source: str | Path) -> tuple[list[Pair], dict[str, int]]:
    pairs = read_pairs(source)
    return pairs, dict(rows=len(pairs), kept=len(pairs))


READERS: dict[str, Reader] = {
    "guanaco": read_guanaco,
    "lima": read_lima,
    "lima-prompts": read_lima_prompts,
    "oasst1": read_oasst1,
    "web": read_web,
    "csv": read_csv,
    "pairs": _read_pairs_with_stats,
}


def guess_kind(path: Path) -> str:
    """The reader for a local file, from its extension and first row.

    ``.csv`` -> csv; ``.txt`` -> web; JSONL: ``message_id`` -> oasst1,
    ``conversations`` -> lima (lima-prompts if the first has one turn), ``instruction``
    and ``output`` -> pairs, ``text`` -> guanaco if it looks like a chat, else web.
    """
    name = path.name.removesuffix(".gz")
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".txt"):
        return "web"
    _, row = next(iter_jsonl(path))
    if "message_id" in row:
        return "oasst1"
    if "conversations" in row:
        conv = row["conversations"]
        return "lima-prompts" if isinstance(conv, list) and len(conv) == 1 else "lima"
    if "instruction" in row and "output" in row:
        return "pairs"
    if isinstance(row.get("text"), str):
        return "guanaco" if detect_format(row["text"]) else "web"
    raise DataError(f"{path}: cannot tell the format from the first row's fields {sorted(row)}; "
                    f"write it as 'kind:{path}' with kind one of {sorted(READERS)}")


def split_spec(spec: str) -> tuple[str | None, str]:
    """``"kind:path_or_hub_id"`` as (kind, path_or_hub_id); a plain path as (None, path)."""
    kind, sep, rest = spec.partition(":")
    return (kind, rest) if sep and kind in READERS else (None, spec)


def load_source(spec: str, **options: Any) -> tuple[list[Pair], dict[str, int]]:
    """Read ``spec`` (``"kind:path_or_hub_id"`` or a local path) with the matching reader.

    ``options`` go to the reader (e.g. ``min_chars=300`` for web, ``lang="de"`` for oasst1).
    """
    kind, rest = split_spec(spec)
    if kind is not None:
        return READERS[kind](rest, **options)
    path = Path(spec).expanduser()
    if path.is_dir():
        raise DataError(f"{spec}: is a folder; name the file, or write 'kind:{spec}' "
                        f"with kind one of {sorted(READERS)}")
    if not path.is_file():
        raise DataError(f"{spec}: no such file; for a hub dataset write 'kind:owner/name' "
                        f"with kind one of {sorted(READERS)}")
    return READERS[guess_kind(path)](path, **options)


def format_stats(name: str, stats: dict[str, int]) -> str:
    """One printable line, e.g. ``lima: rows=1029 kept=1000 dropped_multi_turn=29``.

    Zero counts are left out to keep the line short.
    """
    return f"{name}: " + " ".join(f"{k}={v}" for k, v in stats.items() if v or k == "kept")
