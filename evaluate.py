#!/usr/bin/env python
"""Does it work? Evaluate the models the pipeline makes, on held-out pairs, against the base model.

    python evaluate.py --model BASE [--quantize nf4] --out runs/a/eval \\
        --backward runs/a/backward/adapter --rater runs/a/m0/adapter --forward runs/a/forward/adapter

    # a local copy of guanaco's eval split, 20 pairs, the forward model only, no judge
    python evaluate.py --forward runs/demo/forward/adapter --no-judge --n 20 --out runs/demo/eval \\
        --heldout ../shared/data/guanaco/openassistant_best_replies_eval.jsonl

Give any of the three; each is measured for the adapter AND for the untrained base model prompted
the same way (the adapter is loaded into the base and taken out again, so one base serves all):

  --backward ADAPTER   instruction reconstruction: the backward model writes an instruction for each
                       held-out answer; BLEU and ROUGE-L against the human instruction.
  --rater ADAPTER      self-curation quality: the rater scores the real pairs and mismatched ones (the
                       same answers, instructions shuffled); ranking AUC of the 1-5 scores, of the
                       log-prob expected scores and of the likelihood gain the instruction gives the
                       output (no prompt), score histograms, rate of readable "Score: N" lines.
                       --rater base rates with the base model alone; --rater-model MODEL rates with
                       another (e.g. bigger) model, alone or with its own adapter.
  --forward ADAPTER    answering: NLL per token of the human answers, and how often a judge (default:
                       the base model itself, prompted to compare) prefers the adapter's answers to
                       the base's, both orders judged. Repeat the flag to compare several adapters
                       in one table (e.g. an ablation).

Held-out pairs (default: guanaco's eval split, which no stage trains on) that appear in an adapter's
training data (the 'data' that train.py records in adapter_config.json) or in --exclude are dropped.
Writes OUT/eval.json and OUT/eval.md (the tables), per-model rows (backward_*.jsonl, rater_*.jsonl,
forward_*.jsonl) and, when matplotlib is installed, OUT/rater_scores.png, OUT/loss_curves.png and,
with two or more --forward adapters, OUT/forward_nll.png (bars: NLL and win rate per model).
"""
from __future__ import annotations

import sys

from humback import evaluation
from humback.flags import evaluate_parser


def main(argv: list[str] | None = None) -> int:
    return evaluation.run(evaluate_parser(__doc__).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
