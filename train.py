#!/usr/bin/env python
"""LoRA (or QLoRA) fine-tuning of a Llama on (instruction, output) pairs, in either direction.

    # the backward model p(instruction | output) of instruction backtranslation
    python train.py --data data/demo/seed.jsonl --direction backward --out runs/backward
    # the forward model p(output | instruction), QLoRA recipe over a 4-bit base
    python train.py --model meta-llama/Llama-2-7b-hf --quantize nf4 --qlora \\
        --data curated.jsonl --direction forward --tag augmented --out runs/forward

The loss covers the target side only (the output, or for --direction backward the instruction).
Writes OUT/adapter (PEFT format), OUT/metrics.jsonl, OUT/checkpoints/; --resume continues a run.

Data-parallel on several GPUs (or CPU processes): the same command under torchrun. Each process
loads the base itself and trains on its share of every step; the global batch is
--batch-size x processes x --grad-accum (lora/finetune.py, lora/distributed.py):

    torchrun --nproc_per_node 8 train.py --model meta-llama/Llama-2-7b-hf --quantize nf4 --qlora \\
        --data curated.jsonl --batch-size 4 --grad-accum 1 --out runs/forward
"""
from __future__ import annotations

import sys

from humback import training
from humback.flags import train_parser


def main(argv: list[str] | None = None) -> int:
    return training.run(train_parser(__doc__).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
