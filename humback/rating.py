"""Self-curation's rater: how each (instruction, output) pair gets its 1-5 score.

Step 2 of instruction backtranslation (Li et al. 2023, Section 2.3). Self-augmentation
gives many candidate pairs, and many are poor: the text was an ad, a menu, a forum
post, or the generated instruction does not match it. The seed model (fine-tuned on
the seed pairs only) is asked, with the prompt of the paper's Table 1
(:func:`data.templates.rating_prompt`), to reason briefly and end with ``Score: N``.
Pairs scored 5 form the paper's A5 set (A4 keeps scores >= 4; :mod:`humback.curation`
selects them); the next model is fine-tuned on them.

Which layout the prompt is in (:func:`rater_prompt`): our plain ``### Instruction`` format
for a rater fine-tuned here, or a released chat model's own chat format (ChatML, Llama-2's
``[INST]``) when that model rates as it is, as ``pipeline.py --rater-model`` does.

Getting a score for every row. A small or briefly trained rater often forgets the
score line, or writes ``Score: 10``. Then, instead of losing the row, we *force* the
format: append ``Score:`` to the prompt (after the model's own reasoning) and ask the
model which of the five digits it finds likeliest next, i.e. compare
log p(" 1" | prompt) .. log p(" 5" | prompt). That always yields a score, so every row
is rated either by ``"text"`` (parsed, :func:`humback.scores.parse_score`) or by
``"logprob"`` (the fallback), and ``score_method`` records which.

As in :mod:`humback.backtranslate`, the model work is passed in as callables,

* ``complete(prompts) -> texts``: the rater's free-text answers;
* ``score_next(prompts) -> [{1: logp, ..., 5: logp}, ...]``: the fallback, built from
  a model by :func:`logprob_scorer`;

and rated rows are appended batch by batch, so an interrupted run resumes where it
stopped.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data.pairs import DataError, Pair, append_jsonl, read_done_ids, require_unique_ids, unfinished_batches
from data.templates import HEADER_STOP, Tag, forward_prompt, rating_demonstrations, rating_instruction, rating_prompt
from humback.inference import Complete, LogProbs
from humback.scores import MIN_SCORE, SCORES, parse_score

if TYPE_CHECKING:
    from model.chat import ChatFormat

ScoreNext = Callable[[list[str]], list[dict[int, float]]]

# After its verdict a few-shot rater tends to write the next demonstration
# ("Example 4:\n...Score: 2"), and parse_score reads the *last* score line, so the text
# is cut there. The sampler can stop at these strings too (generate(..., stop=RATER_STOPS)).
RATER_STOPS = (HEADER_STOP, "\nExample ")
METHODS = ("text", "logprob", "likelihood", "none")  # the values of a rated row's score_method
# Which text a rater reads, as pipeline stages record it in their cache key: bump it whenever
# rater_prompt or forced_score_prompt change what a given rater sees, so that stages rated the old
# way run again instead of being reused. 2: a released chat model reads its own chat template,
# and Llama-2's fallback keeps the space after [/INST]. 3: ChatML raters read the demonstrations
# as earlier turns. (1, implied by its absence: plain only.)
RATER_PROMPT_VERSION = 3
_NEXT_BLOCK = re.compile(r"^[ \t]*(?:#{2,}[ \t]*\w+:|Example \d+:)", re.MULTILINE)


# ------------------------------------------------------------------------ the prompt


def rater_prompt(instruction: str, output: str, k_shot: int, tag: Tag | None, chat: ChatFormat | None) -> str:
    """The prompt the rater reads for one pair: k demonstrations and the paper's Table 1 filled in.

    Two layouts, one text. A rater fine-tuned here (M0: base + our adapter) learned our plain
    ``### Instruction`` format, so it gets :func:`data.templates.rating_prompt` (with the tag line
    it was trained with). A chat model used as it was released (``curate.py --model`` without an
    adapter, ``pipeline.py --rater-model``) learned its own chat layout instead, and follows
    instructions far more reliably in it: it gets the same text in its template (``chat``, from
    :func:`humback.inference.prompt_chat_format`), and no tag line, which only our training data
    carries. Where the template can hold earlier turns (ChatML), the k demonstrations are such
    turns, each Table 1 filled with its pair and answered by the "assistant"
    (:func:`data.templates.rating_demonstrations`): measured on the 1.5B rater, that made it end
    on a score far more often and tell real pairs from mismatched ones far better than the same
    examples quoted in one message (docs/qwen-rater.md); Llama-2 gets them in its one user turn.
    Either way the answer is read from its last ``Score:`` line, and the
    fallback (:func:`forced_score_prompt`) continues this prompt inside the model's own reply.
    """
    if chat is None:
        return rating_prompt(instruction, output, k_shot, tag)
    if chat.writes_history:  # ChatML: each demonstration is an earlier exchange the model answered
        return chat.render(rating_instruction(instruction, output), history=rating_demonstrations(k_shot))
    return chat.render(rating_instruction(instruction, output, k_shot))  # Llama-2: all in one user turn


def prompt_format_name(chat: ChatFormat | None) -> str:
    """The layout :func:`rater_prompt` used, as rated rows and reports record it: "plain" or the
    chat format's name ("chatml", "llama2")."""
    return chat.name if chat else "plain"


# ----------------------------------------------------------------- reading a verdict


def clean_rating(text: str) -> str:
    """The rater's answer without anything after it (a new header or demonstration)."""
    match = _NEXT_BLOCK.search(text)
    return (text[:match.start()] if match else text).strip()


def forced_score_prompt(prompt: str, rater_text: str, chat: ChatFormat | None = None) -> str:
    """The prompt for the fallback: the rating prompt, the model's own reasoning, then
    ``Score:``, so that the next token *must* be the verdict.

    The reasoning is kept (the score should follow from it, as in a normal answer),
    minus any unusable score line and what came after it. ``chat`` is the layout ``prompt`` is
    in (as for :func:`rater_prompt`): a chat template may put a separator before the reply
    (Llama-2's space after ``[/INST]``), and the reply must be re-read with it, so that its
    tokens are the ones the model generated.
    """
    lines = rater_text.splitlines()
    score_lines = [i for i, line in enumerate(lines) if "score" in line.lower()]
    if score_lines:
        lines = lines[:score_lines[-1]]
    reasoning = "\n".join(lines).strip()
    reply = f"{reasoning}\nScore:" if reasoning else "Score:"
    return prompt + (chat.reply_separator if chat else "") + reply


def verdict_from_logprobs(logprobs: Mapping[int, float]) -> tuple[int, list[float], float]:
    """(argmax score, the five probabilities renormalised over 1..5, expected score).

    The expected score sum(s * p(s)) is a finer-grained signal than the argmax (4.49
    vs 3.51 are both "4"), recorded for anyone who wants to rank within a score.
    """
    missing = [s for s in SCORES if s not in logprobs]
    if missing:
        raise ValueError(f"score_next must give a log-probability for each of {list(SCORES)}; missing {missing}")
    lps = [float(logprobs[s]) for s in SCORES]
    top = max(lps)
    weights = [math.exp(lp - top) for lp in lps]  # subtract the max: no overflow
    total = sum(weights)
    probs = [w / total for w in weights]
    best = SCORES[lps.index(top)]
    return best, probs, sum(s * p for s, p in zip(SCORES, probs))


# ------------------------------------------------------------------------ the stage


def rate(pairs: list[Pair], complete: Complete, score_next: ScoreNext | None, out_path: str | Path,
         k_shot: int = 3, batch_size: int = 8, tag: Tag | None = "seed", progress: bool = True,
         done_files: Sequence[str | Path] = (), chat: ChatFormat | None = None) -> dict[str, int]:
    """Rate every pair and append the rated rows to ``out_path``; skip ids already there.

    Args:
        pairs: (instruction, output) candidates, e.g. the output of :func:`humback.backtranslate.augment`.
        complete: the rater: prompts in, free-text answers out, in order.
        score_next: the fallback for answers without a valid score (see module
            docstring); None disables it, and such rows get ``score: null``.
        k_shot: few-shot demonstrations in the rating prompt (0 = the paper's zero-shot).
        batch_size: prompts per ``complete`` call and rows per durable write.
        tag: the tag line the rater saw on its training data (None for none).
        done_files: more files whose ids count as done (a distributed rank's: see
            :func:`humback.sharding.done_elsewhere`).
        chat: the rater's chat format, to prompt a released chat model in its own layout
            (:func:`rater_prompt`); None for our plain format.

    Each row is the pair plus ``k`` (the prompt's k_shot), ``prompt_format`` ("plain" or the
    chat format's name), ``rater_output`` (the raw text), ``score`` (1-5), ``score_method``
    ("text", "logprob" or "none"), and for "logprob" rows ``score_probs`` (p(1)..p(5)) and
    ``expected_score``.

    Returns:
        counts: ``input``, ``skipped_done``, ``rated`` (now), and how many of those were
        scored by ``text``, by ``logprob`` and by ``none``.
    """
    def rate_batch(batch: list[Pair]) -> list[dict[str, Any]]:
        prompts = [rater_prompt(p.instruction, p.output, k_shot, tag, chat) for p in batch]
        texts = complete(prompts)
        if len(texts) != len(batch):
            raise ValueError(f"complete() returned {len(texts)} texts for {len(batch)} prompts")
        rows = []
        for pair, raw in zip(batch, texts):
            score = parse_score(clean_rating(raw))
            rows.append(pair.to_dict() | {"k": k_shot, "prompt_format": prompt_format_name(chat),
                                          "rater_output": raw, "score": score,
                                          "score_method": "text" if score is not None else "none"})
        # One fallback call for the whole batch's failures (a batched forward pass).
        failed = [i for i, row in enumerate(rows) if row["score"] is None]
        if failed and score_next is not None:
            forced = [forced_score_prompt(prompts[i], clean_rating(texts[i]), chat) for i in failed]
            for i, logprobs in zip(failed, score_next(forced), strict=True):
                best, probs, expected = verdict_from_logprobs(logprobs)
                rows[i].update(score=best, score_method="logprob", score_probs=[round(p, 6) for p in probs],
                               expected_score=round(expected, 4))
        return rows
    return _rate_in_batches(pairs, rate_batch, out_path, batch_size, progress, done_files)


def _rate_in_batches(pairs: list[Pair], rate_batch: Callable[[list[Pair]], list[dict[str, Any]]],
                     out_path: str | Path, batch_size: int, progress: bool, done_files: Sequence[str | Path]
                     ) -> dict[str, int]:
    """What every rating method shares: check the pairs, skip ids already rated, rate the rest a
    batch at a time and append each batch's rows (so an interrupted run resumes), count methods."""
    for p in pairs:
        if not p.instruction.strip() or not p.output.strip():
            raise DataError(f"pair {p.id}: rating needs both an instruction and an output")
    require_unique_ids(pairs, "the pairs to rate")
    done = read_done_ids(out_path, *done_files)
    todo = [p for p in pairs if p.id not in done]
    stats = dict(input=len(pairs), skipped_done=len(pairs) - len(todo), rated=0) | {m: 0 for m in METHODS}
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="rate", unit="pair")
    for batch in unfinished_batches(pairs, batch_size, done):  # a batch is redone whole: see its docstring
        rows = [row for row in rate_batch(batch) if row["id"] not in done]
        append_jsonl(out_path, rows, "rated rows")
        for row in rows:
            stats[row["score_method"]] += 1
        stats["rated"] += len(rows)
        if bar:
            bar.update(len(rows))
    if bar:
        bar.close()
    return stats


# ------------------------------------------------ rating without a prompt: the likelihood

# nats/token of instruction information -> score: <= 0 -> 1, <= 0.05 -> 2, <= 0.1 -> 3, <= 0.2 -> 4,
# above -> 5. On guanaco's eval pairs with SmolLM2-135M (evaluate.py --rater), real pairs had a
# median of 0.18 and mismatched ones -0.03, with 90% of mismatched pairs below 0.
LIKELIHOOD_BINS = (0.0, 0.05, 0.1, 0.2)


def likelihood_score(information: float) -> int:
    """The 1-5 score of a pair whose instruction adds ``information`` nats per output token."""
    return MIN_SCORE + sum(information > b for b in LIKELIHOOD_BINS)


def instruction_information(pairs: Sequence[Pair], logprobs: LogProbs, tag: Tag | None = None) -> list[float]:
    """For each pair, how much its instruction explains its output, in nats per output token:

        [log p(output | forward prompt with the instruction) - log p(output | with no instruction)] / tokens

    (the pointwise mutual information of instruction and output under the model). No rating
    prompt is involved: a model too small to follow the Table 1 prompt can still tell, from its
    own likelihoods, that an answer about bread does not answer a question about magnets. The
    second term is computed once per distinct output and removes how predictable the output is
    by itself, so pairs with different outputs can be ranked against each other.
    """
    with_instruction = logprobs([forward_prompt(p.instruction, tag) for p in pairs], [p.output for p in pairs])
    outputs = list(dict.fromkeys(p.output for p in pairs))
    alone = dict(zip(outputs, logprobs([forward_prompt("", tag) for _ in outputs], outputs)))
    return [(sum(lp) - sum(alone[p.output])) / max(len(lp), 1) for p, lp in zip(pairs, with_instruction)]


def rate_by_likelihood(pairs: list[Pair], logprobs: LogProbs, out_path: str | Path, batch_size: int = 8,
                       tag: Tag | None = "seed", progress: bool = True, done_files: Sequence[str | Path] = ()
                       ) -> dict[str, int]:
    """Like :func:`rate`, but each pair's score comes from :func:`instruction_information`
    (``score_method`` "likelihood", the value kept as ``information``), not from a rating prompt.

    Not the paper's method: its rater is a 65B model following Table 1. A small model cannot
    follow that prompt (evaluate.py measures chance-level AUC for SmolLM2-135M) but ranks real
    pairs above mismatched ones by likelihood with AUC ~0.97. This judges only whether the
    instruction fits the output, not whether the output is a good answer.
    """
    def rate_batch(batch: list[Pair]) -> list[dict[str, Any]]:
        info = instruction_information(batch, logprobs, tag)
        return [p.to_dict() | {"score": likelihood_score(x), "score_method": "likelihood", "information": round(x, 5)}
                for p, x in zip(batch, info)]
    return _rate_in_batches(pairs, rate_batch, out_path, batch_size, progress, done_files)


# -------------------------------------------------------------- the fallback from a model


def digit_continuations(tok: Any, probe: str = "The answer is clear and complete.\nScore:") -> list[str]:
    """The strings c1..c5 such that, for this tokenizer, scoring ``prompt`` + ``c_s``
    (tokenized separately, as :func:`model.sampling.token_logprobs` does) gives exactly
    the tokens the model would see in the text ``"...Score: s"``.

    Why this is a question at all: the space before the digit is tokenized differently.
    Llama-2's sentencepiece writes "Score: 4" as ``Score : ▁ 4`` and encodes the
    separate string "4" as ``▁ 4`` (it puts a "▁" in front of every text), but " 4" as
    ``▁▁ 4``, a pair it never sees there. SmolLM2's byte-level BPE writes ``Score : Ġ 4``
    and encodes " 4" as ``Ġ 4`` but "4" as ``4``. So the right continuation is "4" for
    one and " 4" for the other; we try both and keep the one that matches.

    For the tokenizers above the five continuations share every token but the last
    (``▁``/``Ġ``), which is a single token per digit, so comparing the five summed
    log-probabilities compares exactly p(digit | prompt, "Score: "). (Were a digit split
    over several tokens, the sums would still compare the five whole strings.)
    """
    base = tok.encode(probe)
    for form in (" {}", "{}"):
        conts = [form.format(s) for s in SCORES]
        if all(tok.encode(f"{probe} {s}") == base + tok.encode(c) for s, c in zip(SCORES, conts)):
            return conts
    raise ValueError(f"{type(tok).__name__}: neither ' N' nor 'N' tokenizes like the end of 'Score: N'; "
                     f"the log-probability fallback does not support this tokenizer")


def logprob_scorer(model: Any, tok: Any, batch_size: int = 8) -> ScoreNext:
    """``score_next`` for :func:`rate` from a loaded model: for each prompt (ending in
    ``Score:``), the log-probabilities of the five continuations "1".."5" (spelled for
    this tokenizer by :func:`digit_continuations`), as ``{1: logp, ..., 5: logp}``.

    When the five continuations share every token but a last, single one (true of the
    tokenizers we use), one forward pass per prompt gives all five: the distribution of
    the next token after the shared part. The values then leave out the shared part's
    own log-probability, the same for all five, which the verdict (renormalised over
    1..5) does not see. Otherwise each continuation is scored in full, one pass each."""
    from model.sampling import next_token_logprobs, score  # lazy: data/ does not need torch otherwise

    conts = digit_continuations(tok)
    encoded = [tok.encode(c) for c in conts]
    shared = encoded[0][:-1]
    one_pass = all(e[:-1] == shared for e in encoded) and len({e[-1] for e in encoded}) == len(encoded)

    def score_next(prompts: list[str]) -> list[dict[int, float]]:
        if one_pass:
            lp = next_token_logprobs(model, tok, prompts, suffix_ids=shared, batch_size=batch_size)
            digit_ids = [e[-1] for e in encoded]
            return [dict(zip(SCORES, lp[i, digit_ids].tolist())) for i in range(len(prompts))]
        flat_prompts = [p for p in prompts for _ in conts]
        logps = score(model, tok, flat_prompts, conts * len(prompts), batch_size=batch_size)
        return [dict(zip(SCORES, logps[i * len(conts):(i + 1) * len(conts)])) for i in range(len(prompts))]

    return score_next
