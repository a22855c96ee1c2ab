#!/usr/bin/env python
"""Self-curation: the seed model rates every augmented pair 1-5 and the best are kept.

    python curate.py --model BASE --adapter runs/seed/adapter --pairs augmented.jsonl \\
        --out rated.jsonl --curated curated.jsonl --threshold 5 --k-shot 3

The rater is the seed model M0, as in the paper: whatever --model/--adapter give. It writes
a short reasoning and "Score: N" (greedy by default); answers without a readable score get
one from the model's next-token probabilities after a forced "Score:" (humback/rating.py).
--out collects every rated row (appended, resumable: run the same command again after an
interruption); --curated is rewritten at the end with the pairs scored >= --threshold
(5 = the paper's A5 set, 4 = A4), ready for `train.py --data curated.jsonl`.

On several GPUs (or CPU processes), the same command under torchrun: rank r rates every N-th
batch into its part file (rated.jsonl -> rated.rank{r}-of-{N}.jsonl, resumable), and rank 0
merges the parts into --out in input order and writes --curated (humback/sharding.py):

    torchrun --nproc_per_node 8 curate.py --model BASE --adapter runs/seed/adapter \\
        --pairs augmented.jsonl --out rated.jsonl --curated curated.jsonl
"""
from __future__ import annotations

import sys

from humback import curation
from humback.flags import curate_parser


def main(argv: list[str] | None = None) -> int:
    return curation.run(curate_parser(__doc__).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
