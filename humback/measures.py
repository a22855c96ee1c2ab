"""Does it work? One measurement for each model the pipeline makes, on held-out pairs.

Instruction backtranslation trains three kinds of model, and each can be checked against
human-written (instruction, output) pairs it never saw in training:

=================  ==============================  ==========================================
model              its job                         measured by
=================  ==============================  ==========================================
backward model     write the instruction that a    :func:`evaluate_backward`: BLEU / ROUGE-L
p(instr | output)  text answers                    of its instruction vs the human one
rater (seed M0)    score good pairs high, bad      :func:`evaluate_rater`: ranking AUC of its
                   pairs low                       scores, real pairs vs mismatched ones
forward model      answer instructions             :func:`reference_nll`: NLL per token of the
p(output | instr)                                  human answers; :func:`judge_pairwise`: how
                                                   often a judge prefers its answers to the base
=================  ==============================  ==========================================

Each is compared with the *untrained* base model prompted the same way: a number means little
until we know what the model scored before training.

As in :mod:`humback.backtranslate` and :mod:`humback.rating`, the model work comes in as
callables, so this module needs no torch and its tests need no model:

* ``complete(prompts) -> texts`` (generation),
* ``logprobs(prompts, continuations) -> [[log p per token], ...]`` (scoring),
* ``score_next`` (:func:`humback.rating.logprob_scorer`) and ``choose``
  (:func:`choice_scorer`) for the log-probability fallbacks.

:mod:`humback.evaluation` (``evaluate.py``) builds them from loaded models, and
:mod:`humback.eval_report` writes the tables.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data.pairs import DataError, Pair, sample, write_jsonl_atomic
from data.templates import JUDGE_SUFFIX, Tag, backward_prompt, forward_prompt, judge_prompt
from humback.backtranslate import clean_instruction
from humback.curation import histogram, method_counts, read_rated
from humback.inference import Complete, LogProbs, call_size
from humback.metrics import (Verdict, auc, bleu, combine_orders, mean_rouge_l, nll_per_token, parse_verdict,
                             preference_rate, rouge_l)
from humback.rating import (ScoreNext, clean_rating, forced_score_prompt, instruction_information, rate,
                            rater_prompt, verdict_from_logprobs)

if TYPE_CHECKING:
    from model.chat import ChatFormat

Choose = Callable[[list[str]], list[dict[str, float]]]


# ------------------------------------------------------------------------- held-out data


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def drop_seen(pairs: Sequence[Pair], seen: Sequence[Pair]) -> tuple[list[Pair], int]:
    """The pairs whose instruction and output both differ from every pair in ``seen``
    (compared ignoring case and layout), and how many were dropped.

    A held-out set is only held out if the model never trained on it. guanaco's eval split
    is disjoint from its train split, but a run may have trained on other data (LIMA, a
    homework set), so evaluate.py also drops whatever is in the adapters' training files.
    """
    instructions = {_key(p.instruction) for p in seen if p.instruction.strip()}
    outputs = {_key(p.output) for p in seen if p.output.strip()}
    kept = [p for p in pairs if _key(p.instruction) not in instructions and _key(p.output) not in outputs]
    return kept, len(pairs) - len(kept)


def heldout_sample(pairs: Sequence[Pair], n: int | None, seed: int, max_output_chars: int | None = None
                   ) -> list[Pair]:
    """A seeded sample of ``n`` complete pairs (instruction and output both present), with
    each output cut to ``max_output_chars`` so that every prompt fits the model's context."""
    complete = [p for p in pairs if p.instruction.strip() and p.output.strip()]
    if not complete:
        raise DataError("no held-out pairs with both an instruction and an output")
    chosen = sample(complete, n, seed) if n is not None else complete
    if max_output_chars:
        chosen = [replace(p, output=p.output[:max_output_chars]) for p in chosen]
    return chosen


# ---------------------------------------------------------------------- backward model


def evaluate_backward(pairs: Sequence[Pair], complete: Complete) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Instruction reconstruction: the model reads each human output in the backward prompt
    (exactly as in self-augmentation) and writes an instruction, which is compared with the
    human's.

    A backward model that learnt its job writes instructions close to the real ones, so BLEU
    and ROUGE-L should rise clearly above the base model's. Neither metric knows about
    meaning ("Explain magnets" vs "How do magnets work?" shares one word), so read the
    examples too.

    Returns:
        (summary, items): summary has ``n``, ``bleu`` (corpus, 0-100), ``rouge_l`` (mean,
        0-1) and ``empty`` (instructions that came out empty); items has one row per pair
        (id, the human instruction, the generated one, its ROUGE-L).
    """
    raw = complete([backward_prompt(p.output) for p in pairs])
    if len(raw) != len(pairs):
        raise ValueError(f"complete() returned {len(raw)} texts for {len(pairs)} prompts")
    generated = [clean_instruction(t) for t in raw]  # cut at the next "### " header, as augment does
    references = [p.instruction for p in pairs]
    summary = dict(n=len(pairs), bleu=bleu(generated, references), rouge_l=mean_rouge_l(generated, references),
                   empty=sum(1 for g in generated if not g))
    items = [dict(id=p.id, instruction=p.instruction, generated=g, rouge_l=rouge_l(g, p.instruction))
             for p, g in zip(pairs, generated)]
    return summary, items


# ------------------------------------------------------------------------------- rater

MISMATCHED_SUFFIX = "-mismatched"


def derangement(n: int, seed: int) -> list[int]:
    """A random permutation with no fixed point (``perm[i] != i`` for every i).

    Sattolo's algorithm: Fisher-Yates, except that position i swaps only with an *earlier*
    position (j < i, never j = i). The result is one cycle through all n positions, so
    nothing stays where it was. Seeded, so the same pairs are mismatched on every run.
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    perm = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # 0 <= j < i
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def mismatched(pairs: Sequence[Pair], seed: int) -> list[Pair]:
    """The same outputs with the instructions shuffled among them (a derangement): pairs a
    good rater should score low, because the answer is fine but it answers another question.

    Outputs stay the same, so the only thing that differs between a real pair and its
    mismatched twin is whether instruction and answer belong together. (Two pairs that
    share an instruction would make a "mismatch" that is real; those are left out.)
    """
    perm = derangement(len(pairs), seed)
    out = []
    for p, j in zip(pairs, perm):
        other = pairs[j]
        if _key(other.instruction) != _key(p.instruction):
            out.append(Pair(p.id + MISMATCHED_SUFFIX, other.instruction, p.output, p.source,
                            {**p.meta, "instruction_from": other.id}))
    return out


def _safe_auc(pos: list[float], neg: list[float]) -> float | None:
    return auc(pos, neg) if pos and neg else None


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def evaluate_rater(pairs: Sequence[Pair], complete: Complete, score_next: ScoreNext | None,
                   out_path: str | Path, k_shot: int = 3, tag: Tag | None = "seed", seed: int = 0,
                   batch_size: int = 8, progress: bool = False, logprobs: LogProbs | None = None,
                   chat: ChatFormat | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """How well the rater's scores separate real pairs from mismatched ones.

    Every real pair and its mismatched twin is rated exactly as self-curation rates
    (:func:`humback.rating.rate`: the Table 1 prompt, the text score, the log-prob fallback),
    and the scores are compared as a ranking: AUC 1.0 means every real pair scored above
    every mismatched one, 0.5 means the scores carry no information.

    Two AUCs are reported. ``auc`` uses the 1-5 score that curation keeps pairs by (a row
    without any score counts as 0, below everything). ``auc_expected`` uses the expected
    score sum(s * p(s)) from the log-probabilities of "1".."5" after the model's reasoning and
    "Score:", computed for *every* row here (curation only needs it for the rows without a
    readable score): a weak rater often writes the same digit for everything, while its
    probabilities still lean the right way. With ``logprobs``, a third, ``auc_likelihood``,
    ranks the pairs by :func:`instruction_information` instead: no rating prompt at all.

    ``chat`` prompts a released chat model in its own template (:func:`humback.rating.rater_prompt`).

    ``out_path`` is rewritten from scratch (a rated file from an earlier evaluation, with the
    same ids, must not be mistaken for finished work) and ends up holding every rated row,
    with ``real`` (true/false) and ``expected_score`` added.

    Returns:
        (summary, rows): summary has ``n_real``, ``n_mismatched``, ``auc``, ``auc_expected``
        (None without ``score_next``), ``valid_score_rate`` (share of answers with a readable
        "Score: N"), ``methods`` (text / logprob / none counts), ``mean_real``,
        ``mean_mismatched`` and the two ``histogram_*`` ({1: n, ..., 5: n}).
    """
    out_path = Path(out_path)
    out_path.unlink(missing_ok=True)
    fakes = mismatched(pairs, seed)
    rate(list(pairs) + fakes, complete, score_next, out_path, k_shot=k_shot, batch_size=call_size(batch_size),
         tag=tag, progress=progress, chat=chat)
    rows = read_rated(out_path)
    for row in rows:
        row["real"] = not row["id"].endswith(MISMATCHED_SUFFIX)

    if score_next is not None:  # the expected score for rows the fallback did not already score
        todo = [row for row in rows if row.get("expected_score") is None]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            prompts = [forced_score_prompt(rater_prompt(r["instruction"], r["output"], k_shot, tag, chat),
                                           clean_rating(r["rater_output"]), chat) for r in chunk]
            for row, digit_logprobs in zip(chunk, score_next(prompts), strict=True):
                row["expected_score"] = round(verdict_from_logprobs(digit_logprobs)[2], 4)
    if logprobs is not None:  # the prompt-free ranking, for every row
        info = instruction_information(list(pairs) + fakes, logprobs, tag)
        by_id = dict(zip([p.id for p in list(pairs) + fakes], info))
        for row in rows:
            row["instruction_information"] = round(by_id[row["id"]], 5)
    write_jsonl_atomic(out_path, rows)

    real = [r for r in rows if r["real"]]
    fake = [r for r in rows if not r["real"]]

    def scores(rs: list[dict[str, Any]]) -> list[float]:
        return [float(r["score"]) if r.get("score") is not None else 0.0 for r in rs]

    def expected(rs: list[dict[str, Any]]) -> list[float]:
        return [float(r["expected_score"]) for r in rs if r.get("expected_score") is not None]

    methods = method_counts(rows)
    summary = dict(
        n_real=len(real), n_mismatched=len(fake),
        auc=_safe_auc(scores(real), scores(fake)),
        auc_expected=_safe_auc(expected(real), expected(fake)) if score_next is not None else None,
        auc_likelihood=_safe_auc([by_id[r["id"]] for r in real], [by_id[r["id"]] for r in fake])
        if logprobs is not None else None,
        valid_score_rate=methods["text"] / len(rows) if rows else 0.0, methods=methods,
        mean_real=_mean([float(r["score"]) for r in real if r.get("score") is not None]),
        mean_mismatched=_mean([float(r["score"]) for r in fake if r.get("score") is not None]),
        histogram_real=histogram(real), histogram_mismatched=histogram(fake))
    return summary, rows


# ----------------------------------------------------------------------- forward model


def reference_nll(pairs: Sequence[Pair], logprobs: LogProbs, tag: Tag | None = None) -> dict[str, Any]:
    """Mean negative log-likelihood per token of the human answers, given the forward prompt.

    The cheapest check that fine-tuning taught the model something about answering: how
    probable does it find the answers people actually wrote? Lower is better; exp(nll) is the
    perplexity. The prompt is the one the model is asked with (same tag line), and prompt
    and answer are tokenized as in training (:func:`model.sampling.token_logprobs`).
    Note that NLL rewards hedging over the reference's wording, not helpfulness: read it
    together with the judged preference.

    Returns ``nll`` (nats per token), ``perplexity``, ``tokens`` (how many were scored) and
    ``per_pair``: ``(summed -log p, tokens)`` of each answer, for :func:`humback.metrics.paired_nll_gap`.
    """
    rows = logprobs([forward_prompt(p.instruction, tag) for p in pairs], [p.output for p in pairs])
    if len(rows) != len(pairs):
        raise ValueError(f"logprobs() returned {len(rows)} rows for {len(pairs)} pairs")
    nll, tokens = nll_per_token(rows)
    per_pair = [(-sum(float(x) for x in row), len(row)) for row in rows]
    return dict(nll=nll, perplexity=math.exp(min(nll, 700.0)), tokens=tokens, per_pair=per_pair)


def answer(pairs: Sequence[Pair], complete: Complete, tag: Tag | None = None) -> list[str]:
    """The model's answers to the held-out instructions (forward prompt, same tag)."""
    texts = complete([forward_prompt(p.instruction, tag) for p in pairs])
    if len(texts) != len(pairs):
        raise ValueError(f"complete() returned {len(texts)} texts for {len(pairs)} prompts")
    return [t.strip() for t in texts]


# ------------------------------------------------------------------------------ judging

JUDGE_STOPS = ("\n###",)  # not a bare "\n": models often start the verdict on a new line
JUDGE_TOKENS = 6  # a verdict is one word; parse_verdict reads the first non-empty line


def judge_pairwise(questions: Sequence[str], candidate: Sequence[str], baseline: Sequence[str],
                   complete: Complete, choose: Choose | None = None, max_chars: int = 2000
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """How often a judge prefers ``candidate``'s answers to ``baseline``'s, both orders judged.

    For each question the judge sees the two answers twice, candidate first (as A) and
    candidate second (as B), and :func:`humback.metrics.combine_orders` turns the two verdicts
    into a win, a loss or a tie. Each verdict is read strictly (:func:`humback.metrics.
    parse_verdict`); when the judge writes anything else, ``choose`` (if given) decides by
    comparing log p(" A") and log p(" B") after the prompt. Identical answers are a tie
    without asking the judge.

    Returns:
        (summary, items): :func:`humback.metrics.preference_rate`'s counts and rates, plus
        ``judgements`` (verdicts asked for), ``fallback_rate`` (share of them decided by
        log-probabilities) and ``first_position_rate`` (share of A-or-B verdicts that chose
        the first answer: 0.5 for a judge without position bias). Items hold each question's
        two verdicts and outcome.
    """
    if not len(questions) == len(candidate) == len(baseline):
        raise ValueError(f"{len(questions)} questions, {len(candidate)} and {len(baseline)} answers")
    asked = [i for i in range(len(questions)) if candidate[i].strip() != baseline[i].strip()]
    prompts = []
    for i in asked:
        prompts.append(judge_prompt(questions[i], candidate[i], baseline[i], max_chars))  # candidate is A
        prompts.append(judge_prompt(questions[i], baseline[i], candidate[i], max_chars))  # candidate is B
    texts = complete(prompts) if prompts else []
    if len(texts) != len(prompts):
        raise ValueError(f"complete() returned {len(texts)} texts for {len(prompts)} prompts")
    verdicts: list[Verdict | None] = [parse_verdict(t) for t in texts]
    methods = ["text" if v is not None else "none" for v in verdicts]
    unread = [k for k, v in enumerate(verdicts) if v is None]
    if unread and choose is not None:
        for k, lp in zip(unread, choose([prompts[k] for k in unread]), strict=True):
            verdicts[k] = "A" if lp["A"] > lp["B"] else "B" if lp["B"] > lp["A"] else "tie"
            methods[k] = "logprob"

    items: list[dict[str, Any]] = [dict(question=q, outcome="tie", verdicts=None) for q in questions]
    for n, i in enumerate(asked):
        first, second = verdicts[2 * n], verdicts[2 * n + 1]
        items[i] = dict(question=questions[i], outcome=combine_orders(first, second),
                        verdicts=[first, second], methods=methods[2 * n:2 * n + 2],
                        raw=[texts[2 * n], texts[2 * n + 1]])
    summary: dict[str, Any] = preference_rate(item["outcome"] for item in items)
    picked = [v for v in verdicts if v in ("A", "B")]
    summary.update(judgements=len(prompts),
                   fallback_rate=methods.count("logprob") / len(prompts) if prompts else 0.0,
                   first_position_rate=picked.count("A") / len(picked) if picked else None)
    return summary, items


# ----------------------------------------------------------- the fallback from a model


def spelled_after(tok: Any, probe: str, words: Sequence[str]) -> list[str]:
    """How to spell each word as a continuation of ``probe`` (tokenized separately, as
    :func:`model.sampling.token_logprobs` does) so that its tokens are the ones the model
    would see in the running text ``probe + " " + word``: " A" for byte-level BPE, "A" for
    sentencepiece (see :func:`humback.rating.digit_continuations` for why). If neither form
    matches, " word" is used: the comparison is then between whole strings, still fair.
    """
    base = tok.encode(probe)
    for form in (" {}", "{}"):
        conts = [form.format(w) for w in words]
        if all(tok.encode(f"{probe} {w}") == base + tok.encode(c) for w, c in zip(words, conts)):
            return conts
    return [f" {w}" for w in words]


def choice_scorer(model: Any, tok: Any, choices: Sequence[str] = ("A", "B"), batch_size: int = 8) -> Choose:
    """``choose`` for :func:`judge_pairwise` from a loaded model: for each prompt (ending in
    "Verdict:"), ``{choice: log p(choice | prompt)}``."""
    from model.sampling import score  # lazy: the measures need no torch otherwise

    conts = spelled_after(tok, f"Answer B is better.\n{JUDGE_SUFFIX}", choices)

    def choose(prompts: list[str]) -> list[dict[str, float]]:
        flat = score(model, tok, [p for p in prompts for _ in conts], conts * len(prompts), batch_size=batch_size)
        k = len(conts)
        return [dict(zip(choices, flat[i * k:(i + 1) * k])) for i in range(len(prompts))]

    return choose
