"""Self-curation: parsing verdicts, the log-prob fallback (fake and on a tiny model), selection, resume."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from data.pairs import DataError, Pair
from humback.curation import extremes, histogram, method_counts, read_rated, render_histogram, select
from humback.rating import (clean_rating, digit_continuations, forced_score_prompt, logprob_scorer, rate,
                            verdict_from_logprobs)

# (rater's answer, expected score, expected method) with a fallback whose favourite is 2.
TABLE = [
    ("The answer is focused and complete.\nScore: 5", 5, "text"),
    ("Mostly fine.\n**Score: 4/5**", 4, "text"),
    ("Promotional text.\nScore: 1\n\nExample 4:\nAnother pair\nScore: 5", 1, "text"),  # next demo cut off
    ("It is a forum post, from a person's perspective.", 2, "logprob"),  # no score line
    ("Score: 10", 2, "logprob"),  # off the scale
    ("The score reflects clarity.", 2, "logprob"),  # no number
    ("", 2, "logprob"),
    ("Reasoning.\nScore: 3 out of 5", 3, "text"),
]


def pairs(n: int) -> list[Pair]:
    return [Pair(f"p-{i}", f"Question {i}?", f"Answer {i}.", "demo") for i in range(n)]


def fake_rater(answers: list[str], fail_on_call: int | None = None):
    """Pair i (from its prompt) gets answers[i]; records prompts; raises on one call."""
    calls, seen = [0], []

    def complete(prompts: list[str]) -> list[str]:
        calls[0] += 1
        if calls[0] == fail_on_call:
            raise RuntimeError("killed")
        seen.extend(prompts)
        return [answers[int(p.rsplit("Question ", 1)[1].split("?")[0])] for p in prompts]

    complete.seen = seen  # type: ignore[attr-defined]
    return complete


class FakeScorer:
    """score_next favouring ``best``; records the forced prompts."""

    def __init__(self, best: int = 2) -> None:
        self.best, self.prompts = best, []

    def __call__(self, prompts: list[str]) -> list[dict[int, float]]:
        self.prompts.extend(prompts)
        return [{s: (-0.5 if s == self.best else -3.0) for s in range(1, 6)} for _ in prompts]


def test_table_of_rater_outputs(tmp_path: Path) -> None:
    out = tmp_path / "rated.jsonl"
    scorer = FakeScorer(best=2)
    stats = rate(pairs(len(TABLE)), fake_rater([t for t, _, _ in TABLE]), scorer, out, k_shot=2,
                 batch_size=3, progress=False)
    rows = read_rated(out)
    assert [(r["score"], r["score_method"]) for r in rows] == [(s, m) for _, s, m in TABLE]
    assert stats == dict(input=8, skipped_done=0, rated=8, text=4, logprob=4, likelihood=0, none=0)
    for row, (text, _, method) in zip(rows, TABLE):
        assert row["rater_output"] == text and row["k"] == 2
        assert {"id", "instruction", "output", "source"} <= set(row)
        if method == "logprob":
            assert row["score_probs"][1] == max(row["score_probs"]) and 1 <= row["expected_score"] <= 5
    # Forced prompts end with "Score:" after the model's reasoning, minus unusable score lines.
    assert len(scorer.prompts) == 4 and all(p.endswith("Score:") for p in scorer.prompts)
    assert scorer.prompts[0].endswith("### Response:\nIt is a forum post, from a person's perspective.\nScore:")
    assert "Score: 10" not in scorer.prompts[1] and scorer.prompts[1].endswith("### Response:\nScore:")


def test_without_fallback_unreadable_rows_stay_unscored(tmp_path: Path) -> None:
    out = tmp_path / "rated.jsonl"
    stats = rate(pairs(2), fake_rater(["Score: 5", "no verdict"]), None, out, k_shot=0, progress=False)
    assert stats["none"] == 1
    rows = read_rated(out)
    assert rows[1]["score"] is None and rows[1]["score_method"] == "none"
    assert [p.id for p in select(rows, 1)] == ["p-0"]  # unscored rows are never selected


def test_helpers() -> None:
    assert clean_rating("Good.\nScore: 4\n### Instruction:\nx\nScore: 1") == "Good.\nScore: 4"
    assert forced_score_prompt("P\n", "Fine answer.\nScore: 9\ntrailing") == "P\nFine answer.\nScore:"
    best, probs, expected = verdict_from_logprobs({1: math.log(0.1), 2: math.log(0.1), 3: math.log(0.1),
                                                   4: math.log(0.2), 5: math.log(0.5)})
    assert best == 5 and abs(sum(probs) - 1) < 1e-9 and abs(expected - (0.1 + 0.2 + 0.3 + 0.8 + 2.5)) < 1e-9
    with pytest.raises(ValueError, match="missing"):
        verdict_from_logprobs({1: 0.0})


def test_select_histogram_extremes() -> None:
    rows = [dict(Pair(f"r{i}", f"q{i}", f"a{i}").to_dict(), score=s, score_method=m)
            for i, (s, m) in enumerate([(5, "text"), (4, "text"), (5, "logprob"), (1, "text"), (3, "text"),
                                        (None, "none"), (2, "logprob")])]
    rows[2]["expected_score"] = 4.6
    assert [p.id for p in select(rows, 5)] == ["r0", "r2"]  # A5
    assert [p.id for p in select(rows, 4)] == ["r0", "r1", "r2"]  # A4
    assert all(isinstance(p, Pair) for p in select(rows, 1))
    with pytest.raises(ValueError):
        select(rows, 6)
    assert histogram(rows) == {1: 1, 2: 1, 3: 1, 4: 1, 5: 2}
    text = render_histogram(histogram(rows), width=10)
    assert text.splitlines()[0] == "5 | ########## " + "    2  33.3%"
    assert text.splitlines()[-1].startswith("1 | #####")
    assert method_counts(rows) == {"text": 4, "logprob": 2, "likelihood": 0, "none": 1}
    top, bottom = extremes(rows, 3)
    assert [r["id"] for r in top] == ["r0", "r2", "r1"]  # r2's expected score 4.6 ranks it below a sure 5
    assert [r["id"] for r in bottom] == ["r3", "r6", "r4"]


def test_killed_rating_resumes(tmp_path: Path) -> None:
    out = tmp_path / "rated.jsonl"
    answers = [f"Score: {1 + i % 5}" for i in range(7)]
    with pytest.raises(RuntimeError):
        rate(pairs(7), fake_rater(answers, fail_on_call=2), FakeScorer(), out, batch_size=3, progress=False)
    assert [r["id"] for r in read_rated(out)] == ["p-0", "p-1", "p-2"]
    again = fake_rater(answers)
    stats = rate(pairs(7), again, FakeScorer(), out, batch_size=3, progress=False)
    assert stats["skipped_done"] == 3 and stats["rated"] == 4 and len(again.seen) == 4
    rows = read_rated(out)
    assert [r["id"] for r in rows] == [f"p-{i}" for i in range(7)]
    assert [r["score"] for r in rows] == [1, 2, 3, 4, 5, 1, 2]


def test_likelihood_rating_scores_by_information_and_resumes(tmp_path: Path) -> None:
    """The likelihood method: score from the nats/token the instruction adds (bins 0/0.05/0.1/0.2),
    appended batch by batch like the prompt method, ids already rated skipped."""
    from humback.rating import likelihood_score, rate_by_likelihood
    assert [likelihood_score(x) for x in (-0.3, 0.0, 0.03, 0.07, 0.15, 0.2, 0.9)] == [1, 1, 2, 3, 4, 4, 5]
    gain = {f"instruction {i}": g for i, g in enumerate([-0.2, 0.04, 0.08, 0.15, 0.5])}
    calls = []

    def logprobs(prompts: list[str], continuations: list[str]) -> list[list[float]]:
        calls.append(len(prompts))
        out = []
        for prompt, c in zip(prompts, continuations):
            hit = [g for q, g in gain.items() if q in prompt]
            out.append([-1.0 + (hit[0] if hit else 0.0)] * len(c.split()))  # no instruction: -1 per token
        return out
    items = [Pair(f"p-{i}", f"instruction {i}", f"output number {i} here", "t") for i in range(5)]
    out = tmp_path / "rated.jsonl"
    stats = rate_by_likelihood(items[:2], logprobs, out, batch_size=2, progress=False)
    assert stats["likelihood"] == 2 and stats["rated"] == 2
    stats = rate_by_likelihood(items, logprobs, out, batch_size=2, progress=False)
    assert stats["skipped_done"] == 2 and stats["rated"] == 3
    rows = read_rated(out)
    assert [r["score"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["information"] for r in rows] == pytest.approx([-0.2, 0.04, 0.08, 0.15, 0.5])
    assert method_counts(rows) == {"text": 0, "logprob": 0, "likelihood": 5, "none": 0}
    assert [p.id for p in select(rows, 4)] == ["p-3", "p-4"]
    top, bottom = extremes(rows, 1)
    assert top[0]["id"] == "p-4" and bottom[0]["id"] == "p-0"


def test_pairs_without_instruction_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="instruction"):
        rate([Pair("u", "", "text")], fake_rater([]), None, tmp_path / "r.jsonl", progress=False)


def test_duplicate_ids_are_refused_before_rating(tmp_path: Path) -> None:
    twice = [Pair("p", "Question?", "Answer."), Pair("p", "Other question?", "Other answer.")]
    with pytest.raises(DataError, match=r"duplicate ids in the pairs to rate \(e\.g\. \['p'\]\)"):
        rate(twice, fake_rater([]), None, tmp_path / "r.jsonl", progress=False)
    assert not (tmp_path / "r.jsonl").exists()


def test_read_rated_refuses_other_files(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(Pair("a", "q", "o").to_dict()) + "\n")
    with pytest.raises(DataError, match="not a rated row"):
        read_rated(path)


# ------------------------------------------------------------ tokenizers and a real model


def bpe_folder(tmp_path: Path) -> Path:
    """A small byte-level BPE tokenizer.json that splits digits, like SmolLM2's and Llama-3's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.tiny import TEXT
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT.splitlines() * 5 + ["Score: 1 2 3 4 5"] * 5, trainer)
    folder = tmp_path / "bpe"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder


def llama_like_spm(folder: Path) -> Path:
    """A 512-piece sentencepiece model configured like Llama-2's (digits split, whitespace
    kept as is, byte fallback), written into a make_tiny checkpoint folder."""
    import sentencepiece as spm

    from tests.tiny import TEXT
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines() * 20), model_prefix=str(folder / "tokenizer"), vocab_size=512,
        model_type="bpe", byte_fallback=True, split_digits=True, remove_extra_whitespaces=False,
        character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2, num_threads=1)
    return folder


def check_digits_are_single_tokens(tok) -> list[str]:
    conts = digit_continuations(tok)
    ids = [tok.encode(c) for c in conts]
    assert len({tuple(c[:-1]) for c in ids}) == 1  # the same space token(s) before every digit
    assert len({c[-1] for c in ids}) == 5  # then one distinct token per digit
    assert [tok.decode([c[-1]]).strip() for c in ids] == ["1", "2", "3", "4", "5"]
    return conts


def test_digit_continuations_for_both_tokenizer_families(tmp_path: Path) -> None:
    from model.tokenizer import load_tokenizer
    from tests.tiny import make_tiny, tiny_spm_bytes
    spm = load_tokenizer(llama_like_spm(make_tiny(tmp_path / "tiny")))
    assert check_digits_are_single_tokens(spm) == ["1", "2", "3", "4", "5"]  # "▁" comes from sentencepiece
    # A sentencepiece model without split_digits may merge "▁2": the five strings are still
    # compared whole, so the fallback works; only the one-token-per-digit property is lost.
    plain = tmp_path / "plain.model"
    plain.write_bytes(tiny_spm_bytes())  # tests/tiny.py's tokenizer: trained without split_digits
    assert digit_continuations(load_tokenizer(plain)) in (
        ["1", "2", "3", "4", "5"], [" 1", " 2", " 3", " 4", " 5"])
    bpe = load_tokenizer(bpe_folder(tmp_path))
    assert check_digits_are_single_tokens(bpe) == [" 1", " 2", " 3", " 4", " 5"]  # Ġ then the digit


def test_digit_continuations_llama2(tmp_path: Path) -> None:
    from model.tokenizer import SentencePieceTokenizer
    from tests.tiny import SHARED
    path = SHARED / "models" / "llama2-tokenizer" / "tokenizer.model"
    if not path.is_file():
        pytest.skip("../shared/models/llama2-tokenizer is absent")
    # "4" and not " 4": sentencepiece adds the "▁" itself, and " 4" would encode as "▁▁ 4".
    assert check_digits_are_single_tokens(SentencePieceTokenizer(path)) == ["1", "2", "3", "4", "5"]


def test_logprob_fallback_on_a_tiny_model(tmp_path: Path) -> None:
    import torch

    from model import load_model
    from tests.tiny import make_tiny
    model, tok = load_model(llama_like_spm(make_tiny(tmp_path / "tiny")), device="cpu")
    score_next = logprob_scorer(model, tok, batch_size=4)
    prompts = ["The capital of France is Paris.\nScore:", "Once upon a time.\nScore:", "x\nScore:"]
    results = score_next(prompts)
    assert len(results) == 3
    conts = digit_continuations(tok)
    for prompt, lps in zip(prompts, results):
        assert sorted(lps) == [1, 2, 3, 4, 5] and all(math.isfinite(v) and v < 0 for v in lps.values())
        # The argmax agrees with the model's next-token distribution after "Score: ".
        ids = [tok.encode(prompt, bos=tok.add_bos) + tok.encode(c) for c in conts]
        with torch.no_grad():
            logits = model(torch.tensor([ids[0][:-1]]))[0, -1]
        digit_ids = [i[-1] for i in ids]
        assert max(lps, key=lps.get) == 1 + int(logits[digit_ids].argmax())
    # Every row rated with a valid score even when the rater never writes one.
    out = tmp_path / "rated.jsonl"
    stats = rate(pairs(5), lambda ps: ["I am not sure."] * len(ps), score_next, out, k_shot=1, batch_size=2,
                 progress=False)
    assert stats["logprob"] == 5
    assert all(r["score"] in (1, 2, 3, 4, 5) for r in read_rated(out))


def test_one_pass_fallback_equals_scoring_each_digit(tmp_path: Path) -> None:
    """The one-forward fallback (next-token distribution after the shared space token) gives
    the same verdict and the same renormalised probabilities as scoring "1".."5" one by one."""
    from humback.rating import verdict_from_logprobs
    from model import load_model
    from model.sampling import score
    from tests.tiny import make_tiny
    model, tok = load_model(llama_like_spm(make_tiny(tmp_path / "tiny")), device="cpu")
    prompts = ["The capital of France is Paris.\nScore:", "Once upon a time.\nScore:"]
    fast = logprob_scorer(model, tok)(prompts)
    conts = digit_continuations(tok)
    for prompt, lps in zip(prompts, fast):
        slow = dict(zip((1, 2, 3, 4, 5), score(model, tok, [prompt] * 5, conts)))
        a, b = verdict_from_logprobs(lps), verdict_from_logprobs(slow)
        assert a[0] == b[0] and max(abs(x - y) for x, y in zip(a[1], b[1])) < 1e-5
