"""Self-curation: rate every augmented pair, keep the best, and show what the rater did.

Step 2 of instruction backtranslation (Li et al. 2023, Section 2.3), the part around the
rater (:mod:`humback.rating`): the rated rows are read back (:func:`read_rated`), the pairs
scored >= the threshold are selected (:func:`select`: 5 gives the paper's A5 set, 4 gives A4),
and a report (score histogram, how the scores were obtained, the highest- and lowest-rated
pairs, and with a pooled input which source the rater kept) lets one judge the rater by eye.
:func:`run` is ``curate.py``: it loads the rater, rates, selects and reports.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from data.pairs import DataError, Pair, iter_jsonl, write_jsonl_atomic
from data.readers import format_stats, load_source
from humback import inference, rating, sharding
from humback.cli import INPUT_ERRORS, fail, short
from humback.publish import PushError, publish_dataset
from humback.rating import METHODS
from humback.scores import SCORES


# --------------------------------------------------------------- reading the ratings


def read_rated(path: str | Path) -> list[dict[str, Any]]:
    """The rated rows of a file written by :func:`humback.rating.rate` (DataError if one has no score field)."""
    rows = []
    for lineno, row in iter_jsonl(path):
        if "score" not in row or "id" not in row:
            raise DataError(f"{path}:{lineno}: not a rated row (needs 'id' and 'score'); was it written by curate.py?")
        rows.append(row)
    return rows


def _score(row: Mapping[str, Any]) -> int | None:
    s = row.get("score")
    return s if isinstance(s, int) and s in SCORES else None


def select(rated_rows: Iterable[Mapping[str, Any]], threshold: int = 5) -> list[Pair]:
    """The pairs scored >= ``threshold``, as plain pairs for fine-tuning.

    threshold=5 gives the paper's A5 set (the one its best model is trained on),
    threshold=4 the larger, noisier A4. Rows without a score are never selected.
    """
    if threshold not in SCORES:
        raise ValueError(f"threshold must be one of {list(SCORES)}, got {threshold}")
    return [Pair.from_dict(row) for row in rated_rows
            if (s := _score(row)) is not None and s >= threshold]


def histogram(rated_rows: Iterable[Mapping[str, Any]]) -> dict[int, int]:
    """How many rows got each score, {1: n1, ..., 5: n5} (zeros included; unscored rows left out)."""
    counts = Counter(s for row in rated_rows if (s := _score(row)) is not None)
    return {s: counts.get(s, 0) for s in SCORES}


def render_histogram(hist: Mapping[int, int], width: int = 40) -> str:
    """Text bars, highest score first::

        5 | ##########                      12  30.0%
        4 | ################                20  50.0%
    """
    total = sum(hist.values()) or 1
    top = max(hist.values(), default=0) or 1
    lines = []
    for s in sorted(hist, reverse=True):
        n = hist[s]
        bar = "#" * round(width * n / top)
        lines.append(f"{s} | {bar:<{width}} {n:>5} {100 * n / total:5.1f}%")
    return "\n".join(lines)


def method_counts(rated_rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """How the scores were obtained: {"text": n, "logprob": n, "likelihood": n, "none": n}."""
    counts = Counter(row.get("score_method", "none") for row in rated_rows)
    return {m: counts.get(m, 0) for m in METHODS}


def extremes(rated_rows: Iterable[Mapping[str, Any]], n: int = 5) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``n`` highest- and ``n`` lowest-rated rows, to eyeball what the rater rewards.

    Ties are broken by the fallback's expected score, or the likelihood's information, where
    there is one (a finer signal), then by file order.
    """
    rows = [dict(r) for r in rated_rows if _score(r) is not None]

    def key(row: dict[str, Any]) -> float:
        information = max(-1.0, min(1.0, row.get("information", 0.0)))  # likelihood rows' finer signal
        return row["score"] + 0.01 * (row.get("expected_score", row["score"]) - row["score"]) + 0.001 * information
    ranked = sorted(rows, key=key, reverse=True)  # sorted() is stable: file order within ties
    lowest = sorted(rows, key=key)
    return ranked[:n], lowest[:n]


# ------------------------------------------------------------------------------- the report


def print_report(rows: list[dict], threshold: int, curated: list) -> None:
    """Histogram, how the scores were obtained, and the extremes, to judge the rater by eye."""
    total = len(rows)
    methods = method_counts(rows)
    scored = methods["text"] + methods["logprob"] + methods["likelihood"]
    print(f"\nscore histogram ({total} rated pairs):")
    print(render_histogram(histogram(rows)))
    pct = (lambda n: f"{100 * n / total:.1f}%") if total else (lambda n: "-")
    by_likelihood = f", from the likelihood: {methods['likelihood']}" if methods["likelihood"] else ""
    print(f"\nscores from text: {methods['text']} ({pct(methods['text'])}), from the log-prob fallback: "
          f"{methods['logprob']} ({pct(methods['logprob'])}){by_likelihood}, none: {methods['none']}; "
          f"valid: {scored}/{total} ({pct(scored)})")
    top, bottom = extremes(rows, 5)
    for title, chosen in (("highest", top), ("lowest", bottom)):
        print(f"\n{len(chosen)} {title} rated:")
        for row in chosen:
            print(f"- score {row['score']} ({row['score_method']}) [{row['id']}] {short(row['instruction'], 90)}\n"
                  f"  output: {short(row['output'], 90)}")
    print(f"\n{len(curated)} pairs scored >= {threshold} selected")
    sources = Counter(row.get("source") or "?" for row in rows)
    if len(sources) > 1:  # a pooled input (e.g. LIMA answers + web pages): which pool does the rater keep?
        kept = Counter(p.source or "?" for p in curated)  # exactly what select() kept
        print("kept by source: " + ", ".join(f"{s} {kept[s]}/{n} ({100 * kept[s] / n:.0f}%)"
                                             for s, n in sources.most_common()))


# ------------------------------------------------------------------ with a model: curate.py


def run(args: argparse.Namespace) -> int:
    """``curate.py``: rate --pairs with the rater (--model + --adapter), append to --out, write the
    pairs scored >= --threshold to --curated, print the report (and push it with --push-to-hub)."""
    from lora import distributed
    with distributed.session(backend="gloo", timeout=sharding.RANKS_WAIT):  # joins the others under torchrun
        try:
            return _curate(args)
        except INPUT_ERRORS as e:
            return fail(e)


def _curate(args: argparse.Namespace) -> int:
    from lora import distributed
    from model import engine
    i, n = sharding.shard_flag(args.shard)
    settings = inference.adapter_settings(args.adapter)
    inference.check_direction(settings, "forward", "rating (the seed model answering the Table 1 prompt)")
    tag = inference.resolve_tag(args.tag, settings)
    pairs, stats = load_source(args.pairs)
    print(format_stats(args.pairs, stats))
    per_call = inference.call_size(args.batch_size)
    mine, out, done_files = sharding.split_work(pairs, args.out, per_call, i, n)

    args.device = distributed.device_for_rank(args.device)
    model, tok = inference.load_for_inference(args)
    progress = not args.no_progress and distributed.is_main()
    t0 = time.perf_counter()
    chat = None
    # every call below (the chunks, their fallback) prompts after one prefix: prefill it once
    with engine.keep_prefixes(model):
        if args.method == "likelihood":
            counts = rating.rate_by_likelihood(mine, inference.logprobs_fn(model, tok, args.batch_size), out,
                                               batch_size=per_call, tag=tag, progress=progress,
                                               done_files=done_files)
        else:
            chat = inference.prompt_chat_format(tok, args.adapter, args.prompt_format)
            tag = inference.rating_tag(args.tag, tag, chat)
            complete = inference.completer(model, tok, args, args.max_new_tokens, rating.RATER_STOPS)
            score_next = None if args.no_fallback else rating.logprob_scorer(model, tok, batch_size=args.batch_size)
            counts = rating.rate(mine, complete, score_next, out, k_shot=args.k_shot, batch_size=per_call,
                                 tag=tag, progress=progress, done_files=done_files, chat=chat)
    counts = sharding.merge_ranks(args.out, [p.id for p in pairs], counts)
    if counts is None:  # a rank other than 0: its part is written and merged
        return 0
    layout = "" if args.method == "likelihood" else f", prompt_format={rating.prompt_format_name(chat)}"
    print(" ".join(f"{k}={v}" for k, v in counts.items()) + f" ({time.perf_counter() - t0:.1f}s, "
          f"method={args.method}, k_shot={args.k_shot}, tag={tag or 'none'}{layout})")

    # Report and select over this input's rows only (the --out file may hold other runs' rows too).
    ours = {p.id for p in (pairs if distributed.world_size() > 1 else mine)}  # rank 0 merged them all
    have = Path(args.out).is_file() and Path(args.out).stat().st_size > 0
    rows = [row for row in read_rated(args.out) if row["id"] in ours] if have else []
    curated = select(rows, args.threshold)
    write_jsonl_atomic(args.curated, curated)
    print_report(rows, args.threshold, curated)
    print(f"curated pairs written to {args.curated}")
    if args.push_to_hub:
        info = dict(unlabelled=args.pairs, rater=f"{args.model} + {args.adapter or 'no adapter'}",
                    threshold=args.threshold, rated=len(rows), kept=len(curated), histogram=histogram(rows))
        upload = Path(args.curated).with_name(Path(args.curated).stem + "-hub-upload")
        try:
            publish_dataset(args.curated, args.push_to_hub, info, upload)
        except PushError as e:
            return fail(e, 1)
        print(f"pushed to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0
