"""The committed demo set parses and has the promised sizes."""
from __future__ import annotations

from data import DEMO_DIR
from data.pairs import read_pairs
from data.readers import load_source


def test_demo_seed() -> None:
    pairs = read_pairs(DEMO_DIR / "seed.jsonl")
    assert len(pairs) == 40
    assert all(p.instruction and p.output for p in pairs)
    assert len({p.id for p in pairs}) == len({p.instruction for p in pairs}) == 40


def test_demo_unlabelled_mixes_good_and_junk() -> None:
    pairs = read_pairs(DEMO_DIR / "unlabelled.jsonl")
    assert len(pairs) == 40
    assert all(p.instruction == "" and p.output for p in pairs)
    expected = [p.meta["expected"] for p in pairs]
    assert expected.count("keep") == 26 and expected.count("reject") == 14
    assert all(p.meta["note"] for p in pairs)
    assert len({p.id for p in pairs}) == 40


def test_demo_test_prompts() -> None:
    pairs = read_pairs(DEMO_DIR / "test_prompts.jsonl")
    assert len(pairs) == 10
    assert all(p.instruction and p.output == "" for p in pairs)


def test_demo_files_load_through_the_dispatcher() -> None:
    pairs, stats = load_source(str(DEMO_DIR / "seed.jsonl"))
    assert stats == dict(rows=40, kept=40) and len(pairs) == 40
