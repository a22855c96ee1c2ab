"""The numbers the evaluation reports, in plain Python (no torch, no numpy): each one short
enough to read in a minute, and tested against the reference packages.

=========================  ==============================================  ======================
metric                     answers the question                            range
=========================  ==============================================  ======================
:func:`bleu`               how many of the real instruction's 1..4-grams   0..100 (corpus level)
                           does the generated one reproduce?
:func:`rouge_l`            how long an in-order (not necessarily           0..1 (per pair; the
                           contiguous) word sequence do they share?        mean over a corpus)
:func:`auc`                does the rater score real pairs above           0..1, 0.5 = chance
                           mismatched ones?
:func:`nll_per_token`      how surprised is the model by the reference     0..inf nats, lower is
                           answers, per token?                             better
:func:`paired_nll_gap`     is model A's NLL really below model B's on the  a difference with a
                           same answers, or is the gap noise?              95% bootstrap interval
:func:`nll_gap_to_draws`   ... below K models trained on K random draws,   the same, and how many
                           or is A one more lucky draw?                    of the K draws A beats
:func:`preference_rate`    how often does a judge prefer model X's answer  counts and rates
                           to the baseline's, in both orders?
=========================  ==============================================  ======================

BLEU follows sacrebleu's defaults exactly (``sacrebleu.corpus_bleu(hyps, [refs])``: the "13a"
tokenizer of WMT's mteval-v13a, case-sensitive, n = 1..4, "exp" smoothing), so our number can be
compared with published ones. ROUGE-L follows Google's ``rouge-score`` (``RougeScorer(["rougeL"])``
without stemming) on ASCII text; see :func:`rouge_tokens` for the one deliberate difference.
"""
from __future__ import annotations

import math
import random
import re
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

# ------------------------------------------------------------------------------------ BLEU

# mteval-v13a's tokenization, as sacrebleu's Tokenizer13a + TokenizerRegexp spell it:
# split off punctuation and symbols; split "." and "," except inside numbers (3.14, 1,000);
# split "-" after a digit (2023-08 -> 2023 - 08).
_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # symbols: {|}~ [\]^_` space!"#$%& ()*+ :;<=>?@ /
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def tokenize_13a(text: str) -> list[str]:
    """Words and punctuation the way BLEU has counted them since WMT's mteval-v13a.

    >>> tokenize_13a("Hello, world! It's 3.14.")
    ['Hello', ',', 'world', '!', "It's", '3.14', '.']
    """
    text = text.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in text:  # undo the four XML escapes mteval knew
        text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text} "
    for pattern, replacement in _13A_RULES:
        text = pattern.sub(replacement, text)
    return text.split()


def ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """How often each n-gram (a tuple of n consecutive tokens) occurs."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def clipped_matches(hyp: Sequence[str], ref: Sequence[str], n: int) -> tuple[int, int]:
    """(matches, total) n-grams of ``hyp``: BLEU's *modified* precision is matches / total.

    Each hypothesis n-gram counts at most as often as it occurs in the reference ("clipping"),
    so repeating a right word does not pay: Papineni et al.'s example, "the the the the the the
    the" against "the cat is on the mat", has unigram precision 2/7, not 7/7.
    """
    h, r = ngrams(hyp, n), ngrams(ref, n)
    return sum(min(count, r[gram]) for gram, count in h.items()), sum(h.values())


def bleu(hypotheses: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU (0-100) of ``hypotheses`` against one reference each, as sacrebleu computes it.

    Corpus level means the counts are summed over all pairs *before* dividing (not an average
    of per-sentence scores):

        BLEU = BP * exp(mean over n=1..4 of log p_n),   p_n = sum(matches_n) / sum(total_n)
        BP   = exp(1 - ref_len / hyp_len) if hyp_len < ref_len else 1   (brevity penalty)

    The brevity penalty stops a system from scoring well by writing only the few words it is
    sure of. Smoothing ("exp", mteval's): an order with no match at all would make the log
    -infinity, so its p_n becomes 1 / (2^k * total_n) for the k-th such order. No match at any
    order gives 0; identical texts give 100.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp_text, ref_text in zip(hypotheses, references):
        hyp, ref = tokenize_13a(hyp_text), tokenize_13a(ref_text)
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, max_n + 1):
            m, t = clipped_matches(hyp, ref, n)
            matches[n - 1] += m
            totals[n - 1] += t
    if not any(matches):
        return 0.0
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    log_sum, halvings = 0.0, 1
    for m, t in zip(matches, totals):
        if t == 0:  # hypotheses too short to have n-grams of this order: BLEU is 0
            return 0.0
        if m == 0:
            halvings *= 2
            log_sum += math.log(100.0 / (halvings * t))
        else:
            log_sum += math.log(100.0 * m / t)
    return brevity * math.exp(log_sum / max_n)


# --------------------------------------------------------------------------------- ROUGE-L


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased runs of letters and digits; everything else separates words.

    On ASCII text these are exactly rouge-score's tokens. rouge-score keeps only a-z and 0-9,
    so "café" becomes "caf" and a Chinese or Russian sentence has no tokens at all (score 0);
    guanaco is multilingual, so here any Unicode letter or digit counts.
    """
    return re.findall(r"[^\W_]+", text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence: tokens of both, in order, gaps allowed.

    Dynamic programming over prefixes, one row at a time: ``row[j]`` is the LCS of the prefix
    of ``a`` done so far and ``b[:j]``. O(len(a) * len(b)) time, O(len(b)) memory.
    """
    row = [0] * (len(b) + 1)  # row[j] = LCS(a[:i], b[:j]) for the current i
    for x in a:
        diagonal = 0  # LCS(a[:i-1], b[:j-1])
        for j, y in enumerate(b, start=1):
            above = row[j]  # LCS(a[:i-1], b[:j]), about to be overwritten
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F-measure (0-1) of one hypothesis against one reference.

    precision = LCS / len(hyp), recall = LCS / len(ref), F = 2PR / (P + R); 0 if either text
    has no tokens. Unlike BLEU it rewards words in the right order even when other words sit
    between them ("how do magnets work" vs "how do fridge magnets really work": LCS 4).
    """
    hyp, ref = rouge_tokens(hypothesis), rouge_tokens(reference)
    if not hyp or not ref:
        return 0.0
    common = lcs_length(ref, hyp)
    if common == 0:
        return 0.0
    precision, recall = common / len(hyp), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """The mean of :func:`rouge_l` over pairs (how ROUGE is reported for a corpus)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return 0.0
    return sum(rouge_l(h, r) for h, r in zip(hypotheses, references)) / len(hypotheses)


# ------------------------------------------------------------------------------------ AUC


def auc(scores_pos: Iterable[float], scores_neg: Iterable[float]) -> float:
    """Ranking AUC: the probability that a random positive scores above a random negative,
    ties counted 1/2 (the Mann-Whitney U statistic divided by n_pos * n_neg).

    1.0: every real pair scored above every mismatched one; 0.5: no better than a coin (or a
    rater that gives everything the same score); 0.0: perfectly backwards. Unlike accuracy it
    needs no threshold, and it is the same whether the scores are 1-5 or log-probabilities.
    """
    pos, neg = list(scores_pos), sorted(scores_neg)
    if not pos or not neg:
        raise ValueError(f"auc needs at least one score on each side (got {len(pos)} and {len(neg)})")
    wins = 0.0
    for s in pos:  # with the negatives sorted, two binary searches count those below and equal
        below, below_or_equal = bisect_left(neg, s), bisect_right(neg, s)
        wins += below + 0.5 * (below_or_equal - below)
    return wins / (len(pos) * len(neg))


# ---------------------------------------------------------------------------- likelihood


def nll_per_token(token_logprobs: Iterable[Sequence[float]]) -> tuple[float, int]:
    """(mean negative log-likelihood per token in nats, number of tokens) over references.

    Token-weighted ("micro") average: the sum of -log p over every token of every reference,
    divided by the number of tokens, so long answers count for as many tokens as they have.
    exp(NLL) is the perplexity. A model that gives every reference token probability 1 has 0.
    """
    total, count = 0.0, 0
    for row in token_logprobs:
        total -= sum(float(x) for x in row)
        count += len(row)
    if count == 0:
        raise ValueError("no tokens to score")
    return total / count, count


def paired_nll_gap(a: Sequence[tuple[float, int]], b: Sequence[tuple[float, int]], resamples: int = 2000,
                   seed: int = 0) -> dict[str, float | int]:
    """How much lower model A's NLL per token is than model B's on the same references, and
    whether that could be luck of which references were drawn.

    ``a[i]`` and ``b[i]`` are ``(summed -log p, tokens)`` of reference ``i`` under each model (the
    same tokens, so the counts must agree). ``gap`` is NLL(A) - NLL(B), token-weighted as in
    :func:`nll_per_token`: negative means A fits the references better. Because both models see
    the same references, the gap is far less noisy than either NLL; ``low``/``high`` bound it by a
    percentile bootstrap over references (resample them with replacement, recompute the gap, keep
    the 2.5th and 97.5th percentiles). An interval that excludes 0 is a gap the sample supports.
    ``a_better`` counts the references on which A's own NLL is the lower one.
    """
    g = nll_gap_to_draws(a, [b], resamples, seed)
    return {k: g[k] for k in ("gap", "low", "high", "a_better", "n")}


def nll_gap_to_draws(a: Sequence[tuple[float, int]], draws: Sequence[Sequence[tuple[float, int]]],
                     resamples: int = 2000, seed: int = 0) -> dict[str, float | int | list[float]]:
    """Model A against several models B1..BK trained the same way on different random draws.

    One random draw is luck too: another sample of the same size, or another training seed, moves
    the NLL. So compare A with K of them, two ways:

    * ``gap`` = NLL(A) - mean over draws of NLL(Bk), with ``low``/``high`` from a paired percentile
      bootstrap over references (as in :func:`paired_nll_gap`, which is this with K = 1): is the
      gap bigger than the luck of which references were drawn?
    * ``a_lower_than`` = how many of the K draws A beats outright. If A were just one more draw
      (the choice of its pairs made no difference), each of the K + 1 models would be equally
      likely to be the best, so A beats all K by chance with probability 1 / (K + 1)
      (``chance_all``): is A better than the luck of the draw?

    Also returned: ``a_nll``, ``draw_nll`` (one per draw), ``draw_sd`` (their spread; 0 for K = 1),
    ``a_better`` (references on which A's NLL is below the draws' mean) and ``n``.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not draws:
        raise ValueError("need at least one draw to compare with")
    for k, b in enumerate(draws):
        if len(a) != len(b) or not a:
            raise ValueError(f"need the same non-zero number of references for both models, got {len(a)} and "
                             f"{len(b)}" + (f" (draw {k + 1})" if len(draws) > 1 else ""))
        for i, ((_, ta), (_, tb)) in enumerate(zip(a, b)):
            if ta != tb:
                raise ValueError(f"reference {i}: {ta} tokens under A but {tb} under B"
                                 + (f"{k + 1}" if len(draws) > 1 else "") + "; score the same tokenization")
    if not any(t for _, t in a):
        raise ValueError("no tokens to score")
    k = len(draws)
    b_mean = [sum(b[i][0] for b in draws) / k for i in range(len(a))]  # per reference: the draws' mean -log p

    def gap(idx: Sequence[int]) -> float:
        tokens = sum(a[i][1] for i in idx)
        return (sum(a[i][0] for i in idx) - sum(b_mean[i] for i in idx)) / max(tokens, 1)

    def nll(m: Sequence[tuple[float, int]]) -> float:
        return sum(s for s, _ in m) / max(sum(t for _, t in m), 1)

    rng = random.Random(seed)
    n = len(a)
    boots = sorted(gap([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    a_nll, draw_nll = nll(a), [nll(b) for b in draws]
    mean = sum(draw_nll) / k
    sd = math.sqrt(sum((x - mean) ** 2 for x in draw_nll) / (k - 1)) if k > 1 else 0.0
    return dict(gap=gap(range(n)), low=boots[int(0.025 * (resamples - 1))], high=boots[int(0.975 * (resamples - 1))],
                a_better=sum(x[0] < y for x, y in zip(a, b_mean)), n=n, a_nll=a_nll, draw_nll=draw_nll,
                draw_sd=sd, a_lower_than=sum(a_nll < x for x in draw_nll), chance_all=1 / (k + 1))


# --------------------------------------------------------------------- pairwise judging

Verdict = Literal["A", "B", "tie"]
Outcome = Literal["win", "loss", "tie"]


def combine_orders(candidate_first: Verdict | None, candidate_second: Verdict | None) -> Outcome:
    """One outcome for the candidate from two judgements of the same pair of answers.

    A judge (especially a small model) tends to prefer whichever answer it reads first, or
    second. So each pair is judged twice: with the candidate as answer A (``candidate_first``),
    then as answer B (``candidate_second``). The candidate *wins* only if it is preferred in both
    orders, *loses* only if the baseline is; anything else (the judge contradicts itself, says
    tie, or gave no verdict: None) is a tie. This is MT-Bench's rule (Zheng et al. 2023): a
    purely positional judge then produces only ties, never a spurious win.
    """
    won = candidate_first == "A" and candidate_second == "B"
    lost = candidate_first == "B" and candidate_second == "A"
    return "win" if won else "loss" if lost else "tie"


def preference_rate(outcomes: Iterable[Outcome]) -> dict[str, float | int]:
    """Count wins, losses and ties (kept apart, not folded into the rates).

    Returns ``n``, ``wins``, ``losses``, ``ties``, ``win_rate``, ``loss_rate``, ``tie_rate``
    (each count / n) and ``win_rate_ties_half`` = (wins + ties / 2) / n, the single number
    where 0.5 means "as good as the baseline".
    """
    counts = Counter(outcomes)
    unknown = set(counts) - {"win", "loss", "tie"}
    if unknown:
        raise ValueError(f"outcomes must be 'win', 'loss' or 'tie'; got {sorted(unknown)}")
    n = sum(counts.values())
    wins, losses, ties = counts["win"], counts["loss"], counts["tie"]
    rate = (lambda k: k / n) if n else (lambda k: 0.0)
    return dict(n=n, wins=wins, losses=losses, ties=ties, win_rate=rate(wins), loss_rate=rate(losses),
                tie_rate=rate(ties), win_rate_ties_half=rate(wins + ties / 2))


def parse_verdict(text: str) -> Verdict | None:
    """The judge's verdict, read strictly: the first non-empty line of its answer must be
    exactly ``A``, ``B`` or ``tie`` (any case), give or take wrapping (``**A**``, ``"B"``,
    ``(A)``) and one closing mark (``A.``, ``A:``, ``A)``). Anything else is None ("A is
    better" included: a lenient parser would also read "A" in "As both answers..."); the caller
    then falls back to comparing log p("A") and log p("B").
    """
    lines = text.strip().splitlines()
    if not lines:
        return None
    word = lines[0].strip().strip("*\"'`[( ").rstrip(".:)]").strip().lower()
    return {"a": "A", "b": "B", "tie": "tie"}.get(word)  # type: ignore[return-value]
