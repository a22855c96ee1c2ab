"""Data for instruction backtranslation (Humback, Li et al. 2023, arXiv:2308.06259): the readers
and formats. The method's steps that work on the data are in ``humback/``.

What the method needs, and where it comes from here:

* **seed pairs** (instruction, output) written by humans: :func:`read_oasst1` (the
  paper's recipe), :func:`read_guanaco`, :func:`read_lima`, :func:`read_csv`;
* **unlabelled text**, outputs with no instruction: :func:`read_web` (web pages cut
  into passages), or any labelled set through :func:`as_unlabelled`;
* **held-out prompts** to evaluate on: :func:`read_lima_prompts`;
* the small **demo set** of our own in ``data/demo/`` (:data:`DEMO_DIR`, read with
  :func:`read_pairs`), so everything runs without downloading anything.

Modules, one job each:

==============  ==================================================================
pairs           the :class:`Pair` record, stable ids, JSONL read/append/atomic write,
                and resuming (which ids an output already holds)
hub             "local path or hub dataset id" -> local file
guanaco, lima,  one reader per source; each returns ``(pairs, stats)``, stats being
oasst1, web,    counts of rows kept and dropped by reason, for the caller to print
csvfile         (:func:`format_stats`); csvfile also writes the homework CSV
readers         ``load_source("kind:path_or_id")`` dispatcher
templates       every prompt: forward, backward, rating (paper Table 1), judge
batching        (prompt, target) -> padded token batches with a target-only loss
                mask, and that loss (needs torch, so it is not imported here)
==============  ==================================================================
"""
from __future__ import annotations

from pathlib import Path

from data.csvfile import read_csv
from data.guanaco import read_guanaco
from data.lima import read_lima, read_lima_prompts
from data.oasst1 import read_oasst1
from data.pairs import (
    DataError,
    Pair,
    append_jsonl,
    as_unlabelled,
    dedupe,
    iter_jsonl,
    make_id,
    read_jsonl,
    read_pairs,
    sample,
    write_jsonl_atomic,
)
from data.readers import format_stats, load_source
from data.web import read_web

DEMO_DIR = Path(__file__).resolve().parent / "demo"

__all__ = [
    "DEMO_DIR",
    "DataError",
    "Pair",
    "append_jsonl",
    "as_unlabelled",
    "dedupe",
    "format_stats",
    "iter_jsonl",
    "load_source",
    "make_id",
    "read_csv",
    "read_guanaco",
    "read_jsonl",
    "read_lima",
    "read_lima_prompts",
    "read_oasst1",
    "read_pairs",
    "read_web",
    "sample",
    "write_jsonl_atomic",
]
