"""humback.stages: a stage is skipped when done, resumed when interrupted with the same settings,
and started afresh (its folder cleared) when its settings or inputs changed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from humback.stages import MANIFEST, run_stage


class Interrupted(Exception):
    pass


def appender(rows: list[str], stop_after: int | None = None):
    """A stage body like augmentation: appends one line per row not yet in out.txt (resumable)."""
    def body(d: Path) -> list[str]:
        out = d / "out.txt"
        done = out.read_text().splitlines() if out.exists() else []
        for i, r in enumerate(r for r in rows if r not in done):
            if stop_after is not None and i == stop_after:
                raise Interrupted
            with open(out, "a") as f:
                f.write(r + "\n")
        return ["out.txt"]
    return body


def test_done_stage_is_skipped_and_a_changed_one_starts_afresh(tmp_path: Path) -> None:
    _, ran = run_stage("s", tmp_path, {"rater": "m0"}, [], appender(["a", "b"]))
    assert ran and (tmp_path / "s/out.txt").read_text() == "a\nb\n"
    _, ran = run_stage("s", tmp_path, {"rater": "m0"}, [], appender(["a", "b"]))
    assert not ran
    # another rater: the rows "a" and "b" it wrote must not count as done
    (tmp_path / "s/stale-checkpoint").write_text("x")
    _, ran = run_stage("s", tmp_path, {"rater": "m1"}, [], appender(["a", "b", "c"]))
    assert ran and (tmp_path / "s/out.txt").read_text() == "a\nb\nc\n"
    assert not (tmp_path / "s/stale-checkpoint").exists()
    assert json.loads((tmp_path / "s" / MANIFEST).read_text())["config"] == {"rater": "m1"}


def test_an_edited_input_starts_the_stage_afresh(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("v1")
    run_stage("s", tmp_path, {}, [src], appender(["a"]))
    src.write_text("v2")
    (tmp_path / "s/leftover").write_text("x")
    _, ran = run_stage("s", tmp_path, {}, [src], appender(["a"]))
    assert ran and not (tmp_path / "s/leftover").exists()


def test_interrupted_stage_resumes_only_with_the_same_settings(tmp_path: Path) -> None:
    with pytest.raises(Interrupted):
        run_stage("s", tmp_path, {"rater": "m0"}, [], appender(["a", "b", "c"], stop_after=2))
    assert (tmp_path / "s/out.txt").read_text() == "a\nb\n" and not (tmp_path / "s" / MANIFEST).exists()
    # same settings: resume, nothing written twice
    with pytest.raises(Interrupted):  # (stops again before any new row: nothing lost either)
        run_stage("s", tmp_path, {"rater": "m0"}, [], appender(["a", "b", "c"], stop_after=0))
    assert (tmp_path / "s/out.txt").read_text() == "a\nb\n"
    run_stage("s", tmp_path, {"rater": "m0"}, [], appender(["a", "b", "c"]))
    assert (tmp_path / "s/out.txt").read_text() == "a\nb\nc\n"
    # interrupted, then run with other settings: the half-done rows are not reused
    with pytest.raises(Interrupted):
        run_stage("t", tmp_path, {"rater": "m0"}, [], appender(["a", "b", "c"], stop_after=1))
    run_stage("t", tmp_path, {"rater": "m1"}, [], appender(["x"]))
    assert (tmp_path / "t/out.txt").read_text() == "x\n"


def test_redo_clears_even_a_finished_stage(tmp_path: Path) -> None:
    run_stage("s", tmp_path, {}, [], appender(["a"]))
    _, ran = run_stage("s", tmp_path, {}, [], appender(["b"]), redo=True)
    assert ran and (tmp_path / "s/out.txt").read_text() == "b\n"
