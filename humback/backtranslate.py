"""Self-augmentation: the backward model writes an instruction for every unlabelled text.

Step 1 of instruction backtranslation (Li et al. 2023, Section 2.2). A backward model
p(instruction | output), fine-tuned on the seed pairs read "the other way round", is shown
each unlabelled text (a web passage, or a LIMA answer with its question removed) as if
it were an answer::

    ### Response:
    <the unlabelled text>

    ### Instruction:
    <the model writes here>

and whatever it writes becomes the text's instruction: a candidate training pair
(instruction, output). Many candidates are poor; self-curation (:mod:`humback.rating`)
rates them and keeps the best. This module only drops the ones that are broken in
ways no rater is needed to see (empty, a copy of the text, a stuck loop), so the
rater's time is not wasted on them.

The model work is a parameter of :func:`augment`, ``complete(prompts) -> texts``, so the
step can be read and tested without a model; :func:`run` (``generate.py --unlabelled``)
loads the backward model and passes :func:`humback.inference.completer`.

Long runs get killed. Results are appended to the output file one batch at a time
(:func:`data.pairs.append_jsonl` fsyncs each batch), dropped texts go to a sidecar file
``<out>.dropped.jsonl`` with the reason, and a re-run skips every id found in either
file (:func:`data.pairs.read_done_ids`). An interrupted run therefore resumes where it
stopped, losing at most the batch that was being generated, and no id is ever written twice.
Under torchrun each process backtranslates its share of the batches (:mod:`humback.sharding`).
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from data.pairs import (DataError, Pair, append_jsonl, as_unlabelled, dropped_path, read_done_ids, read_pairs,
                        require_unique_ids, sample, unfinished_batches)
from data.readers import format_stats, load_source
from data.templates import HEADER_STOP, backward_prompt
from humback import inference, sharding
from humback.cli import short

# A generated instruction must be at least this long to be a request at all ("Hi", "?"),
# and at most this long: a backward model that never stopped has written a text, not a
# question. Instructions in the seed data are 20-300 characters; LIMA's longest are
# a few thousand.
MIN_CHARS = 10
MAX_CHARS = 2000

# The backward prompt's headers. A model that has finished the instruction often goes
# on with the next header, as in its training text; everything from there on is cut.
_HEADER = re.compile(r"^[ \t]*#{2,}[ \t]*(?:Instruction|Response|Input)\b", re.IGNORECASE | re.MULTILINE)

# What the sampler should stop at, to save the tokens after the instruction
# (``generate(..., stop=AUGMENT_STOPS)``); :func:`clean_instruction` cuts them anyway.
AUGMENT_STOPS = (HEADER_STOP, "\n\n\n")

Complete = Callable[[list[str]], list[str]]


# ------------------------------------------------------------------------ the texts


def texts_to_backtranslate(pairs: Iterable[Pair]) -> list[Pair]:
    """The outputs of ``pairs`` as unlabelled texts (pairs with an empty output are left out).

    A labelled source (LIMA's answers, say) keeps each human instruction aside in
    ``meta["human_instruction"]``, so a generated instruction can be compared with the one it
    replaces; it rides along into the augmented pairs.
    """
    pairs = list(pairs)
    return [replace(u, meta={**u.meta, "human_instruction": p.instruction}) if p.instruction.strip() else u
            for p, u in zip(pairs, as_unlabelled(pairs)) if p.output.strip()]


# ------------------------------------------------------------------------ cleaning


def clean_instruction(text: str) -> str:
    """The instruction in a backward model's raw text: cut at the next header, strip."""
    match = _HEADER.search(text)
    if match:
        text = text[:match.start()]
    return text.strip()


def _normalise(text: str) -> str:
    """Lower case, single spaces: how we compare texts that differ only in layout."""
    return " ".join(text.lower().split())


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def is_repetitive(text: str, min_repeats: int = 3, share: float = 0.5) -> bool:
    """True when one word n-gram (n = 1..4) repeated ``min_repeats``+ times makes up at
    least ``share`` of the words, or one character repeats 10+ times in a row.

    That is the signature of a sampler stuck in a loop ("how to how to how to ...",
    "?????????"). Ordinary sentences reuse short words, but not half of themselves.
    """
    if re.search(r"(.)\1{9,}", text):
        return True
    words = text.lower().split()
    for n in range(1, 5):
        if len(words) < (8 if n == 1 else 6):
            continue  # too few words to call anything a loop (single words: "the" is common)
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        _, count = grams.most_common(1)[0]
        if count >= min_repeats and count * n >= share * len(words):
            return True
    return False


def degenerate_reason(instruction: str, output: str, min_chars: int = MIN_CHARS,
                      max_chars: int = MAX_CHARS) -> str | None:
    """Why a (cleaned) generated instruction is unusable, or None if it looks fine.

    Reasons, checked in this order: ``empty``; ``too_short`` (under ``min_chars``
    characters); ``too_long`` (over ``max_chars``); ``copies_output`` (the instruction is
    the start of the text it should ask for, e.g. its first sentence: a backward model's
    laziest guess, which teaches nothing); ``repetitive`` (see :func:`is_repetitive`).
    """
    if not instruction:
        return "empty"
    if len(instruction) < min_chars:
        return "too_short"
    if len(instruction) > max_chars:
        return "too_long"
    ni = _normalise(instruction).rstrip(" .?!:;,")
    no = _normalise(output)
    # Copy if the texts agree on the instruction's whole length, or on 40+ characters
    # (a long copy that drifts off later is still a copy).
    if ni and _common_prefix(ni, no) >= min(len(ni), 40):
        return "copies_output"
    if is_repetitive(instruction):
        return "repetitive"
    return None


# ------------------------------------------------------------------------- the stage


def augment(unlabelled: list[Pair], complete: Complete, out_path: str | Path, batch_size: int = 16,
            progress: bool = True, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS,
            done_files: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Write an instruction for every unlabelled text; append the pairs to ``out_path``.

    Args:
        unlabelled: the texts to backtranslate, as pairs whose ``output`` is the text
            (the instruction, if any, is ignored). Ids must be unique: they are how a
            re-run recognises finished work.
        complete: the backward model: a list of prompts in, one generated text per
            prompt out, in order.
        out_path: JSONL of ``{id, instruction, output, source[, meta]}`` rows, appended
            to. Dropped rows go to :func:`dropped_path` as ``{id, reason, generated}``.
        batch_size: prompts per ``complete`` call, and rows per durable write.
        done_files: more files whose ids count as done (a distributed rank's: see
            :func:`humback.sharding.done_elsewhere`).

    Returns:
        counts: ``input`` (texts given), ``skipped_done`` (already in one of the files from
        an earlier run), ``written`` (pairs appended now), ``dropped`` (total now) and
        ``dropped_by_reason`` (reason -> count, see :func:`degenerate_reason`).
    """
    require_unique_ids(unlabelled, "the unlabelled data")
    out_path = Path(out_path)
    side = dropped_path(out_path)
    done = read_done_ids(out_path, side, *done_files)
    todo = [p for p in unlabelled if p.id not in done]
    stats: dict[str, Any] = dict(input=len(unlabelled), skipped_done=len(unlabelled) - len(todo),
                                 written=0, dropped=0, dropped_by_reason={})
    reasons: Counter[str] = Counter()
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="augment", unit="text")
    for batch in unfinished_batches(unlabelled, batch_size, done):
        texts = complete([backward_prompt(p.output) for p in batch])
        if len(texts) != len(batch):
            raise ValueError(f"complete() returned {len(texts)} texts for {len(batch)} prompts")
        kept: list[Pair] = []
        dropped: list[dict[str, str]] = []
        for pair, raw in zip(batch, texts):
            if pair.id in done:  # finished before a crash in mid-batch: the batch was redone whole
                continue
            instruction = clean_instruction(raw)
            reason = degenerate_reason(instruction, pair.output, min_chars, max_chars)
            if reason is None:
                kept.append(Pair(pair.id, instruction, pair.output, pair.source, dict(pair.meta)))
            else:
                reasons[reason] += 1
                dropped.append({"id": pair.id, "reason": reason, "generated": raw})
        # Two files, so two writes: a crash between them leaves this batch half recorded, and
        # the rerun redoes it whole (unfinished_batches), writing only the dropped rows.
        if kept:
            append_jsonl(out_path, kept, "generated pairs")
        if dropped:
            append_jsonl(side, dropped, "dropped rows")
        stats["written"] += len(kept)
        stats["dropped"] += len(dropped)
        if bar:
            bar.update(len(kept) + len(dropped))
    if bar:
        bar.close()
    stats["dropped_by_reason"] = dict(sorted(reasons.items()))
    return stats


def format_counts(stats: dict[str, Any]) -> str:
    """One line for the terminal, e.g. ``input=150 skipped_done=0 written=141 dropped=9 (empty=2, ...)``."""
    head = " ".join(f"{k}={v}" for k, v in stats.items() if not isinstance(v, dict))
    by_reason = stats.get("dropped_by_reason") or {}
    tail = " (" + ", ".join(f"{k}={v}" for k, v in by_reason.items()) + ")" if by_reason else ""
    return head + tail


# ----------------------------------------------------------------- with a model: generate.py


def run(args: argparse.Namespace) -> int:
    """``generate.py --unlabelled SPEC --out JSONL``: load the backward model (--model + --adapter),
    backtranslate the texts of SPEC (or this process's share of them) and print a few pairs."""
    from lora import distributed

    settings = inference.adapter_settings(args.adapter)
    inference.check_direction(settings, "backward", "self-augmentation (writing instructions for texts)")
    i, n = sharding.shard_flag(args.shard)
    pairs, stats = load_source(args.unlabelled)
    print(format_stats(args.unlabelled, stats))
    texts = texts_to_backtranslate(pairs)
    if not texts:
        raise DataError(f"{args.unlabelled}: no texts to backtranslate")
    if args.n is not None:
        texts = sample(texts, args.n, args.seed)  # every shard draws the same sample, then splits it
    per_call = inference.call_size(args.batch_size)
    mine, out, done_files = sharding.split_work(texts, args.out, per_call, i, n)
    world = distributed.world_size()
    print(f"{len(mine)} texts to backtranslate" + (f" (shard {i}/{n})" if n > 1 else "")
          + (f" (rank 0's share of {len(texts)}, over {world} processes)" if world > 1 else ""))

    args.device = distributed.device_for_rank(args.device)
    model, tok = inference.load_for_inference(args)
    complete = inference.completer(model, tok, args, args.max_new_tokens, list(AUGMENT_STOPS) + (args.stop or []))
    counts = augment(mine, complete, out, batch_size=per_call, done_files=done_files,
                     progress=not args.no_progress and distributed.is_main())
    counts = sharding.merge_ranks(args.out, [p.id for p in texts], counts)
    if counts is None:  # a rank other than 0: its part is written and merged
        return 0
    print(format_counts(counts))
    ours = {p.id for p in (texts if world > 1 else mine)}  # rank 0 has merged every rank's rows
    written = [p for p in read_pairs(args.out) if p.id in ours] if Path(args.out).is_file() else []
    print(f"\n{len(written)} pairs in {args.out}; {min(5, len(written))} examples:")
    for p in written[:5]:
        human = p.meta.get("human_instruction")
        human = f"\n  human's instruction: {short(human)}" if human else ""
        print(f"- [{p.id}] instruction: {short(p.instruction)}{human}\n  output: {short(p.output)}")
    return 0
