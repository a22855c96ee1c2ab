"""humback/metrics.py on cases whose answer is known by hand, and against the reference packages
(sacrebleu, rouge-score) when they are installed (the `test` extra installs them)."""
from __future__ import annotations

import math
import random

import pytest

from humback.metrics import (auc, bleu, clipped_matches, combine_orders, lcs_length, mean_rouge_l, nll_gap_to_draws,
                          nll_per_token, paired_nll_gap, parse_verdict, preference_rate, rouge_l, rouge_tokens,
                          tokenize_13a)

# ------------------------------------------------------------------------------------ BLEU


def test_bleu_identical_is_100_and_disjoint_is_0() -> None:
    texts = ["How do magnets work?", "Write a poem about the sea, please."]
    assert bleu(texts, texts) == pytest.approx(100.0)
    assert bleu(["alpha beta gamma delta"], ["one two three four"]) == 0.0
    assert bleu([""], ["one two three four"]) == 0.0
    assert bleu([], []) == 0.0


def test_bleu_textbook_values() -> None:
    # Papineni et al. (2002): clipping. "the" occurs twice in the reference, so 2 of 7 count.
    assert clipped_matches("the the the the the the the".split(), "the cat is on the mat".split(), 1) == (2, 7)
    # One word changed in six: p1 = 5/6, p2 = 3/5, p3 = 2/4, p4 = 1/3, same length (BP = 1).
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu(["the cat sat on a mat"], ["the cat sat on the mat"]) == pytest.approx(expected)  # 53.73
    # A correct but short hypothesis: every n-gram matches, but BP = exp(1 - 6/5).
    assert bleu(["the cat sat on the"], ["the cat sat on the mat"]) == pytest.approx(100 * math.exp(-0.2))


def test_bleu_is_corpus_level_not_a_mean_of_sentences() -> None:
    # Counts are summed first: the 4-word sentence with no 4-gram match does not zero the corpus.
    hyps, refs = ["the cat sat on a mat", "a b c d"], ["the cat sat on the mat", "a b c x"]
    m = [5 + 3, 3 + 2, 2 + 1, 1 + 0]
    t = [6 + 4, 5 + 3, 4 + 2, 3 + 1]
    expected = 100 * math.exp(sum(math.log(a / b) for a, b in zip(m, t)) / 4)
    assert bleu(hyps, refs) == pytest.approx(expected)


def test_bleu_exp_smoothing_for_an_order_without_matches() -> None:
    # All 4 words match, but no bigram (hence no 3-, 4-gram) does: p2..p4 become
    # 1/(2 * 3), 1/(4 * 2), 1/(8 * 1) instead of 0.
    p = [4 / 4, 1 / (2 * 3), 1 / (4 * 2), 1 / (8 * 1)]
    expected = 100 * math.exp(sum(math.log(x) for x in p) / 4)
    assert bleu(["c a d b"], ["a b c d"]) == pytest.approx(expected)


def test_tokenize_13a() -> None:
    assert tokenize_13a("Hello, world! It's 3.14.") == ["Hello", ",", "world", "!", "It's", "3.14", "."]
    assert tokenize_13a("1,000 people (approx.) in 2023-08") == ["1,000", "people", "(", "approx", ".", ")",
                                                                  "in", "2023", "-", "08"]
    assert tokenize_13a("a &amp; b") == ["a", "&", "b"]


def test_bleu_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu(["a", "b"], ["a"])


SENTENCES = ["How do magnets work?", "Explain, in 3 steps, how to boil an egg.", "What's the capital of France?",
             "Write a haiku about the sea (in English).", "I need 2,500 words on the 1990-2000 decade!",
             "the the the cat", "Give me a list: apples; pears & plums.", ""]


def random_corpus(rng: random.Random, k: int) -> list[str]:
    words = "the cat sat on a mat , . dog 3.14 1,000 2023-08 isn't (x) & &amp; - ? !".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 14))) for _ in range(k)]


def test_bleu_matches_sacrebleu() -> None:
    sacrebleu = pytest.importorskip("sacrebleu")
    rng = random.Random(0)
    cases = [(SENTENCES, SENTENCES[::-1]), (SENTENCES, SENTENCES), (SENTENCES[:3], ["How magnets work", "x", "y"])]
    cases += [(random_corpus(rng, k), random_corpus(rng, k)) for k in (1, 2, 5, 8) for _ in range(25)]
    for hyps, refs in cases:
        assert bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9), (hyps, refs)


# --------------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_known_values() -> None:
    assert rouge_l("How do magnets work?", "how do magnets work") == 1.0  # case and punctuation ignored
    assert rouge_l("alpha beta", "gamma delta") == 0.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("?!", "anything") == 0.0
    # Lin (2004), the ROUGE paper's example: reference "police killed the gunman".
    assert rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(0.75)  # LCS 3 of 4
    assert rouge_l("the gunman kill police", "police killed the gunman") == pytest.approx(0.5)  # LCS 2 of 4
    # Gaps allowed: LCS("how do magnets work", "how do fridge magnets really work") = 4; P = 4/6, R = 4/4.
    p, r = 4 / 6, 4 / 4
    assert rouge_l("how do fridge magnets really work", "how do magnets work") == pytest.approx(2 * p * r / (p + r))
    assert mean_rouge_l(["a b", "c"], ["a b", "d"]) == pytest.approx(0.5)


def test_lcs_length() -> None:
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the CLRS textbook example (BCBA)
    assert lcs_length("", "abc") == 0 and lcs_length("abc", "abc") == 3


def test_rouge_tokens_keep_unicode_letters() -> None:
    assert rouge_tokens("Café au lait, s'il vous plaît!") == ["café", "au", "lait", "s", "il", "vous", "plaît"]
    assert rouge_tokens("snake_case words") == ["snake", "case", "words"]
    assert rouge_l("¿Cómo funcionan los imanes?", "cómo funcionan los imanes") == 1.0


def test_rouge_l_matches_rouge_score() -> None:
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])  # no stemming, as ours
    rng = random.Random(1)
    pairs = [(a, b) for a in SENTENCES for b in SENTENCES]
    pairs += list(zip(random_corpus(rng, 200), random_corpus(rng, 200)))
    for hyp, ref in pairs:
        assert rouge_l(hyp, ref) == pytest.approx(scorer.score(ref, hyp)["rougeL"].fmeasure, abs=1e-12), (hyp, ref)


# ------------------------------------------------------------------------------------ AUC


def test_auc_known_values() -> None:
    assert auc([5, 5, 5], [1, 1]) == 1.0  # real pairs always above mismatched
    assert auc([1, 1], [5, 5, 5]) == 0.0  # reversed
    assert auc([3, 3], [3, 3, 3]) == 0.5  # a rater that scores everything the same
    # (3>2) + (3>1) + (2=2: 1/2) + (2>1) = 3.5 of 4 pairs
    assert auc([3, 2], [2, 1]) == pytest.approx(0.875)
    with pytest.raises(ValueError):
        auc([], [1.0])


def test_auc_equals_pairwise_definition() -> None:
    rng = random.Random(2)
    for _ in range(50):
        pos = [rng.choice([1, 2, 3, 4, 5, 2.5]) for _ in range(rng.randint(1, 12))]
        neg = [rng.choice([1, 2, 3, 4, 5, 2.5]) for _ in range(rng.randint(1, 12))]
        brute = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
        assert auc(pos, neg) == pytest.approx(brute)


# ---------------------------------------------------------------------------- likelihood


def test_nll_per_token() -> None:
    assert nll_per_token([[0.0, 0.0], [0.0]]) == (0.0, 3)  # probability 1 on every token
    assert nll_per_token([[-1.0, -3.0]]) == (2.0, 2)
    assert nll_per_token([[-1.0], [-3.0, -3.0, -3.0]])[0] == pytest.approx(2.5)  # token-weighted, not 2.0
    with pytest.raises(ValueError, match="no tokens"):
        nll_per_token([[], []])


def test_paired_nll_gap_known_cases() -> None:
    same = [(2.0, 1), (9.0, 3), (4.0, 2)]
    g = paired_nll_gap(same, same)
    assert (g["gap"], g["low"], g["high"], g["a_better"]) == (0.0, 0.0, 0.0, 0)
    # A is 0.5 nats/token better on every reference: the gap is exact and its interval excludes 0.
    better = [(s - 0.5 * t, t) for s, t in same]
    g = paired_nll_gap(better, same)
    assert g["gap"] == pytest.approx(-0.5) and g["high"] < 0 and g["a_better"] == 3 and g["n"] == 3
    # Better on half the references, worse on the other half: the interval straddles 0.
    mixed_a = [(1.0, 1), (3.0, 1)] * 10
    mixed_b = [(3.0, 1), (1.0, 1)] * 10
    g = paired_nll_gap(mixed_a, mixed_b)
    assert g["gap"] == 0.0 and g["low"] < 0 < g["high"] and g["a_better"] == 10
    # Token-weighted like nll_per_token: the gap equals the difference of the two NLLs.
    a, b = [(1.0, 1), (12.0, 4)], [(2.0, 1), (10.0, 4)]
    assert paired_nll_gap(a, b)["gap"] == pytest.approx(nll_per_token([[-1.0], [-3.0] * 4])[0]
                                                        - nll_per_token([[-2.0], [-2.5] * 4])[0])
    with pytest.raises(ValueError, match="tokens under A"):
        paired_nll_gap([(1.0, 2)], [(1.0, 3)])
    with pytest.raises(ValueError, match="same non-zero number"):
        paired_nll_gap([(1.0, 2)], [])
    with pytest.raises(ValueError, match="resamples"):
        paired_nll_gap(same, same, resamples=0)
    with pytest.raises(ValueError, match="no tokens"):
        paired_nll_gap([(0.0, 0)], [(0.0, 0)])


def test_nll_gap_to_draws_known_cases() -> None:
    a = [(2.0, 1), (9.0, 3)]                                  # NLL 11 / 4 = 2.75
    draws = [[(3.0, 1), (13.0, 3)], [(2.0, 1), (8.0, 3)]]       # NLL 4.0 and 2.5
    g = nll_gap_to_draws(a, draws)
    assert g["a_nll"] == 2.75 and g["draw_nll"] == [4.0, 2.5] and g["draw_sd"] == pytest.approx(1.5 / 2 ** 0.5)
    assert g["gap"] == pytest.approx(2.75 - 3.25) and g["a_lower_than"] == 1 and g["chance_all"] == pytest.approx(1 / 3)
    assert g["a_better"] == 2 and g["n"] == 2  # per reference against the draws' mean: 2 < 2.5 and 9 < 10.5
    # with one draw it is paired_nll_gap, and no spread
    one = nll_gap_to_draws(a, draws[:1])
    assert one["draw_sd"] == 0.0 and {k: one[k] for k in ("gap", "low", "high", "a_better", "n")} == \
        paired_nll_gap(a, draws[0])
    with pytest.raises(ValueError, match="under B2"):
        nll_gap_to_draws(a, [draws[0], [(2.0, 1), (8.0, 4)]])
    with pytest.raises(ValueError, match="at least one draw"):
        nll_gap_to_draws(a, [])


# --------------------------------------------------------------------- pairwise judging


def test_combine_orders_wins_only_when_both_orders_agree() -> None:
    assert combine_orders("A", "B") == "win"  # candidate preferred as A and as B
    assert combine_orders("B", "A") == "loss"
    assert combine_orders("A", "A") == "tie"  # a judge that always picks the first answer
    assert combine_orders("B", "B") == "tie"
    for v in ("A", "B", "tie", None):
        assert combine_orders("tie", v) == "tie" and combine_orders(None, v) == "tie"


def test_preference_rate_counts_ties_separately() -> None:
    r = preference_rate(["win", "win", "loss", "tie"])
    assert (r["n"], r["wins"], r["losses"], r["ties"]) == (4, 2, 1, 1)
    assert (r["win_rate"], r["loss_rate"], r["tie_rate"], r["win_rate_ties_half"]) == (0.5, 0.25, 0.25, 0.625)
    assert preference_rate([])["win_rate"] == 0.0
    with pytest.raises(ValueError):
        preference_rate(["draw"])


@pytest.mark.parametrize("text,verdict", [
    ("A", "A"), (" b.\nbecause it is longer", "B"), ("\nTie\n", "tie"), ("**A**", "A"), ('"B"', "B"),
    ("A)", "A"), ("(B)", "B"), ("A:\n\nExplanation", "A"),
    ("Answer A is better", None), ("A is the best answer", None), ("As both answers agree", None), ("", None),
    ("C", None), ("A or B", None), ("AB", None),
])
def test_parse_verdict_is_strict(text: str, verdict: str | None) -> None:
    assert parse_verdict(text) == verdict
