"""Each reader on the real files in ../shared/data, with exact expected counts.

The numbers were computed once from these files and are hard-coded: a change in a
reader's rules shows up here as a changed count.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from data.guanaco import read_guanaco
from data.lima import read_lima, read_lima_prompts
from data.oasst1 import read_oasst1
from data.readers import format_stats, load_source
from data.web import read_web

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
DATA = SHARED / "data"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not available")


def test_guanaco_eval_human_assistant() -> None:
    pairs, stats = read_guanaco(DATA / "guanaco" / "openassistant_best_replies_eval.jsonl")
    # 518 rows, all kept (first turn); 264 go on after the first answer: 123 with two
    # full turns and others ending on an unanswered "### Human:" follow-up.
    assert stats == dict(rows=518, kept=518, multi_turn_rows=264, dropped_multi_turn=0,
                         dropped_empty=0, dropped_duplicate=0)
    assert all(p.instruction and p.output and p.source == "guanaco" for p in pairs)
    assert not any("### " in p.instruction or "### Assistant" in p.output for p in pairs)


def test_guanaco_eval_single_turn_only() -> None:
    _, stats = read_guanaco(DATA / "guanaco" / "openassistant_best_replies_eval.jsonl",
                            single_turn_only=True)
    assert stats["kept"] == 254 and stats["dropped_multi_turn"] == 264


@pytest.mark.parametrize("name", ["guanaco_llama2_1k_train.jsonl", "guanaco_1k_train_human_assistant.jsonl"])
def test_guanaco_1k_both_formats(name: str) -> None:
    pairs, stats = read_guanaco(DATA / "guanaco" / name)
    # the 1k sample of the train split: 353 multi-turn rows (as the shared README says)
    assert stats == dict(rows=1000, kept=1000, multi_turn_rows=353, dropped_multi_turn=0,
                         dropped_empty=0, dropped_duplicate=0)
    assert not any("[INST]" in p.output or "</s>" in p.output for p in pairs)


def test_guanaco_formats_give_identical_pairs() -> None:
    """The Llama-2 and "### Human:" spellings of the same 1,000 rows parse to the same
    pairs, hence the same ids: format detection does not leak into the data."""
    llama2, _ = read_guanaco(DATA / "guanaco" / "guanaco_llama2_1k_train.jsonl")
    human, _ = read_guanaco(DATA / "guanaco" / "guanaco_1k_train_human_assistant.jsonl")
    assert llama2 == human


def test_lima_train() -> None:
    pairs, stats = read_lima(DATA / "lima" / "train.jsonl")
    # 1,029 rows: 1,000 single-turn (user, assistant) and 29 longer conversations
    assert stats == dict(rows=1029, kept=1000, dropped_multi_turn=29, dropped_empty=0,
                         dropped_duplicate=0)
    assert len({p.id for p in pairs}) == 1000


def test_lima_folder_and_test_prompts() -> None:
    pairs, stats = read_lima_prompts(DATA / "lima")  # a folder: its test.jsonl
    assert stats == dict(rows=300, kept=300, dropped_empty=0, dropped_duplicate=0)
    assert all(p.instruction and p.output == "" for p in pairs)


def test_oasst1_seed_recipe() -> None:
    pairs, stats = read_oasst1(DATA / "oasst1" / "en_validation_messages.jsonl")
    # 2,022 English messages in 188 trees; 186 roots have a rank-0 reply, 2 do not
    # (one has a single unranked reply, one only a rank-2 reply).
    assert stats == dict(messages=2022, trees=188, kept=186, dropped_lang=0, dropped_deleted=0,
                         dropped_no_rank0_reply=2, dropped_empty=0, dropped_duplicate=0)
    assert pairs[0].instruction == "What do you think about ChatGPT?"


def test_oasst1_language_filter() -> None:
    _, stats = read_oasst1(DATA / "oasst1" / "en_validation_messages.jsonl", lang="de")
    assert stats["kept"] == 0 and stats["dropped_lang"] == 188


def test_web_c4() -> None:
    pairs, stats = read_web(DATA / "web" / "c4_demo.jsonl")
    # 300 pages, one paragraph per line (2,676), packed into passages of 600..3,000
    # characters (the paper's bounds): 324 kept; 2 paragraphs over 3,000 characters,
    # 94 passages (mostly whole short pages) under 600, 20 with near-repeated sentences.
    assert stats == dict(documents=300, paragraphs=2676, kept=324, dropped_too_long=2,
                         dropped_too_short=94, dropped_low_alpha=0, dropped_repetitive=20,
                         dropped_duplicate=0)
    assert all(p.instruction == "" and 600 <= len(p.output) <= 3000 for p in pairs)


def test_web_wiki_glued_paragraphs() -> None:
    pairs, stats = read_web(DATA / "web" / "wiki_demo.txt")
    # 30 articles with their line breaks lost, split at glued sentence ends into
    # 1,585 paragraphs, packed into 397 passages (396 kept, 1 repetitive: a reference
    # list); 8 paragraphs over 3,000 characters.
    assert stats == dict(documents=30, paragraphs=1585, kept=396, dropped_too_long=8,
                         dropped_too_short=0, dropped_low_alpha=0, dropped_repetitive=1,
                         dropped_duplicate=0)
    assert pairs[0].output.startswith("Anarchism is a political philosophy")


def test_web_bounds_are_parameters() -> None:
    pairs, stats = read_web(DATA / "web" / "c4_demo.jsonl", min_chars=200, max_chars=1000)
    # a smaller budget packs fewer paragraphs per passage (more passages) and rejects
    # more long paragraphs; a lower floor rejects fewer short ones
    assert stats == dict(documents=300, paragraphs=2676, kept=900, dropped_too_long=45,
                         dropped_too_short=30, dropped_low_alpha=0, dropped_repetitive=13,
                         dropped_duplicate=0)
    assert all(200 <= len(p.output) <= 1000 for p in pairs)


@pytest.mark.parametrize(
    ("relative", "kind_kept"),
    [
        ("guanaco/openassistant_best_replies_eval.jsonl", 518),
        ("guanaco/guanaco_llama2_1k_train.jsonl", 1000),
        ("lima/train.jsonl", 1000),
        ("lima/test.jsonl", 300),
        ("oasst1/en_validation_messages.jsonl", 186),
        ("web/c4_demo.jsonl", 324),
        ("web/wiki_demo.txt", 396),
    ],
)
def test_load_source_guesses_the_reader(relative: str, kind_kept: int) -> None:
    pairs, stats = load_source(str(DATA / relative))
    assert stats["kept"] == len(pairs) == kind_kept


def test_load_source_with_explicit_kind_and_stats_line() -> None:
    _, stats = load_source(f"lima:{DATA / 'lima'}")
    assert format_stats("lima", stats) == "lima: rows=1029 kept=1000 dropped_multi_turn=29"
