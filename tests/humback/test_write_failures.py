"""A full disk and a kill between writes, in the append-only stages: one clear line naming the
file, never a torn line, and a resumed run equal to an uninterrupted one."""
from __future__ import annotations

import builtins
import errno
from pathlib import Path

import pytest

import data.pairs
import humback.backtranslate as backtranslate
from data.pairs import Pair, WriteError, append_jsonl, atomic_writer, dropped_path, read_jsonl
from humback.backtranslate import augment
from humback.cli import fail
from tests.humback.test_backtranslate import texts


class DiskFullAfter:
    """Stands in for ``open`` in data.pairs: appends write ``room`` more bytes in all, then fail
    with ENOSPC in mid-write, the way a filling disk does."""

    def __init__(self, room: int):
        self.room = room

    def __call__(self, path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        if "a" not in mode:
            return f
        opener = self
        real_write = f.write

        class Filling:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, text):
                n = min(len(text), opener.room)
                real_write(text[:n])
                opener.room -= n
                if n < len(text):
                    f.flush()
                    raise OSError(errno.ENOSPC, "No space left on device")
                return n

            def __getattr__(self, name):
                return getattr(f, name)
        return Filling()


def test_a_full_disk_in_mid_append_leaves_whole_lines_and_names_the_file(tmp_path, monkeypatch, capsys):
    out = tmp_path / "rated.jsonl"
    append_jsonl(out, [{"id": "a", "x": 1}, {"id": "b", "x": 2}])
    before = out.read_bytes()
    monkeypatch.setattr(data.pairs, "open", DiskFullAfter(room=25), raising=False)
    with pytest.raises(WriteError) as e:
        append_jsonl(out, [{"id": "c", "x": 3}, {"id": "d", "x": 4}], "rated rows")
    assert out.read_bytes() == before  # the half-written batch is cut off again
    assert fail(e.value) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out}: appending 2 rated rows failed (No space left on device); the file still ends " \
                  "at its last whole row, and a rerun resumes from there\n"


def test_a_full_disk_in_an_atomic_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "curated.jsonl"
    path.write_text("old\n")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(data.pairs.os, "fsync", full)
    with pytest.raises(WriteError, match=rf"^{path}: writing it failed \(No space left on device\)"):
        with atomic_writer(path) as f:
            f.write("new\n")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["curated.jsonl"]


def batch_dependent_backward(bad: set[int]):
    """A fake backward model whose instruction for a text depends on the batch it is in (as a real
    one's can, through padding or the batch's sampling seed); texts in ``bad`` get an empty one
    (dropped)."""
    def complete(prompts: list[str]) -> list[str]:
        ids = [int(p.split("Passage number ")[1].split(".")[0]) for p in prompts]
        return ["" if i in bad else f"Why are there tides, question {i} of a batch from {ids[0]}?" for i in ids]
    return complete


def kill_between_the_two_writes(monkeypatch, at_batch: int):
    """The process dies after batch ``at_batch``'s kept rows are written, before its dropped rows."""
    real = backtranslate.append_jsonl
    seen = {"n": 0}

    def append(path, rows, what="rows"):
        if Path(path).name.endswith(".dropped.jsonl"):
            seen["n"] += 1
            if seen["n"] == at_batch:
                raise KeyboardInterrupt  # kill -9, as far as the files can tell
        return real(path, rows, what)
    monkeypatch.setattr(backtranslate, "append_jsonl", append)


def test_a_kill_between_a_batchs_two_writes_resumes_to_the_uninterrupted_output(tmp_path, monkeypatch):
    items, bad = texts(11), {1, 4, 7}  # one dropped row in each of the first three batches of 3
    clean = tmp_path / "clean.jsonl"
    augment(items, batch_dependent_backward(bad), clean, batch_size=3, progress=False)

    out = tmp_path / "aug.jsonl"
    kill_between_the_two_writes(monkeypatch, at_batch=2)
    with pytest.raises(KeyboardInterrupt):
        augment(items, batch_dependent_backward(bad), out, batch_size=3, progress=False)
    monkeypatch.undo()
    assert [r["id"] for r in read_jsonl(out)] == ["t-00", "t-02", "t-03", "t-05"]  # batch 2 half recorded
    stats = augment(items, batch_dependent_backward(bad), out, batch_size=3, progress=False)
    assert stats["written"] == 4 and stats["dropped"] == 2  # batch 2: its dropped row; then batches 3 and 4
    assert out.read_text() == clean.read_text()
    assert dropped_path(out).read_text() == dropped_path(clean).read_text()


def test_a_full_disk_then_a_resume_loses_and_duplicates_nothing(tmp_path, monkeypatch):
    items = texts(10)
    clean = tmp_path / "clean.jsonl"
    augment(items, batch_dependent_backward({5}), clean, batch_size=3, progress=False)
    out = tmp_path / "aug.jsonl"
    room = sum(len(x) + 1 for x in clean.read_text().splitlines()[:3]) + 30
    monkeypatch.setattr(data.pairs, "open", DiskFullAfter(room), raising=False)
    with pytest.raises(WriteError, match=str(out)):
        augment(items, batch_dependent_backward({5}), out, batch_size=3, progress=False)
    monkeypatch.undo()
    assert out.read_text().endswith("\n") and len(out.read_text().splitlines()) == 3  # whole batches only
    augment(items, batch_dependent_backward({5}), out, batch_size=3, progress=False)
    assert out.read_text() == clean.read_text()
    assert dropped_path(out).read_text() == dropped_path(clean).read_text()


def test_a_killed_greedy_run_of_a_real_model_resumes_to_the_same_output(tmp_path, monkeypatch):
    """The same with a tiny random Llama (fp32, greedy) as the backward model."""
    from model import generate, load_model
    from tests.tiny import make_tiny
    model, tok = load_model(make_tiny(tmp_path / "tiny", std=0.1), device="cpu", dtype="fp32")

    def complete(prompts: list[str]) -> list[str]:
        outs = generate(model, tok, prompts, max_new_tokens=12, temperature=0.0, batch_size=len(prompts))
        # texts 1, 4 and 7 dropped, so that every batch has its two writes
        return ["" if any(f"Passage number {i}." in p for i in (1, 4, 7)) else o for p, o in zip(prompts, outs)]
    items = [Pair(p.id, "", p.output + " " * (int(p.id[2:]) % 3) * 7 + "x" * int(p.id[2:]), p.source)
             for p in texts(9)]  # mixed lengths, so batches are padded
    clean = tmp_path / "clean.jsonl"
    augment(items, complete, clean, batch_size=3, progress=False, min_chars=1)
    out = tmp_path / "aug.jsonl"
    kill_between_the_two_writes(monkeypatch, at_batch=2)
    with pytest.raises(KeyboardInterrupt):
        augment(items, complete, out, batch_size=3, progress=False, min_chars=1)
    monkeypatch.undo()
    augment(items, complete, out, batch_size=3, progress=False, min_chars=1)
    assert out.read_text() == clean.read_text() and out.read_text()
    assert dropped_path(out).read_text() == dropped_path(clean).read_text()
