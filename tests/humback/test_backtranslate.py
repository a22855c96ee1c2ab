"""Self-augmentation with a fake backward model: cleaning, dropping, resuming, sharding."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.pairs import DataError, Pair, dropped_path, read_done_ids, read_pairs
from humback.backtranslate import augment, clean_instruction, degenerate_reason, is_repetitive
from humback.sharding import parse_shard, shard

OUTPUT = "Tides are caused mainly by the Moon's gravity, which pulls the oceans into two bulges."


def texts(n: int) -> list[Pair]:
    return [Pair(f"t-{i:02d}", "", f"Passage number {i}. " + OUTPUT, "web", meta={"n": str(i)}) for i in range(n)]


def fake_backward(answers: dict[int, str] | None = None, fail_on_call: int | None = None):
    """A stand-in for the backward model: passage i gets answers[i] (default: a good
    instruction). Records the prompts it saw; raises on call number ``fail_on_call``."""
    answers = answers or {}
    seen: list[str] = []
    calls = [0]

    def complete(prompts: list[str]) -> list[str]:
        calls[0] += 1
        if calls[0] == fail_on_call:
            raise RuntimeError("killed")
        seen.extend(prompts)
        outs = []
        for p in prompts:
            assert p.startswith("### Response:\n") and p.endswith("### Instruction:\n")
            i = int(p.split("Passage number ")[1].split(".")[0])
            outs.append(answers.get(i, f"Why are there tides, question {i}?\n\n### Response:\nignored"))
        return outs

    complete.seen = seen  # type: ignore[attr-defined]
    return complete


def test_clean_instruction_cuts_at_the_next_header() -> None:
    assert clean_instruction("  Explain tides.\n\n### Response:\nThe moon...") == "Explain tides."
    assert clean_instruction("Explain tides.\n### Instruction:\nmore") == "Explain tides."
    assert clean_instruction("Line one\nline two\n") == "Line one\nline two"
    assert clean_instruction("\n### Response:\nx") == ""


@pytest.mark.parametrize("instruction, reason", [
    ("", "empty"),
    ("Tides?", "too_short"),
    ("Explain " * 400, "too_long"),
    ("Passage number 3.", "copies_output"),                       # the text's first sentence
    ("Passage number 3. Tides are caused mainly by the Moon and more", "copies_output"),  # 40+ chars copied
    ("how to how to how to how to how to", "repetitive"),
    ("What is it??????????????", "repetitive"),
    ("why why why why why why why why tides", "repetitive"),
    ("Why are there two high tides a day?", None),
    ("Passage about the Moon: why are there tides?", None),
])
def test_degenerate_reasons(instruction: str, reason: str | None) -> None:
    assert degenerate_reason(instruction, "Passage number 3. " + OUTPUT) == reason


def test_ordinary_instructions_are_not_repetitive() -> None:
    for text in ["Write a story about a cat who is afraid of the dark and a dog who is not.",
                 "Is it true that it is what it is?",
                 "List the pros and cons of the the metric system."]:
        assert not is_repetitive(text), text


def test_augment_writes_pairs_and_counts_drops(tmp_path: Path) -> None:
    out = tmp_path / "aug.jsonl"
    bad = {1: "", 2: "Hi?", 3: "Passage number 3.", 4: "tides tides tides tides tides tides tides tides"}
    stats = augment(texts(8), fake_backward(bad), out, batch_size=3, progress=False)
    assert stats == dict(input=8, skipped_done=0, written=4, dropped=4,
                         dropped_by_reason={"copies_output": 1, "empty": 1, "repetitive": 1, "too_short": 1})
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["t-00", "t-05", "t-06", "t-07"]
    assert set(rows[0]) == {"id", "instruction", "output", "source", "meta"}
    assert rows[0]["instruction"] == "Why are there tides, question 0?"  # cut before "### Response:"
    assert rows[0]["output"] == texts(1)[0].output and rows[0]["source"] == "web"
    dropped = [json.loads(line) for line in dropped_path(out).read_text().splitlines()]
    assert {d["id"]: d["reason"] for d in dropped} == {"t-01": "empty", "t-02": "too_short",
                                                      "t-03": "copies_output", "t-04": "repetitive"}
    assert dropped_path(out).name == "aug.dropped.jsonl"
    # A second run finds everything done, including the dropped rows: nothing is redone.
    again = fake_backward()
    stats = augment(texts(8), again, out, batch_size=3, progress=False)
    assert stats["skipped_done"] == 8 and stats["written"] == 0 and again.seen == []


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path: Path) -> None:
    items = texts(10)
    bad = {4: ""}
    out = tmp_path / "aug.jsonl"
    with pytest.raises(RuntimeError, match="killed"):
        augment(items, fake_backward(bad, fail_on_call=3), out, batch_size=3, progress=False)
    assert [p.id for p in read_pairs(out)] == ["t-00", "t-01", "t-02", "t-03", "t-05"]  # two batches made it
    resumed = fake_backward(bad)
    stats = augment(items, resumed, out, batch_size=3, progress=False)
    assert stats["skipped_done"] == 6 and stats["written"] == 4 and stats["dropped"] == 0
    assert len(resumed.seen) == 4  # only the unfinished texts were generated again
    # Every id exactly once across the two files, and the same files as a run never killed.
    clean = tmp_path / "clean.jsonl"
    augment(items, fake_backward(bad), clean, batch_size=3, progress=False)
    assert out.read_text() == clean.read_text()
    assert dropped_path(out).read_text() == dropped_path(clean).read_text()
    ids = [p.id for p in read_pairs(out)] + [json.loads(x)["id"] for x in dropped_path(out).read_text().splitlines()]
    assert sorted(ids) == [p.id for p in items]


def test_torn_last_line_is_redone(tmp_path: Path) -> None:
    out = tmp_path / "aug.jsonl"
    augment(texts(2), fake_backward(), out, batch_size=2, progress=False)
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"id": "t-02", "instruction": "half a ro')  # a crash mid-write
    assert read_done_ids(out) == {"t-00", "t-01"}
    augment(texts(3), fake_backward(), out, batch_size=2, progress=False)
    assert [p.id for p in read_pairs(out)] == ["t-00", "t-01", "t-02"]


def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    out = tmp_path / "aug.jsonl"
    out.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(DataError, match="aug.jsonl:2"):
        augment(texts(1), fake_backward(), out, progress=False)


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="duplicate"):
        augment(texts(2) + texts(1), fake_backward(), tmp_path / "x.jsonl", progress=False)


def test_shards_cover_every_item_once() -> None:
    items = list(range(23))
    for n in (1, 2, 3, 7, 30):
        parts = [shard(items, i, n) for i in range(n)]
        assert sorted(x for part in parts for x in part) == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    assert shard(items, 1, 4) == [1, 5, 9, 13, 17, 21]
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "a/b", "3"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_sharded_runs_together_equal_one_run(tmp_path: Path) -> None:
    items = texts(7)
    for i in range(3):
        augment(shard(items, i, 3), fake_backward(), tmp_path / f"s{i}.jsonl", batch_size=2, progress=False)
    ids = [p.id for i in range(3) for p in read_pairs(tmp_path / f"s{i}.jsonl")]
    assert sorted(ids) == [p.id for p in items]
