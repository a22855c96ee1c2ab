"""Pair record, stable ids, JSONL reading/writing, sampling."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.pairs import (
    DataError,
    Pair,
    append_jsonl,
    as_unlabelled,
    dedupe,
    make_id,
    read_jsonl,
    read_pairs,
    require_unique_ids,
    sample,
    sample_to_budget,
    write_jsonl_atomic,
)


def _pairs(n: int) -> list[Pair]:
    return [Pair(make_id("t", f"q{i}", f"a{i}"), f"q{i}", f"a{i}", "t") for i in range(n)]


def test_make_id_is_stable_and_content_based() -> None:
    assert make_id("web", "", "some text") == make_id("web", "", "some text")
    assert make_id("web", "", "some text") != make_id("web", "", "other text")
    # the separator keeps ("ab", "c") and ("a", "bc") apart
    assert make_id("s", "ab", "c") != make_id("s", "a", "bc")
    assert make_id("lima", "q", "a").startswith("lima-")


def test_pair_round_trip_and_meta_only_when_set(tmp_path: Path) -> None:
    plain = Pair("x-1", "Say hi.", "Hi!", "demo")
    tagged = Pair("x-2", "", "text", "csv", meta={"fail_mode": "off-topic"})
    assert "meta" not in plain.to_dict()
    path = tmp_path / "pairs.jsonl"
    write_jsonl_atomic(path, [plain, tagged])
    assert read_pairs(path) == [plain, tagged]


def test_read_pairs_names_line_of_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "instruction": "q", "output": "o"}\n{"id": "b", "output": "o"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing field\(s\) \['instruction'\]"):
        read_pairs(path)


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken}\n')
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    message = str(err.value)
    assert f"{path}:3:" in message  # the blank line 2 still counts as a line
    assert "expected one JSON object per line" in message
    assert "\n" not in message


def test_non_object_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"list\.jsonl:1: expected a JSON object per line, got list"):
        read_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_a_clear_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="file is empty; expected one JSON object per line"):
        read_jsonl(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_append_jsonl_appends_batches(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.jsonl"  # parent folder is created
    pairs = _pairs(5)
    assert append_jsonl(path, pairs[:2]) == 2
    assert append_jsonl(path, [p.to_dict() for p in pairs[2:]]) == 3  # dicts work too
    assert read_pairs(path) == pairs


def test_append_jsonl_drops_a_torn_last_line(tmp_path: Path) -> None:
    """A crash mid-write leaves half a row; the next append removes it first."""
    path = tmp_path / "out.jsonl"
    pairs = _pairs(3)
    append_jsonl(path, pairs[:2])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": "t-half", "instr')  # no newline: an interrupted write
    with pytest.raises(DataError, match=r"out\.jsonl:3:"):
        read_jsonl(path)
    append_jsonl(path, pairs[2:])
    assert read_pairs(path) == pairs


def test_write_jsonl_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    write_jsonl_atomic(path, _pairs(4))
    assert write_jsonl_atomic(path, _pairs(2)) == 2
    assert len(read_jsonl(path)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_write_jsonl_atomic_keeps_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    write_jsonl_atomic(path, _pairs(2))

    def rows():
        yield _pairs(1)[0]
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, rows())
    assert len(read_jsonl(path)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_non_ascii_is_written_readably(tmp_path: Path) -> None:
    path = tmp_path / "u.jsonl"
    write_jsonl_atomic(path, [Pair("u-1", "¿Dónde?", "Aquí ✓", "x")])
    assert "¿Dónde?" in path.read_text(encoding="utf-8")
    assert json.loads(path.read_text(encoding="utf-8"))["output"] == "Aquí ✓"


def test_sample_is_deterministic_and_keeps_order() -> None:
    pairs = _pairs(50)
    first, again = sample(pairs, 10, seed=3), sample(pairs, 10, seed=3)
    assert first == again
    assert len(first) == 10
    assert [pairs.index(p) for p in first] == sorted(pairs.index(p) for p in first)
    assert sample(pairs, 10, seed=4) != first
    assert sample(pairs, 100, seed=0) == pairs


def test_sample_to_budget_takes_as_much_text_not_as_many_pairs() -> None:
    # 10 long answers (100 chars) and 40 short ones (10 chars): a budget of 300 is 3 long answers'
    # worth or 30 short ones', so how many pairs it takes depends on which it drew
    pairs = [Pair(f"l{i}", "q", "x" * 100, "t") for i in range(10)] + [Pair(f"s{i}", "q", "y" * 10, "t")
                                                                      for i in range(40)]

    def size(p: Pair) -> int:
        return len(p.output)
    counts = set()
    for seed in range(5):
        got = sample_to_budget(pairs, 300, size, seed)
        total = sum(map(size, got))
        assert total >= 300 > total - max(map(size, got))  # reaches the budget, and needs every pair it took
        assert [pairs.index(p) for p in got] == sorted(pairs.index(p) for p in got)
        counts.add(len(got))
    assert len(counts) > 1  # different draws, different numbers of pairs, the same amount of text
    assert sample_to_budget(pairs, 300, size, 1) == sample_to_budget(pairs, 300, size, 1)
    assert sample_to_budget(pairs, 0, size, 0) == [] and sample_to_budget(pairs, 10 ** 6, size, 0) == pairs
    # a budget hit exactly takes no pair more than it needs
    assert len(sample_to_budget(pairs[10:], 30, size, 0)) == 3 and len(sample_to_budget(pairs[10:], 31, size, 0)) == 4
    with pytest.raises(ValueError, match="budget"):
        sample_to_budget(pairs, -1, size, 0)


def test_dedupe_and_as_unlabelled() -> None:
    pairs = _pairs(3)
    kept, dropped = dedupe(pairs + pairs[:2])
    assert kept == pairs and dropped == 2
    unlabelled = as_unlabelled(pairs)
    assert all(p.instruction == "" for p in unlabelled)
    assert [p.output for p in unlabelled] == [p.output for p in pairs]
    assert [p.id for p in unlabelled] == [p.id for p in pairs]


def test_gzipped_jsonl_is_read_transparently(tmp_path: Path) -> None:
    """Hub exports such as oasst1's messages file come as .jsonl.gz."""
    import gzip

    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"a": 1}\n{"a": 2}\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_require_unique_ids_names_the_repeated_ones() -> None:
    require_unique_ids([Pair("a", "q", "o"), Pair("b", "q", "o")], "x")  # unique: no error
    with pytest.raises(DataError, match=r"duplicate ids in the demo set \(e\.g\. \['a', 'b'\]\)"):
        require_unique_ids([Pair(i, "q", "o") for i in "abcab"], "the demo set")
