#!/usr/bin/env python
"""Generate text with a Llama checkpoint (our model, our KV-cached sampler), in three modes:
give exactly one of --prompt, --unlabelled, --predict.

    # 1. complete prompts and print them
    python generate.py --prompt "The capital of France is Paris. The capital of Germany is"
    python generate.py --model meta-llama/Llama-2-7b-hf --quantize nf4 --prompt "..." --temperature 0.7 --top-p 0.9

    # 2. self-augmentation: the backward model writes an instruction for each unlabelled text
    python generate.py --model BASE --adapter runs/backward/adapter --unlabelled lima:GAIR/lima \\
        --n 150 --seed 0 --out augmented.jsonl [--shard 0/4]

    # 3. predictions: the (forward) model answers a test set, written as CSV id,instruction,output
    python generate.py --model BASE --adapter runs/forward/adapter --predict test.csv --out predictions.csv

Self-augmentation appends to --out batch by batch; run the same command again after an
interruption and it continues where it stopped (see humback/backtranslate.py).

Self-augmentation on several GPUs (or CPU processes): the same command under torchrun. Rank r
takes every N-th batch of texts and appends to its own part file (augmented.jsonl ->
augmented.rank{r}-of-{N}.jsonl, resumable like OUT); at the end rank 0 merges the parts into
OUT in input order (humback/sharding.py):

    torchrun --nproc_per_node 8 generate.py --model BASE --adapter runs/backward/adapter \\
        --unlabelled web:FILE --out augmented.jsonl
"""
from __future__ import annotations

import sys

from humback import generation
from humback.flags import generate_parser


def main(argv: list[str] | None = None) -> int:
    return generation.run(generate_parser(__doc__).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
