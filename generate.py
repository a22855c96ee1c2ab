#!/usr/bin/env python
"""Generate text with a Llama checkpoint (our model, our KV-cached sampler).

    python generate.py --prompt "The capital of France is Paris. The capital of Germany is"
    python generate.py --model meta-llama/Llama-2-7b-hf --quantize nf4 --prompt "..." --temperature 0.7 --top-p 0.9
"""
from __future__ import annotations

import argparse
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="model folder, hub repo id, or 'smollm2-135m-instruct' (the embedded default)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat the flag to generate for several prompts in one batch")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); the paper samples at 0.7")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0; the paper uses 0.9)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable); cut from the output")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="load block linears as 4-bit NF4 (bitsandbytes)")
    p.add_argument("--dtype", default=None, help="bf16 / fp32 / fp16 (default: bf16 on GPU or with nf4, else fp32)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from model import generate, load_model
    from model.load import CheckpointError
    try:
        t0 = time.perf_counter()
        model, tok = load_model(args.model, quantize=args.quantize, dtype=args.dtype, device=args.device)
        print(f"[loaded {args.model} in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    outs = generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, stop=args.stop, seed=args.seed)
    for prompt, out in zip(args.prompt, outs):
        print(prompt + out)
    print(f"[generated in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
