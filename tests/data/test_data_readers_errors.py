"""Readers on small hand-made files: formats, malformed input, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.csvfile import read_csv
from data.guanaco import read_guanaco
from data.lima import read_lima
from data.oasst1 import read_oasst1
from data.pairs import DataError
from data.readers import load_source
from data.web import read_web, segment, sentence_similarity, split_paragraphs


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- guanaco


def test_guanaco_first_turn_of_both_formats(tmp_path: Path) -> None:
    ha = _jsonl(tmp_path / "ha.jsonl", [
        {"text": "### Human: What is 2+2?### Assistant: 4.### Human: And 3+3?### Assistant: 6."},
        {"text": "### Human: Hi### Assistant: Hello!"},
    ])
    l2 = _jsonl(tmp_path / "l2.jsonl", [
        {"text": "<s>[INST] What is 2+2? [/INST] 4. </s><s>[INST] And 3+3? [/INST] 6. </s>"},
        {"text": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s>"},
    ])
    for path in (ha, l2):
        pairs, stats = read_guanaco(path)
        assert [(p.instruction, p.output) for p in pairs] == [("What is 2+2?", "4."), ("Hi", "Hello!")]
        assert stats["multi_turn_rows"] == 1


def test_guanaco_row_without_assistant_names_the_line(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "g.jsonl", [
        {"text": "### Human: q### Assistant: a"},
        {"text": "### Human: a question nobody answered"},
    ])
    with pytest.raises(DataError, match=r"g\.jsonl:2: expected '### Assistant:' after the first"):
        read_guanaco(path)


def test_guanaco_unknown_format(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "g.jsonl", [{"text": "User: hi\nBot: hello"}])
    with pytest.raises(DataError, match=r"g\.jsonl:1: unrecognised guanaco text"):
        read_guanaco(path)


def test_guanaco_missing_text_field(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "g.jsonl", [{"prompt": "hi"}])
    with pytest.raises(DataError, match=r"g\.jsonl:1: expected a string field 'text'"):
        read_guanaco(path)


# ------------------------------------------------------------------------ lima, oasst1


def test_lima_filters_and_rejects_test_file(tmp_path: Path) -> None:
    train = _jsonl(tmp_path / "train.jsonl", [
        {"conversations": ["q1", "a1"]},
        {"conversations": ["q2", "a2", "q3", "a3"]},
        {"conversations": ["q1", "a1"]},  # exact duplicate
        {"conversations": ["  ", "a4"]},
    ])
    pairs, stats = read_lima(train)
    assert [(p.instruction, p.output) for p in pairs] == [("q1", "a1")]
    assert stats == dict(rows=4, kept=1, dropped_multi_turn=1, dropped_empty=1, dropped_duplicate=1)

    test = _jsonl(tmp_path / "test.jsonl", [{"conversations": ["only a prompt"]}])
    with pytest.raises(DataError, match="read_lima_prompts"):
        read_lima(test)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"conversations": "q"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: expected 'conversations' to be a list"):
        read_lima(bad)


def _msg(mid: str, parent: str | None, role: str, text: str, rank: int | None = None,
         lang: str = "en", deleted: bool = False) -> dict:
    return dict(message_id=mid, parent_id=parent, role=role, text=text, rank=rank, lang=lang,
                deleted=deleted)


def test_oasst1_takes_rank0_reply_to_root_only(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "m.jsonl", [
        _msg("r1", None, "prompter", "Q1"),
        _msg("a1", "r1", "assistant", "second best", rank=1),
        _msg("a2", "r1", "assistant", "best", rank=0),
        _msg("f1", "a2", "prompter", "follow-up question"),
        _msg("f2", "f1", "assistant", "follow-up answer", rank=0),  # not a first turn
        _msg("r2", None, "prompter", "Q2 unranked"),
        _msg("b1", "r2", "assistant", "only reply, never ranked"),
        _msg("r3", None, "prompter", "Frage", lang="de"),
        _msg("c1", "r3", "assistant", "Antwort", rank=0, lang="de"),
        _msg("r4", None, "prompter", "Q4"),
        _msg("d1", "r4", "assistant", "deleted best", rank=0, deleted=True),
    ])
    pairs, stats = read_oasst1(path)
    assert [(p.instruction, p.output) for p in pairs] == [("Q1", "best")]
    assert stats == dict(messages=11, trees=4, kept=1, dropped_lang=1, dropped_deleted=0,
                         dropped_no_rank0_reply=2, dropped_empty=0, dropped_duplicate=0)


def test_oasst1_missing_fields(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "m.jsonl", [{"message_id": "x", "text": "hi"}])
    with pytest.raises(DataError, match=r"m\.jsonl:1: missing field\(s\) \['parent_id', 'role', 'lang'\]"):
        read_oasst1(path)


# -------------------------------------------------------------------------------- csv


def test_csv_reads_homework_format(tmp_path: Path) -> None:
    path = tmp_path / "hw.csv"
    path.write_text(
        'id,instruction,output,fail_mode\n'
        'p1,Say hi,"Hi, there!\nHow are you?",\n'
        'p2,Name a fruit,Buy our juicer today!,promotional\n',
        encoding="utf-8",
    )
    pairs, stats = read_csv(path)
    assert stats == dict(rows=2, kept=2, with_fail_mode=1)
    assert pairs[0].id == "p1" and pairs[0].output == "Hi, there!\nHow are you?" and pairs[0].meta == {}
    assert pairs[1].meta == {"fail_mode": "promotional"}


def test_csv_without_fail_mode_column(tmp_path: Path) -> None:
    path = tmp_path / "hw.csv"
    path.write_text("id,instruction,output\na,q,o\n", encoding="utf-8")
    pairs, _ = read_csv(path)
    assert pairs[0].meta == {}


def test_csv_missing_column_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "hw.csv"
    path.write_text("id,prompt,output\na,q,o\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_csv(path)
    message = str(err.value)
    assert "missing column(s) ['instruction']" in message and "found ['id', 'prompt', 'output']" in message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("", "file is empty"),
        ("id,instruction,output\n", "no rows after the header"),
        ("id,instruction,output\na,q,o\na,q2,o2\n", r"hw\.csv:3: duplicate id 'a'"),
        ("id,instruction,output\n,q,o\n", r"hw\.csv:2: empty 'id'"),
        ("id,instruction,output\na,q,o,extra\n", r"hw\.csv:2: expected 3 fields"),
    ],
)
def test_csv_malformed(tmp_path: Path, body: str, expected: str) -> None:
    path = tmp_path / "hw.csv"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(DataError, match=expected):
        read_csv(path)


# -------------------------------------------------------------------------------- web


def test_split_paragraphs_three_layouts() -> None:
    assert split_paragraphs("One.\nTwo  words.\n\n") == ["One.", "Two words."]
    # blank-line separated: inner (hard-wrapped) line breaks stay
    assert split_paragraphs("A wrapped\nline.\n\nNext one.") == ["A wrapped\nline.", "Next one."]
    # no line break at all: glued sentence ends are paragraph breaks, abbreviations are not
    glued = "It ends here.Then a new one starts in the U.S.A. today.Done"
    assert split_paragraphs(glued) == ["It ends here.", "Then a new one starts in the U.S.A. today.", "Done"]


def test_segment_packs_paragraphs_within_bounds() -> None:
    doc = "\n".join(["a" * 60, "b" * 60, "c" * 60, "d" * 500, "e" * 30])
    passages, counts = segment(doc, min_chars=100, max_chars=150)
    assert passages == ["a" * 60 + "\n" + "b" * 60]  # "c" alone is too short after the jump
    assert counts == dict(paragraphs=5, dropped_too_long=1, dropped_too_short=2)


def test_read_web_plain_text_and_filters(tmp_path: Path) -> None:
    good = ("Tides rise and fall twice a day because the Moon pulls on the oceans. "
            "The Sun adds a smaller pull of its own. When both line up the tides are larger. ")
    numbers = "12 | 34 | 56 | 78 | 90 | 12 | 34 | 56 | 78 | 90 | 11 | 22 | 33 | 44 | 55 " * 3
    repetitive = ("Call us today for the best prices in town on new and used car tyres. "
                  "Call us today for the best prices in town on new and used car wheels. "
                  "Open every day of the week.")
    path = tmp_path / "docs.txt"
    path.write_text(f"{good}\n{numbers}\n{good}\n{repetitive}\nshort\n", encoding="utf-8")
    pairs, stats = read_web(path, min_chars=100)
    assert [p.output for p in pairs] == [good.strip()]
    assert pairs[0].instruction == "" and pairs[0].source == "web"
    assert stats == dict(documents=5, paragraphs=5, kept=1, dropped_too_long=0, dropped_too_short=1,
                         dropped_low_alpha=1, dropped_repetitive=1, dropped_duplicate=1)


def test_sentence_similarity() -> None:
    assert sentence_similarity("One two three four. One two three four.") == 1.0
    assert sentence_similarity("The cat sat on the mat. A dog ran in the park.") == 0.0
    assert sentence_similarity("Too short. Too short.") == 0.0  # sentences under 3 words


def test_read_web_jsonl_needs_text(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "w.jsonl", [{"content": "x"}])
    with pytest.raises(DataError, match=r"w\.jsonl:1: expected a string field 'text'"):
        read_web(path)


def test_read_web_empty_plain_file(tmp_path: Path) -> None:
    path = tmp_path / "w.txt"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="file is empty; expected one document per line"):
        read_web(path)


# ----------------------------------------------------------------------- load_source


def test_load_source_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="is a folder"):
        load_source(str(tmp_path))
    odd = _jsonl(tmp_path / "odd.jsonl", [{"question": "q"}])
    with pytest.raises(DataError, match=r"cannot tell the format .* \['question'\]"):
        load_source(str(odd))


def test_load_source_passes_options(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("x" * 150 + "\n", encoding="utf-8")
    assert load_source(f"web:{path}")[1]["kept"] == 0
    assert load_source(f"web:{path}", min_chars=100)[1]["kept"] == 1
