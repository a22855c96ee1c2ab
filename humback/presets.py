"""The pipeline's recipes (``pipeline.py --preset NAME``) and the stages a run is made of.

A :class:`Preset` is every setting of a run that is not a stage's own flag: the base model,
the three data sources, how much of each to use, the curation threshold and few-shot count,
and the extra flags each command gets. ``pipeline.py``'s overrides (``--model``,
``--seed-data``, ``--train-args`` ...) replace a preset's values (:func:`resolve_preset`).

Three recipes, from a laptop to the paper:

* ``demo``: SmolLM2-135M-Instruct and the demo set committed in ``data/demo/``, on a CPU;
* ``assignment``: the course assignment, Llama-2-7B in NF4 on one Colab-class GPU, rated by the
  chat model the assignment names, Llama-2-7B-chat;
* ``paper``: the paper's recipe at the scale one GPU allows (two iterations).
"""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field, replace

from data import DEMO_DIR as DEMO
from data.guanaco import EVAL_SPEC as GUANACO_EVAL
from humback.cli import DEFAULT_MODEL


@dataclass
class Preset:
    """One recipe: the model, the data, how much of it, and the extra flags of each command."""

    model: str
    seed_data: str
    unlabelled: list[str]               # one or more sources of texts, e.g. LIMA answers + web pages
    test_prompts: str
    quantize: str | None = None
    n_seed: int | None = None           # sample of the seed pairs (paper: 3,200 oasst1 pairs)
    n_unlabelled: int | None = None     # texts to backtranslate per source (assignment: 150 LIMA completions)
    n_test: int = 10                    # held-out prompts answered in "respond"
    iterations: int = 1                 # paper: 2 (M0 -> M1 -> M2)
    forward_data: str = "seed+curated"  # "curated" for the assignment's step 4
    threshold: int = 5                  # A5: keep pairs rated 5
    k_shot: int = 3
    train: list[str] = field(default_factory=list)        # extra train.py flags, all trainings
    augment: list[str] = field(default_factory=list)      # extra generate.py flags
    curate: list[str] = field(default_factory=list)       # extra curate.py flags
    respond: list[str] = field(default_factory=list)
    heldout: str | None = None          # pairs for the evaluate stage (none: no evaluate stage)
    evaluate: list[str] = field(default_factory=list)      # extra evaluate.py flags
    rater_model: str | None = None      # rate with this chat model alone instead of M0 (one iteration only)
    # The rating budget (curate --max-new-tokens, evaluate --rating-tokens) when rater_model rates,
    # in place of the preset's (--curate-args/--eval-args still override it). A released chat
    # model reasons at its own length before "Score:"; the demo's 48 tokens, sized for M0, cut 30%
    # of the 1.5B's answers on long texts.
    rater_model_tokens: int | None = None


PRESETS = {
    # SmolLM2-135M-Instruct and the demo set committed in data/demo: the whole method on a laptop CPU.
    "demo": Preset(model=DEFAULT_MODEL, seed_data=str(DEMO / "seed.jsonl"),
                   unlabelled=[str(DEMO / "unlabelled.jsonl")], test_prompts=str(DEMO / "test_prompts.jsonl"),
                   n_test=5, threshold=4, k_shot=2,
                   train=["--epochs", "3", "--batch-size", "4", "--max-len", "384", "--lr", "5e-4",
                          "--eval-frac", "0.1", "--eval-every", "0", "--save-every", "0", "--warmup-steps", "3"],
                   augment=["--max-new-tokens", "48", "--batch-size", "16"],
                   curate=["--max-new-tokens", "48", "--batch-size", "8"],
                   respond=["--max-new-tokens", "96", "--batch-size", "8"],
                   heldout=str(DEMO / "heldout.jsonl"),
                   evaluate=["--n", "12", "--instruction-tokens", "48", "--rating-tokens", "48",
                             "--answer-tokens", "96"],
                   rater_model_tokens=128),
    # The course assignment: Llama-2-7B in NF4 on one Colab-class GPU.
    "assignment": Preset(model="meta-llama/Llama-2-7b-hf", quantize="nf4",
                         seed_data="guanaco:timdettmers/openassistant-guanaco",
                         unlabelled=["lima:GAIR/lima"], test_prompts="lima-prompts:GAIR/lima/test.jsonl",
                         n_unlabelled=150, forward_data="curated",
                         train=["--epochs", "1", "--batch-size", "4", "--grad-accum", "4", "--max-len", "1024",
                                "--gradient-checkpointing", "--save-every", "100", "--eval-every", "100"],
                         augment=["--max-new-tokens", "128", "--batch-size", "16"],
                         curate=["--max-new-tokens", "128", "--batch-size", "8"],
                         respond=["--max-new-tokens", "512", "--batch-size", "8"],
                         heldout=GUANACO_EVAL, evaluate=["--n", "100", "--rating-tokens", "128"],
                         # The assignment names its rater: Llama-2-7B-chat, prompted in its own [INST] format
                         # (humback.rating.rater_prompt) and NF4 like the base; --rater-model m0 rates with M0.
                         rater_model="meta-llama/Llama-2-7b-chat-hf"),
    # The paper's recipe at the scale one GPU allows: 3,200 oasst1 seed pairs, a web corpus, two iterations.
    "paper": Preset(model="meta-llama/Llama-2-7b-hf", quantize="nf4", seed_data="oasst1:OpenAssistant/oasst1",
                    unlabelled=["web:allenai/c4/en/c4-train.00000-of-01024.json.gz"],
                    test_prompts="lima-prompts:GAIR/lima/test.jsonl", n_seed=3200, n_unlabelled=5000,
                    iterations=2, train=["--epochs", "2", "--batch-size", "4", "--grad-accum", "8",
                                         "--max-len", "2048", "--gradient-checkpointing", "--qlora",
                                         "--save-every", "200", "--eval-every", "200"],
                    augment=["--max-new-tokens", "128", "--batch-size", "32"],
                    curate=["--max-new-tokens", "128", "--batch-size", "16"],
                    respond=["--max-new-tokens", "512", "--batch-size", "8"],
                    heldout=GUANACO_EVAL, evaluate=["--n", "100", "--rating-tokens", "128"]),
}
STAGES = ["data", "backward", "m0", "augment", "curate", "forward", "respond", "curate2", "forward2", "respond2",
          "evaluate", "ablate-curated", "ablate-random", "ablate-oracle", "ablate-all", "ablation"]
ITERATION2 = STAGES[7:10]
ABLATION = STAGES[11:]


def stages_of(pre: Preset, ablation: bool, oracle: str | None) -> list[str]:
    """The stages of one run, in order: the method's, a second iteration's, the evaluation's (with
    held-out pairs) and the ablation's (with ``--ablation``; the control (e) with ``--ablation-oracle``)."""
    return (STAGES[:7] + (ITERATION2 if pre.iterations == 2 else []) + (["evaluate"] if pre.heldout else [])
            + ([s for s in ABLATION if s != "ablate-oracle" or oracle] if ablation else []))


def with_flag(flags: list[str], name: str, value: str) -> list[str]:
    """``flags`` with ``name``'s value set to ``value``: replaced where the flag is, else appended."""
    if name not in flags:
        return flags + [name, value]
    i = flags.index(name)
    return flags[:i + 1] + [value] + flags[i + 2:]


def resolve_preset(args: argparse.Namespace) -> Preset:
    """The preset ``--preset`` names, with the values the override flags give."""
    pre = PRESETS[args.preset]
    over = {k: v for k, v in dict(model=args.model, seed_data=args.seed_data, unlabelled=args.unlabelled,
                                  test_prompts=args.test_prompts, n_seed=args.n_seed, n_unlabelled=args.n_unlabelled,
                                  threshold=args.threshold, k_shot=args.k_shot, iterations=args.iterations,
                                  forward_data=args.forward_data).items()
            if v is not None}
    if args.rater_model:
        over["rater_model"] = None if args.rater_model == "m0" else args.rater_model
    if over.get("rater_model", pre.rater_model) and pre.rater_model_tokens:
        over["curate"] = with_flag(pre.curate, "--max-new-tokens", str(pre.rater_model_tokens))
        over["evaluate"] = with_flag(pre.evaluate, "--rating-tokens", str(pre.rater_model_tokens))
    if args.quantize:
        over["quantize"] = None if args.quantize == "none" else args.quantize
    if args.heldout:
        over["heldout"] = None if args.heldout == "none" else args.heldout
    for name in ("train", "augment", "curate", "eval"):  # later flags win in argparse, so these override the preset's
        extra = getattr(args, f"{name}_args")
        if extra:
            key = "evaluate" if name == "eval" else name
            over[key] = over.get(key, getattr(pre, key)) + shlex.split(extra)
    return replace(pre, **over)
