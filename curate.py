#!/usr/bin/env python
"""Self-curation: the seed model rates every augmented pair 1-5 and the best are kept.

    python curate.py --model BASE --adapter runs/seed/adapter --pairs augmented.jsonl \\
        --out rated.jsonl --curated curated.jsonl --threshold 5 --k-shot 3

The rater is the seed model M0, as in the paper: whatever --model/--adapter give. It writes
a short reasoning and "Score: N" (greedy by default); answers without a readable score get
one from the model's next-token probabilities after a forced "Score:" (data/curate.py).
--out collects every rated row (appended, resumable: run the same command again after an
interruption); --curated is rewritten at the end with the pairs scored >= --threshold
(5 = the paper's A5 set, 4 = A4), ready for `train.py --data curated.jsonl`.

On several GPUs (or CPU processes), the same command under torchrun: rank r rates every N-th
batch into its part file (rated.jsonl -> rated.rank{r}-of-{N}.jsonl, resumable), and rank 0
merges the parts into --out in input order and writes --curated (see generate.py):

    torchrun --nproc_per_node 8 curate.py --model BASE --adapter runs/seed/adapter \\
        --pairs augmented.jsonl --out rated.jsonl --curated curated.jsonl
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from generate import (INPUT_ERRORS, RANKS_WAIT, UsageError, add_compile_flag, add_model_flags, adapter_settings,
                      batch_seed, check_direction, load_for_inference, merge_ranks, resolve_tag, shard_flag, short,
                      split_work)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--pairs", required=True,
                   help="pairs to rate: generate.py's self-augmentation output (or any spec data.readers reads)")
    g.add_argument("--out", required=True, help="rated rows, JSONL (appended to; ids already there are skipped)")
    g.add_argument("--curated", required=True, help="the selected pairs, JSONL (rewritten atomically at the end)")
    g.add_argument("--threshold", type=int, choices=[1, 2, 3, 4, 5], default=5,
                   help="keep pairs scored >= this (default 5: the paper's A5; 4 gives A4)")
    g.add_argument("--shard", default=None, help="i/n: rate only every n-th pair from position i "
                   "(run n shards with separate --out/--curated files)")
    add_model_flags(p)
    g = p.add_argument_group("rating")
    g.add_argument("--method", choices=["prompt", "likelihood"], default="prompt",
                   help="prompt: the paper's Table 1 rating prompt, 'Score: N' (default); likelihood: no prompt, "
                        "score 1-5 from how much the instruction raises log p(output) per token (for raters too "
                        "small to follow the prompt; see data/curate.py rate_by_likelihood)")
    g.add_argument("--k-shot", type=int, default=3,
                   help="few-shot demonstrations before the Table 1 prompt, 0-5 (default 3; the paper uses 0)")
    g.add_argument("--tag", choices=["auto", "seed", "augmented", "none"], default="auto",
                   help="tag line in the rating prompt; auto = 'seed' if the adapter was trained with a tag, else none")
    g.add_argument("--max-new-tokens", type=int, default=96, help="tokens for the reasoning and score (default 96)")
    g.add_argument("--temperature", type=float, default=0.0, help="rater sampling temperature (default 0: greedy)")
    g.add_argument("--top-p", type=float, default=1.0, help="rater nucleus mass (default 1.0)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed, used when --temperature > 0 (default 0)")
    g.add_argument("--batch-size", type=int, default=8, help="pairs rated together (default 8)")
    add_compile_flag(g)
    g.add_argument("--no-fallback", action="store_true",
                   help="do not score unreadable answers from log-probabilities (they stay unscored)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--push-to-hub", metavar="OWNER/NAME", default=None,
                   help="push the curated JSONL + a dataset card as a hub dataset repo (token from HF_TOKEN or "
                        "the login cache); the upload folder is written next to --curated first")
    return p


def print_report(rows: list[dict], threshold: int, curated: list) -> None:
    """Histogram, how the scores were obtained, and the extremes, to judge the rater by eye."""
    from collections import Counter

    from data.curate import extremes, histogram, method_counts, render_histogram
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lora import distributed
    with distributed.session(backend="gloo", timeout=RANKS_WAIT):  # joins the others under torchrun
        return run(args)


def run(args: argparse.Namespace) -> int:
    from lora import distributed
    try:
        from data.curate import RATER_STOPS, logprob_scorer, rate, rate_by_likelihood, read_rated, select
        from data.pairs import write_jsonl_atomic
        from data.readers import format_stats, load_source
        from model import generate

        if not 0 <= args.k_shot <= 5:
            raise UsageError(f"--k-shot {args.k_shot}: expected 0-5")
        i, n = shard_flag(args.shard)
        settings = adapter_settings(args.adapter)
        check_direction(settings, "forward", "rating (the seed model answering the Table 1 prompt)")
        tag = resolve_tag(args.tag, settings)
        pairs, stats = load_source(args.pairs)
        print(format_stats(args.pairs, stats))
        mine, out, done_files = split_work(pairs, args.out, args.batch_size, i, n)

        args.device = distributed.device_for_rank(args.device)
        model, tok = load_for_inference(args)

        def complete(prompts: list[str]) -> list[str]:
            return generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, stop=list(RATER_STOPS), seed=batch_seed(args.seed, prompts),
                            batch_size=args.batch_size, compile=args.compile)

        progress = not args.no_progress and distributed.is_main()
        t0 = time.perf_counter()
        if args.method == "likelihood":
            from model.sampling import token_logprobs

            def logprobs(prompts: list[str], continuations: list[str]) -> list[list[float]]:
                return [t.tolist() for t in token_logprobs(model, tok, prompts, continuations, args.batch_size)]
            counts = rate_by_likelihood(mine, logprobs, out, batch_size=args.batch_size, tag=tag, progress=progress,
                                        done_files=done_files)
        else:
            score_next = None if args.no_fallback else logprob_scorer(model, tok, batch_size=args.batch_size)
            counts = rate(mine, complete, score_next, out, k_shot=args.k_shot, batch_size=args.batch_size,
                          tag=tag, progress=progress, done_files=done_files)
        counts = merge_ranks(args.out, [p.id for p in pairs], counts)
        if counts is None:  # a rank other than 0: its part is written and merged
            return 0
        print(" ".join(f"{k}={v}" for k, v in counts.items()) + f" ({time.perf_counter() - t0:.1f}s, "
              f"method={args.method}, k_shot={args.k_shot}, tag={tag or 'none'})")

        # Report and select over this input's rows only (the --out file may hold other runs' rows too).
        ours = {p.id for p in (pairs if distributed.world_size() > 1 else mine)}  # rank 0 merged them all
        have = Path(args.out).is_file() and Path(args.out).stat().st_size > 0
        rows = [row for row in read_rated(args.out) if row["id"] in ours] if have else []
        curated = select(rows, args.threshold)
        write_jsonl_atomic(args.curated, curated)
        print_report(rows, args.threshold, curated)
        print(f"curated pairs written to {args.curated}")
        if args.push_to_hub:
            from data.curate import histogram
            from data.publish import PushError, publish_dataset
            info = dict(unlabelled=args.pairs, rater=f"{args.model} + {args.adapter or 'no adapter'}",
                        threshold=args.threshold, rated=len(rows), kept=len(curated), histogram=histogram(rows))
            upload = Path(args.curated).with_name(Path(args.curated).stem + "-hub-upload")
            try:
                publish_dataset(args.curated, args.push_to_hub, info, upload)
            except PushError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            print(f"pushed to https://huggingface.co/datasets/{args.push_to_hub}")
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
