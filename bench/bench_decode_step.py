#!/usr/bin/env python
"""One decode step on a full KV cache, as the engine runs it and as it ran before, and
transformers' step: same model, same rows and cache length, in one process.

    python bench/bench_decode_step.py                                   # SmolLM2-135M, bf16, 8 rows x 900 keys
    python bench/bench_decode_step.py --prefix 690                      # ... of which 690 a shared prefix (rating)
    python bench/bench_decode_step.py --rows 16 --keys 600 --no-hf      # backtranslation-like
    python bench/bench_decode_step.py --model qwen2.5-coder-1.5b-instruct --keys 1800 --prefix 1620 --no-hf
    python bench/bench_decode_step.py --prefix 690 --fed 3 --no-hf      # + a step that feeds 3 tokens a row
    python bench/bench_decode_step.py --model FOLDER --device cuda --fed 3 --no-hf   # on a GPU (bench/gpu_check.py)

A decode step runs one new token per row against every cached key (``model.engine``'s step:
per-row positions and an additive key mask). The lines:

* **engine**: the step as ``model.engine.stream`` runs it on a CPU: float32 cache slots holding
  each row's own keys, the --prefix keys every row shares kept once (``KVCache.prefix``), the
  attention as float32 matmuls (``model.llama.decode_attention``);
* **bf16 cache, prefix per row**: the same attention over a bf16 cache in which each row holds
  a copy of the prefix (the engine before it kept the prefix once): converted to float32 each step;
* **SDPA**: that bf16 cache through ``F.scaled_dot_product_attention`` (before the float32 attention);
* **transformers**: ``model(next_ids, past_key_values=cache)`` after a prefill of the same length;
* with ``--fed N``, **engine, N tokens per row**: the engine's step feeding each row its last token
  and N - 1 prompt-lookup drafts (``generate(..., draft_tokens=N - 1)``): what a drafted step costs
  against the plain one.

Reported: milliseconds per step, the best of --rounds rounds of --steps steps, the variants
alternating (``time_steps``; on a GPU each round waits for the GPU to finish). On a GPU the
engine's slots are in the model's dtype (the prefix stays float32), as ``model.engine`` keeps
them, and only the engine's lines (and transformers') are timed: without a prefix a GPU step runs
SDPA in every variant, so the CPU-only comparisons would time the same thing.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_steps(steps: dict, n: int, rounds: int, sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Milliseconds per step of each of ``steps`` (name -> callable): ``rounds`` rounds, each
    timing every variant for ``n`` steps in turn, after 2 warm-up steps each; the best round's
    mean per variant. This machine's speed drifts by tens of percent within a minute, so the
    variants alternate and the least disturbed round is kept. ``sync`` waits for queued work
    (``torch.cuda.synchronize`` on a GPU, whose calls return before the work is done)."""
    for step in steps.values():
        step(), step()
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync()
            t = time.perf_counter()
            for _ in range(n):
                step()
            sync()
            best[name] = min(best[name], (time.perf_counter() - t) / n * 1000)
    return best


def main() -> None:
    import torch
    import torch.nn.functional as F

    import model.llama as llama
    from model import engine, load_model
    from model.packaged import packaged_model_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="name, folder or hub id (default SmolLM2-135M)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quantize", choices=["nf4"], default=None,
                   help="load our block linears as NF4 (bitsandbytes); needs --no-hf (transformers' would be bf16)")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--keys", type=int, default=900, help="cached keys per row, the prefix included")
    p.add_argument("--prefix", type=int, default=0, help="of them, keys every row shares (default 0)")
    p.add_argument("--steps", type=int, default=5, help="steps per round (default 5)")
    p.add_argument("--rounds", type=int, default=4, help="rounds, the variants alternating (default 4)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' step")
    p.add_argument("--fed", type=int, default=1,
                   help="also time the engine's step feeding this many tokens per row (a token + drafts; default 1: not)")
    args = p.parse_args()

    B, S, P = args.rows, args.keys, args.prefix
    if not 0 <= P < S:
        p.error(f"--prefix must be in 0..{S - 1} (fewer than --keys)")
    if args.fed < 1:
        p.error(f"--fed must be 1 or more, got {args.fed}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")
    if args.quantize and not args.no_hf:
        p.error("--quantize nf4 needs --no-hf: transformers' step here is bf16, so the two would not compare")
    device = torch.device(args.device)
    model, _ = load_model(args.model, dtype="bf16", device=args.device, quantize=args.quantize)
    vocab = model.config.vocab_size
    last = torch.randint(min(1000, vocab // 2), min(5000, vocab), (B, args.fed), device=device)
    pos = torch.full((B,), S - 1, device=device)

    def step(caches, own: int, fed: int = 1):  # own: cached keys per row in the slots (the rest in the prefix)
        mask, slot = torch.ones(B, own - 1 + fed, dtype=torch.long, device=device), pos - (S - own)
        positions = pos[:, None] + torch.arange(fed, device=device)

        def run():
            with torch.inference_mode():
                engine._run(model, caches, last[:, :fed], mask, positions, slot)
        return run

    # As model.engine.stream keeps them: the slots float32 on a CPU (the model's dtype elsewhere),
    # the shared prefix float32 everywhere.
    kept = engine._caches(model, B, S - P + args.fed, torch.float32 if device.type == "cpu" else None)
    a = model.model.layers[0].self_attn
    for c in kept if P else ():
        c.prefix = tuple(torch.randn(1, a.n_kv_heads, P, a.head_dim, device=device) for _ in range(2))
    per_row = engine._caches(model, B, S + 1)

    def sdpa_step():
        real = llama.decode_attention
        llama.decode_attention = lambda q, k, v, m, prefix=None: F.scaled_dot_product_attention(
            q, k, v, attn_mask=m, enable_gqa=q.shape[1] != k.shape[1])
        try:
            step(per_row, S)()
        finally:
            llama.decode_attention = real

    steps = {"engine": step(kept, S - P)}
    if device.type == "cpu":  # on a GPU a step without a prefix runs SDPA anyway: these two would be the same
        steps |= {"bf16 cache, prefix per row": step(per_row, S), "SDPA": sdpa_step}
    if args.fed > 1:
        steps[f"engine, {args.fed} tokens per row"] = step(kept, S - P, args.fed)
    if not args.no_hf:
        from transformers import AutoModelForCausalLM
        folder = packaged_model_dir(args.model) if not Path(args.model).exists() else args.model
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
        with torch.inference_mode():
            cache = hf(torch.randint(1000, 5000, (B, S - 1), device=device), use_cache=True).past_key_values
        full = torch.ones(B, S, dtype=torch.long, device=device)

        def theirs():
            with torch.inference_mode():
                hf(last[:, :1], attention_mask=full, past_key_values=cache, use_cache=True)
                cache.crop(-1)  # drop the new token: the same cache length at every step
        steps["transformers"] = theirs
    results = time_steps(steps, args.steps, args.rounds, torch.cuda.synchronize if device.type == "cuda" else lambda: None)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"{args.model}, bf16{' + ' + args.quantize if args.quantize else ''}, {B} rows x {S} cached keys "
          f"({P} shared), torch {torch.__version__}, {where}: one decode step, ms")
    for name, ms in results.items():
        print(f"  {name:<28} {ms:9.2f}")


if __name__ == "__main__":
    main()
