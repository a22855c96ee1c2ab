#!/usr/bin/env python
"""Would prompt-lookup drafts pay on our workloads? Tokens per step, and what a step of k+1 costs.

    python bench/bench_prompt_lookup.py                  # 16 + 16 rating prompts, 32 LIMA completions
    python bench/bench_prompt_lookup.py --n-rating 8 --n-lima 8 --drafts 2

Speculative decoding with prompt lookup (transformers' ``prompt_lookup_num_tokens``, vLLM's
n-gram speculator) guesses the next k tokens by finding the last few generated tokens earlier in
the row's own prompt + output and copying what followed there. One forward pass over the row's
last token and the k guesses checks them all; a greedy row keeps the guesses up to the first one
the model would not have chosen, plus the model's own token there. Rating copies the pair's
words into its reasoning and backtranslation copies the answer's topic, so guesses often hold.

Two figures decide whether it pays, both printed here:

* **tokens per step**: our greedy outputs (``model.generate``, SmolLM2-135M, bf16) replayed with
  drafts of up to k tokens from the longest of the last 3/2/1 tokens found before (the engine's
  ``_Lookup``); counted per row, as if each row took its own steps (a batched step checks its
  longest draft);
* **the cost of checking**: one forward pass of (rows, 1 + k) new tokens against (rows, 1), no
  cache (the weights' part of a step: attention over the cache comes on top and grows with k too).

A step of 1 + k tokens then gives ``tokens per step x cost(1) / cost(1 + k)`` the speed of a
plain step at best: a projection, not a measured speed. The engine drafts this way with
``generate(..., draft_tokens=k)``; ``bench_engine.py --drafts k`` measures it on the workloads.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import backtranslation_workload, rating_workload  # noqa: E402


def steps_with_drafts(prompt: list[int], output: list[int], k: int) -> int:
    """Steps a greedy row takes to produce ``output`` when each step checks a draft of up to ``k``
    tokens, guessed as the engine guesses them (``model.engine._Lookup``): it keeps the draft's
    tokens that match the output, plus the next output token."""
    from model.engine import _Lookup
    lookup, steps, i = _Lookup(prompt), 0, 0
    while i < len(output):
        guess, kept = lookup.draft(k), 0
        while kept < len(guess) and i + kept < len(output) and guess[kept] == output[i + kept]:
            kept += 1
        lookup.ids += output[i:i + kept + 1]  # the kept guesses and the model's own token
        i, steps = i + kept + 1, steps + 1
    return steps


def forward_ms(model, rows: int, tokens: int, rounds: int = 4, n: int = 5) -> float:
    """Milliseconds of one forward pass over (rows, tokens) random ids, best of ``rounds``."""
    import torch
    ids = torch.randint(1000, 5000, (rows, tokens))
    best = float("inf")
    with torch.inference_mode():
        model(ids)
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(n):
                model(ids)
            best = min(best, (time.perf_counter() - t) / n * 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="model to generate with and time (default: the embedded SmolLM2)")
    ap.add_argument("--n-rating", type=int, default=16, help="pairs per rating workload (default 16)")
    ap.add_argument("--n-lima", type=int, default=32, help="LIMA completions to backtranslate (default 32)")
    ap.add_argument("--drafts", type=int, nargs="+", default=[2, 4, 8], help="draft lengths k (default 2 4 8)")
    args = ap.parse_args()

    import torch
    from model import generate, load_model
    model, tok = load_model(args.model, dtype="bf16", device="cpu")
    workloads = {"rating (demo pairs)": rating_workload(args.n_rating, "demo"),
                 "rating (guanaco pairs)": rating_workload(args.n_rating, "guanaco"),
                 "backtranslation (LIMA)": backtranslation_workload(args.n_lima)}
    print(f"{args.model}, bf16, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| workload | new tokens | " + " | ".join(f"tokens/step, k={k}" for k in args.drafts) + " |")
    print("|---|---:|" + "---:|" * len(args.drafts))
    batches = set()
    for name, (prompts, max_new, batch, stops) in workloads.items():
        batches.add(batch)
        outs = generate(model, tok, prompts, max_new_tokens=max_new, stop=list(stops), batch_size=batch)
        pairs = [(tok.encode(p, bos=tok.add_bos), tok.encode(o)) for p, o in zip(prompts, outs)]
        total = sum(len(o) for _, o in pairs)
        per_k = [total / sum(steps_with_drafts(p, o, k) for p, o in pairs) for k in args.drafts]
        print(f"| {name} | {total} | " + " | ".join(f"{x:.2f}" for x in per_k) + " |", flush=True)
    print("\none forward pass, no cache, ms (rows x new tokens per row):")
    for rows in sorted(batches):
        one = forward_ms(model, rows, 1)
        line = [f"{rows} x 1: {one:.1f}"] + [f"{rows} x {1 + k}: {forward_ms(model, rows, 1 + k):.1f}"
                                           for k in args.drafts]
        print("  " + ", ".join(line), flush=True)


if __name__ == "__main__":
    main()
