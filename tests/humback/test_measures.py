"""humback/measures.py with stub models whose right answer is known (and, for the NLL, a tiny
Llama made certain of one token)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data.pairs import Pair
from data.templates import backward_prompt
from humback.evaluation import ModelFns
from humback.flags import evaluate_parser
from humback.measures import (answer, derangement, drop_seen, evaluate_backward, evaluate_rater, heldout_sample,
                              judge_pairwise, judge_prompt, mismatched, reference_nll)
from tests.tiny import make_tiny

QUESTIONS = ["How do magnets work?", "What is the capital of France?", "Write a haiku about the sea.",
             "Explain recursion briefly.", "Name three primary colours.", "Why is the sky blue?"]
ANSWERS = ["Magnets attract iron because the spins of their electrons line up.", "The capital of France is Paris.",
           "Waves fold on the shore, salt wind in the pines, gulls cry.",
           "Recursion is a function calling itself on a smaller input until a base case.",
           "Red, yellow and blue.", "Air scatters blue light more strongly than red light."]
PAIRS = [Pair(f"p{i}", q, a, "test") for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]


# ------------------------------------------------------------------------- held-out data


def test_derangement_moves_every_item() -> None:
    for n in (2, 3, 10, 51):
        perm = derangement(n, seed=n)
        assert sorted(perm) == list(range(n)) and all(perm[i] != i for i in range(n))
    assert derangement(10, 0) == derangement(10, 0) != derangement(10, 1)
    with pytest.raises(ValueError):
        derangement(1, 0)


def test_mismatched_keeps_outputs_and_swaps_instructions() -> None:
    fakes = mismatched(PAIRS, seed=0)
    assert [f.output for f in fakes] == ANSWERS
    assert all(f.instruction != p.instruction and f.instruction in QUESTIONS for f, p in zip(fakes, PAIRS))
    assert all(f.id == p.id + "-mismatched" for f, p in zip(fakes, PAIRS))
    # Pairs sharing an instruction cannot make a real mismatch: left out.
    twins = [Pair("a", "Same?", "one"), Pair("b", "same? ", "two")]
    assert mismatched(twins, 0) == []


def test_drop_seen_and_sample() -> None:
    seen = [Pair("x", "  how do MAGNETS work? ", "something else"), Pair("y", "other", ANSWERS[1])]
    kept, dropped = drop_seen(PAIRS, seen)
    assert dropped == 2 and [p.id for p in kept] == ["p2", "p3", "p4", "p5"]
    chosen = heldout_sample(PAIRS + [Pair("e", "", "no instruction")], 3, seed=0, max_output_chars=10)
    assert len(chosen) == 3 and all(len(p.output) <= 10 and p.instruction for p in chosen)
    assert heldout_sample(PAIRS, 3, 0) == heldout_sample(PAIRS, 3, 0)


# ---------------------------------------------------------------------- backward model


def oracle_backward(prompts: list[str]) -> list[str]:
    """A perfect backward model: the human instruction of the answer in the prompt, followed
    by a header the way a model runs on (which the evaluation cuts off)."""
    by_prompt = {backward_prompt(p.output): p.instruction for p in PAIRS}
    return [by_prompt[x] + "\n\n### Response:\nmore" for x in prompts]


def test_evaluate_backward_perfect_and_useless_models() -> None:
    summary, items = evaluate_backward(PAIRS, oracle_backward)
    assert summary["bleu"] == pytest.approx(100.0) and summary["rouge_l"] == 1.0 and summary["empty"] == 0
    assert [i["generated"] for i in items] == QUESTIONS
    summary, _ = evaluate_backward(PAIRS, lambda ps: ["zzz qqq" for _ in ps])
    assert summary["bleu"] == 0.0 and summary["rouge_l"] == 0.0
    summary, _ = evaluate_backward(PAIRS, lambda ps: ["### Instruction:" for _ in ps])
    assert summary["empty"] == len(PAIRS)


# ------------------------------------------------------------------------------- rater


def is_real(prompt: str) -> bool:
    """Whether a rating prompt shows a real pair (its instruction and answer belong together)."""
    return any(f"{p.instruction}\n{p.output}\n" in prompt for p in PAIRS)


def stub_rater(real_score: str, fake_score: str):
    return lambda prompts: [f"Reasoning.\nScore: {real_score if is_real(x) else fake_score}" for x in prompts]


def stub_score_next(prompts: list[str]) -> list[dict[int, float]]:
    """Log-probs of "1".."5" leaning to 4 for real pairs and to 2 for mismatched ones."""
    return [{s: -abs(s - (4 if is_real(x) else 2)) for s in range(1, 6)} for x in prompts]


def test_rater_auc_known_values(tmp_path: Path) -> None:
    out = tmp_path / "rated.jsonl"
    summary, rows = evaluate_rater(PAIRS, stub_rater("5", "1"), stub_score_next, out, k_shot=0)
    assert summary["auc"] == 1.0 and summary["auc_expected"] == 1.0
    assert (summary["n_real"], summary["n_mismatched"]) == (6, 6)
    assert summary["valid_score_rate"] == 1.0 and summary["methods"] == {"text": 12, "logprob": 0, "likelihood": 0, "none": 0}
    assert summary["histogram_real"][5] == 6 and summary["histogram_mismatched"][1] == 6
    assert (summary["mean_real"], summary["mean_mismatched"]) == (5.0, 1.0)
    # The file is rewritten with every row marked and given an expected score.
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(written) == 12 and all("real" in r and r["expected_score"] is not None for r in written)

    summary, _ = evaluate_rater(PAIRS, stub_rater("1", "5"), None, out, k_shot=0)  # out is started afresh
    assert summary["auc"] == 0.0 and summary["auc_expected"] is None and summary["n_real"] == 6
    summary, _ = evaluate_rater(PAIRS, stub_rater("3", "3"), None, out, k_shot=0)
    assert summary["auc"] == 0.5


def test_rater_without_score_lines_uses_the_fallback(tmp_path: Path) -> None:
    summary, rows = evaluate_rater(PAIRS, lambda ps: ["no verdict" for _ in ps], stub_score_next,
                                   tmp_path / "r.jsonl", k_shot=1)
    assert summary["valid_score_rate"] == 0.0 and summary["methods"]["logprob"] == 12
    assert summary["auc"] == 1.0  # the fallback's argmax: 4 for real, 2 for mismatched
    summary, _ = evaluate_rater(PAIRS, lambda ps: ["no verdict" for _ in ps], None, tmp_path / "r.jsonl", k_shot=0)
    assert summary["methods"]["none"] == 12 and summary["auc"] == 0.5 and summary["mean_real"] is None


def test_likelihood_auc_from_instruction_information(tmp_path: Path) -> None:
    """A model for which an answer is likely after its own question and unlikely after another:
    the likelihood AUC is 1.0 even though its rating text is useless (always "3")."""
    from humback.rating import instruction_information
    real = {p.output: p.instruction for p in PAIRS}

    def logprobs(prompts: list[str], continuations: list[str]) -> list[list[float]]:
        out = []
        for prompt, c in zip(prompts, continuations):
            n = len(c.split())
            per_token = -0.5 if real[c] in prompt else (-1.0 if "Instruction:\n\n" in prompt else -1.5)
            out.append([per_token] * n)
        return out
    info = instruction_information(PAIRS + mismatched(PAIRS, 0), logprobs)
    assert info[:6] == [pytest.approx(0.5)] * 6 and info[6:] == [pytest.approx(-0.5)] * 6
    summary, rows = evaluate_rater(PAIRS, stub_rater("3", "3"), None, tmp_path / "r.jsonl", k_shot=0,
                                   logprobs=logprobs)
    assert summary["auc"] == 0.5 and summary["auc_likelihood"] == 1.0
    assert all("instruction_information" in r for r in rows)
    summary, _ = evaluate_rater(PAIRS, stub_rater("3", "3"), None, tmp_path / "r.jsonl", k_shot=0)
    assert summary["auc_likelihood"] is None


# ----------------------------------------------------------------------- forward model


def test_reference_nll_with_stub_logprobs() -> None:
    seen = {}

    def logprobs(prompts: list[str], continuations: list[str]) -> list[list[float]]:
        seen["prompts"] = prompts
        return [[-1.0] * len(c.split()) for c in continuations]
    result = reference_nll(PAIRS[:2], logprobs, tag="seed")
    assert result["nll"] == 1.0 and result["perplexity"] == pytest.approx(2.718281828)
    assert result["tokens"] == len(ANSWERS[0].split()) + len(ANSWERS[1].split())
    assert seen["prompts"][0].startswith("Answer in the style of an AI Assistant.\n\n### Instruction:\nHow do")
    assert answer(PAIRS[:2], lambda ps: ["  hi \n" for _ in ps]) == ["hi", "hi"]


def certain_model(folder: Path, token_id: int):
    """A tiny Llama that gives ``token_id`` probability 1 (to float precision) after any text:
    attention and MLP outputs are zeroed, so the last hidden state is the (constant) embedding,
    and only ``token_id``'s row of lm_head is non-zero (logit 100 * 64, the rest 0)."""
    from model.load import load_model
    model, tok = load_model(folder, device="cpu")
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id] = 100.0
    return model, tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny"), max_position_embeddings=4096)


def test_nll_is_zero_for_a_model_certain_of_the_reference(tiny: Path) -> None:
    from model.load import load_model
    _, tok = load_model(tiny, device="cpu")
    ids = tok.encode("the the the the")
    assert len(set(ids)) == 1  # one token, repeated: what the certain model predicts
    model, tok = certain_model(tiny, ids[0])
    fns = ModelFns(model, tok, evaluate_parser().parse_args(["--out", "x", "--batch-size", "2"]))
    pairs = [Pair("a", "Say the.", "the the the the"), Pair("b", "Again, please", "the the")]
    result = reference_nll(pairs, fns.logprobs, tag=None)
    assert result["nll"] == pytest.approx(0.0, abs=1e-6) and result["tokens"] == 6
    # The same model is sure of nothing else: "Paris" gets probability ~0.
    assert reference_nll([Pair("c", "Capital?", "Paris")], fns.logprobs)["nll"] > 100


# ------------------------------------------------------------------------------ judging


def test_judge_prompt_shows_both_answers_in_order() -> None:
    prompt = judge_prompt("Q?", "first answer", "second answer")
    assert prompt.index("Answer A:\nfirst answer") < prompt.index("Answer B:\nsecond answer")
    assert prompt.endswith("### Response:\nVerdict:")
    assert "x" * 11 not in judge_prompt("Q?", "x" * 50, "y", max_chars=10)


def fair_judge(prompts: list[str]) -> list[str]:
    """Prefers whichever answer says GOOD, wherever it is shown."""
    return ["A" if p.index("Answer A:") < p.find("GOOD") < p.index("Answer B:") else "B" for p in prompts]


def test_judge_pairwise_outcomes() -> None:
    qs = ["q1", "q2", "q3"]
    summary, items = judge_pairwise(qs, ["GOOD 1", "bad 2", "same"], ["bad 1", "GOOD 2", "same"], fair_judge)
    assert [i["outcome"] for i in items] == ["win", "loss", "tie"]
    assert (summary["wins"], summary["losses"], summary["ties"], summary["judgements"]) == (1, 1, 1, 4)
    assert items[2]["verdicts"] is None  # identical answers: not asked
    assert summary["first_position_rate"] == 0.5 and summary["fallback_rate"] == 0.0

    # A judge that always says "A" has pure position bias: only ties, never a spurious win.
    summary, _ = judge_pairwise(qs, ["x", "y", "z"], ["u", "v", "w"], lambda ps: ["A" for _ in ps])
    assert (summary["wins"], summary["ties"], summary["first_position_rate"]) == (0, 3, 1.0)

    # Unreadable verdicts go to the log-prob fallback.
    def choose(prompts: list[str]) -> list[dict[str, float]]:
        return [{"A": -1.0, "B": -2.0} if v == "A" else {"A": -2.0, "B": -1.0} for v in fair_judge(prompts)]
    summary, items = judge_pairwise(qs[:1], ["GOOD"], ["bad"], lambda ps: ["I think so" for _ in ps], choose)
    assert summary["wins"] == 1 and summary["fallback_rate"] == 1.0 and items[0]["methods"] == ["logprob"] * 2
    summary, _ = judge_pairwise(qs[:1], ["GOOD"], ["bad"], lambda ps: ["I think so" for _ in ps])
    assert summary["ties"] == 1  # no fallback: no verdict, a tie
