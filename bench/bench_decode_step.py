#!/usr/bin/env python
"""One decode step on a full KV cache: our step with its CPU attention, the same step with SDPA,
and transformers' step, same model, same rows and cache length, in one process.

    python bench/bench_decode_step.py                                   # SmolLM2-135M, bf16, 8 rows x 900 keys
    python bench/bench_decode_step.py --rows 16 --keys 400
    python bench/bench_decode_step.py --model qwen2.5-coder-1.5b-instruct --keys 1800 --no-hf

A decode step runs one new token per row against every cached key (``model.engine``'s step:
per-row positions and an additive key mask). On a CPU, ``model.llama.one_query_attention`` does
its attention as two float32 matmuls; "SDPA" swaps in ``F.scaled_dot_product_attention`` (what the
step ran before) to show what that choice is worth. transformers' step: ``model(next_ids,
past_key_values=cache)`` after a prefill of the same length. Reported: the mean of --steps steps
after 2 warm-ups, in milliseconds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_steps(step, n: int) -> float:
    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n * 1000


def main() -> None:
    import torch
    import torch.nn.functional as F

    import model.llama as llama
    from model import engine, load_model
    from model.packaged import packaged_model_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--keys", type=int, default=900, help="cached keys per row")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-hf", action="store_true", help="skip transformers' step")
    args = p.parse_args()

    model, _ = load_model(args.model, dtype="bf16", device="cpu")
    B, S = args.rows, args.keys
    caches = engine._caches(model, B, S + 1)
    last, pos = torch.randint(1000, 5000, (B, 1)), torch.full((B,), S - 1)
    mask = torch.ones(B, S, dtype=torch.long)

    def ours():
        with torch.inference_mode():
            engine._run(model, caches, last, mask, pos[:, None], pos)

    results = {"one_query_attention": time_steps(ours, args.steps)}
    real = llama.one_query_attention
    llama.one_query_attention = lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=m, enable_gqa=q.shape[1] != k.shape[1])
    try:
        results["SDPA"] = time_steps(ours, args.steps)
    finally:
        llama.one_query_attention = real
    if not args.no_hf:
        from transformers import AutoModelForCausalLM
        folder = packaged_model_dir(args.model) if not Path(args.model).exists() else args.model
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        with torch.inference_mode():
            cache = hf(torch.randint(1000, 5000, (B, S - 1)), use_cache=True).past_key_values
            full = torch.ones(B, S, dtype=torch.long)

            def theirs():
                hf(last, attention_mask=full, past_key_values=cache, use_cache=True)
                cache.crop(-1)  # drop the new token: the same cache length at every step
            results["transformers"] = time_steps(theirs, args.steps)
    print(f"{args.model}, bf16, {B} rows x {S} cached keys, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads: one decode step, ms")
    for name, ms in results.items():
        print(f"  {name:<20} {ms:8.1f}")


if __name__ == "__main__":
    main()
