#!/usr/bin/env python
"""Instruction backtranslation end to end (Li et al. 2023, "Self-Alignment with Instruction
Backtranslation", arXiv:2308.06259), as a chain of the project's own commands.

    python pipeline.py --preset demo --workdir runs/demo           # SmolLM2-135M + our demo data, CPU
    python pipeline.py --preset demo --workdir runs/shared \\
        --seed-data ../shared/data/guanaco/guanaco_1k_train_human_assistant.jsonl \\
        --unlabelled ../shared/data/lima/train.jsonl --test-prompts ../shared/data/lima/test.jsonl
    python pipeline.py --preset assignment --workdir runs/a        # Llama-2-7B NF4, guanaco -> LIMA (one GPU)
    python pipeline.py --preset paper --workdir runs/p             # oasst1 seed, web corpus, two iterations

Stages (each one a folder of WORKDIR with a manifest; a re-run skips finished stages, and
--from STAGE redoes that stage and everything after it):

  data       seed pairs, unlabelled texts (a seeded sample of --n-unlabelled from each source), held-out prompts
  backward   LoRA backward model p(instruction | output) on the seed pairs        (train.py)
  m0         seed model M0: forward model on the seed pairs, tag "seed"           (train.py)
  augment    self-augmentation: the backward model writes an instruction per text (generate.py)
  curate     self-curation: M0 rates each pair 1-5 (Table 1 prompt + few-shot)   (curate.py)
             (--rater-model MODEL: that model alone rates instead, e.g. a bigger chat model)
  forward    M1 on seed (tag seed) + curated (tag augmented) pairs               (train.py)
  respond    M1 answers the held-out prompts; 5 are printed                       (generate.py)
  (paper preset, iteration 2: curate2 with M1 as the rater, forward2 = M2, respond2)
  evaluate   every model on held-out pairs no stage trained on: the backward model's BLEU/ROUGE-L,
             the rater's real-vs-mismatched AUC, M0/M1(/M2) NLL and judged wins vs the base
                                                                                  (evaluate.py)
  with --ablation (and a held-out set), the paper's quality-vs-quantity experiment: forward
  models trained the same way (--train-args, then --ablation-train-args) on different pairs, all
  with the seed tag line, compared by evaluate.py:
  ablate-curated   trained on the curated set (rated >= --threshold: A5 at the paper's 5)
  ablate-random    trained on a random sample of the uncurated augmented pairs, same size
                   (--ablation-draws K: K such models, ablate-random-2 ... -K drawing with seeds
                   SEED+1 ... SEED+K-1, so the verdict covers the luck of the draw;
                   --ablation-match tokens: as many answer tokens as (a) instead of as many pairs)
  ablate-oracle    with --ablation-oracle SOURCE, a control: as (b), but drawn from SOURCE's texts only
                   (e.g. the LIMA half of a LIMA + web pool: what a rater that knew would keep);
                   if not even this is shown better than (b), (a) vs (b) says little about the rater
  ablate-all       trained on all augmented pairs
  ablation         evaluate.py on those + M0 (the seed-only model, as the m0 stage trained
                   it: without --ablation-train-args); ablation.md, forward_nll.png

Every stage prints the equivalent command, so any step can be rerun or changed by hand.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
DEMO = ROOT / "data" / "demo"


@dataclass
class Preset:
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
    rater_model: str | None = None      # rate with this model alone instead of M0 (one iteration only)


GUANACO_EVAL = "guanaco:timdettmers/openassistant-guanaco/openassistant_best_replies_eval.jsonl"

PRESETS = {
    # SmolLM2-135M-Instruct and the demo set committed in data/demo: the whole method on a laptop CPU.
    "demo": Preset(model="smollm2-135m-instruct", seed_data=str(DEMO / "seed.jsonl"),
                   unlabelled=[str(DEMO / "unlabelled.jsonl")], test_prompts=str(DEMO / "test_prompts.jsonl"),
                   n_test=5, threshold=4, k_shot=2,
                   train=["--epochs", "3", "--batch-size", "4", "--max-len", "384", "--lr", "5e-4",
                          "--eval-frac", "0.1", "--eval-every", "0", "--save-every", "0", "--warmup-steps", "3"],
                   augment=["--max-new-tokens", "48", "--batch-size", "16"],
                   curate=["--max-new-tokens", "48", "--batch-size", "8"],
                   respond=["--max-new-tokens", "96", "--batch-size", "8"],
                   heldout=str(DEMO / "heldout.jsonl"),
                   evaluate=["--n", "12", "--k-shot", "2", "--instruction-tokens", "48", "--rating-tokens", "48",
                             "--answer-tokens", "96"]),
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
                         heldout=GUANACO_EVAL, evaluate=["--n", "100", "--rating-tokens", "128"]),
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="recipe to run (default demo)")
    p.add_argument("--workdir", required=True, help="run folder; each stage writes WORKDIR/<stage>/")
    p.add_argument("--from", dest="from_stage", choices=STAGES, default=None,
                   help="redo this stage and every later one (earlier finished stages are kept)")
    p.add_argument("--until", choices=STAGES, default=None, help="stop after this stage")
    g = p.add_argument_group("overrides (each replaces the preset's value)")
    g.add_argument("--model", help="base model: folder, hub id or smollm2-135m-instruct")
    g.add_argument("--quantize", choices=["nf4", "none"], help="4-bit NF4 base or none")
    g.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    g.add_argument("--seed-data", help="seed pairs: any data.readers spec (guanaco:..., oasst1:..., a JSONL)")
    g.add_argument("--unlabelled", nargs="+", metavar="SPEC",
                   help="texts to backtranslate: one or more specs (lima:..., web:..., a JSONL); several are "
                        "pooled, e.g. curated answers + raw web pages, to see which ones curation keeps")
    g.add_argument("--test-prompts", help="held-out prompts for 'respond' (lima-prompts:..., a JSONL)")
    g.add_argument("--n-seed", type=int, help="sample this many seed pairs")
    g.add_argument("--n-unlabelled", type=int, help="sample this many unlabelled texts from each source")
    g.add_argument("--threshold", type=int, choices=range(1, 6), help="keep pairs rated >= this (paper: 5)")
    g.add_argument("--k-shot", type=int, choices=range(0, 6), help="few-shot examples in the rating prompt")
    g.add_argument("--rater-model", metavar="MODEL",
                   help="self-curation rater: this model alone (folder or hub id, quantized like --model) instead "
                        "of the seed model M0, e.g. a bigger chat model when the base is too small to follow the "
                        "Table 1 prompt; the evaluate stage then measures this rater. Not the paper's method, "
                        "which rates with M0 itself")
    g.add_argument("--iterations", type=int, choices=[1, 2], help="1: M1; 2: also M2 (paper)")
    g.add_argument("--forward-data", choices=["seed+curated", "curated"], help="what the forward model trains on")
    g.add_argument("--train-args", default="", help="extra train.py flags for every training, e.g. \"--max-steps 5\"")
    g.add_argument("--augment-args", default="", help="extra generate.py flags for self-augmentation")
    g.add_argument("--curate-args", default="", help="extra curate.py flags for self-curation")
    g.add_argument("--heldout", help="held-out pairs for the evaluate stage: any data.readers spec, or 'none' "
                                     "to skip the stage")
    g.add_argument("--eval-args", default="", help="extra evaluate.py flags, e.g. \"--n 30 --no-judge\"")
    g.add_argument("--ablation", action="store_true",
                   help="also run the quality-vs-quantity ablation (ablate-* stages and 'ablation')")
    g.add_argument("--ablation-train-args", default="",
                   help="extra train.py flags for the ablate-* trainings only, after --train-args (e.g. "
                        "\"--epochs 3\": their sets are small)")
    g.add_argument("--ablation-draws", type=int, default=1, metavar="K",
                   help="train (b), the random same-size set, on K different random draws (sample and training "
                        "seed SEED, SEED+1, ...), because one draw can be lucky: ablation.md then says how many "
                        "of the K draws (a) beats. If curation made no difference, (a) would still beat all K by "
                        "luck about 1 time in K+1 (default 1; each draw costs one training and one evaluation)")
    g.add_argument("--ablation-match", choices=["pairs", "tokens"], default="pairs",
                   help="what (b) matches in (a): 'pairs', the same number of pairs (the paper's comparison, "
                        "default), or 'tokens', as many answer tokens to train on (after --max-len truncation; "
                        "separates 'which pairs' from 'how much text' when the rater prefers short or long answers)")
    g.add_argument("--ablation-oracle", metavar="SOURCE", default=None,
                   help="add a control (e) to the ablation: trained like (b) on a random same-size sample, but of "
                        "the texts from SOURCE only (a source of a pooled --unlabelled, e.g. 'lima' in a LIMA + web "
                        "pool): what a rater that knew which texts are good would keep. If (e) is not shown better "
                        "than (b) either, the comparison of (a) with (b) says little about the rater")
    g.add_argument("--seed", type=int, default=0, help="seed for sampling data and decoding (default 0)")
    g.add_argument("--push-to-hub", metavar="OWNER/PREFIX", default=None,
                   help="push the forward adapter(s) as OWNER/PREFIX-m1 (-m2) and the curated data as "
                        "OWNER/PREFIX-curated (upload folders are written under WORKDIR/hub first)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def resolve_preset(args: argparse.Namespace) -> Preset:
    pre = PRESETS[args.preset]
    over = {k: v for k, v in dict(model=args.model, seed_data=args.seed_data, unlabelled=args.unlabelled,
                                  test_prompts=args.test_prompts, n_seed=args.n_seed, n_unlabelled=args.n_unlabelled,
                                  threshold=args.threshold, k_shot=args.k_shot, iterations=args.iterations,
                                  forward_data=args.forward_data, rater_model=args.rater_model).items()
            if v is not None}
    if args.quantize:
        over["quantize"] = None if args.quantize == "none" else args.quantize
    if args.heldout:
        over["heldout"] = None if args.heldout == "none" else args.heldout
    for name in ("train", "augment", "curate", "eval"):  # later flags win in argparse, so these override the preset's
        extra = getattr(args, f"{name}_args")
        if extra:
            key = "evaluate" if name == "eval" else name
            over[key] = getattr(pre, key) + shlex.split(extra)
    return replace(pre, **over)


class StageFailed(RuntimeError):
    pass


def call(script: str, argv: list[str]) -> None:
    """Run one of our scripts' main(argv) in this process, printing the equivalent command."""
    print("$ python " + script + ".py " + " ".join(shlex.quote(a) for a in argv), flush=True)
    module = __import__(script)
    prog, sys.argv[0] = sys.argv[0], script + ".py"  # argparse names the script whose flag is wrong
    try:
        rc = module.main(argv)
    except SystemExit as e:  # argparse rejected a flag (e.g. from --train-args), or --help: the stage made nothing
        rc = e.code or "0 before doing its work (a --help among its flags?)"
    finally:
        sys.argv[0] = prog
    if rc:
        raise StageFailed(f"{script}.py exited with status {rc}")


def model_flags(pre: Preset, device: str | None, model: str | None = None) -> list[str]:
    """--model (``model``, default the preset's), --quantize and --device for our scripts."""
    flags = ["--model", model or pre.model]
    if pre.quantize:
        flags += ["--quantize", pre.quantize]
    if device:
        flags += ["--device", device]
    return flags


def prepare_data(pre: Preset, seed: int, stage_dir: Path) -> list[str]:
    """Read the three sources once and freeze them as JSONL files the later stages hash."""
    from dataclasses import replace as dc_replace

    from data.pairs import DataError, as_unlabelled, require_unique_ids, sample, write_jsonl_atomic
    from data.readers import format_stats, load_source
    seed_pairs, stats = load_source(pre.seed_data)
    print(format_stats(pre.seed_data, stats))
    seed_pairs = [p for p in seed_pairs if p.instruction.strip() and p.output.strip()]
    if pre.n_seed:
        seed_pairs = sample(seed_pairs, pre.n_seed, seed)
    unlabelled = []
    for spec in pre.unlabelled:  # each source sampled on its own, so a big one cannot crowd out a small one
        texts, stats = load_source(spec)
        print(format_stats(spec, stats))
        texts = [dc_replace(u, meta={**u.meta, "human_instruction": p.instruction}) if p.instruction.strip() else u
                 for p, u in zip(texts, as_unlabelled(texts)) if p.output.strip()]
        unlabelled += sample(texts, pre.n_unlabelled, seed) if pre.n_unlabelled else texts
    # checked here too, not only when augmenting: that stage runs after two trainings
    require_unique_ids(unlabelled, "the unlabelled texts of " + " + ".join(pre.unlabelled))
    tests, stats = load_source(pre.test_prompts)
    print(format_stats(pre.test_prompts, stats))
    tests = [p for p in tests if p.instruction.strip()][:pre.n_test]
    if not seed_pairs or not unlabelled or not tests:
        raise DataError("a source gave no usable rows: "
                        f"{len(seed_pairs)} seed pairs, {len(unlabelled)} texts, {len(tests)} prompts")
    write_jsonl_atomic(stage_dir / "seed.jsonl", [dc_replace(p, meta={**p.meta, "tag": "seed"}) for p in seed_pairs])
    write_jsonl_atomic(stage_dir / "unlabelled.jsonl", unlabelled)
    write_jsonl_atomic(stage_dir / "test_prompts.jsonl", tests)
    print(f"{len(seed_pairs)} seed pairs, {len(unlabelled)} unlabelled texts, {len(tests)} held-out prompts")
    return ["seed.jsonl", "unlabelled.jsonl", "test_prompts.jsonl"]


def forward_training_set(pre: Preset, seed_file: Path, curated_file: Path, out: Path) -> list[str]:
    """Seed pairs tagged "seed" + curated pairs tagged "augmented" (the paper's mix), or curated only."""
    from dataclasses import replace as dc_replace

    from data.pairs import DataError, read_pairs, write_jsonl_atomic
    curated = [dc_replace(p, meta={**p.meta, "tag": "augmented"}) for p in read_pairs(curated_file)] \
        if curated_file.stat().st_size else []
    rows = (read_pairs(seed_file) if pre.forward_data == "seed+curated" else []) + curated
    if not rows:
        raise DataError(f"{curated_file}: no curated pairs to train on (lower --threshold, or use "
                        f"--forward-data seed+curated)")
    write_jsonl_atomic(out / "train.jsonl", rows)
    print(f"forward training set: {len(rows) - len(curated)} seed + {len(curated)} curated pairs")
    return ["train.jsonl"]


def show_responses(csv_path: Path, n: int = 5) -> None:
    import csv
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    print(f"\n{min(n, len(rows))} example responses:")
    for r in rows[:n]:
        print(f"\n### Instruction: {r['instruction']}\n### Response: {r['output'][:600]}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ablation_draws < 1:
        parser.error(f"--ablation-draws must be >= 1, got {args.ablation_draws}")
    if (args.ablation_draws > 1 or args.ablation_match != "pairs") and not args.ablation:
        parser.error("--ablation-draws and --ablation-match shape the ablation: add --ablation")
    if args.ablation_oracle and not args.ablation:
        parser.error("--ablation-oracle adds a control to the ablation: add --ablation")
    pre = resolve_preset(args)
    if pre.rater_model and pre.iterations == 2:  # iteration 2 exists to rate with M1; a fixed rater repeats iteration 1
        parser.error(f"--rater-model replaces the rater of every iteration, so iteration 2 would repeat iteration 1 "
                     f"(the {args.preset} preset has 2): add --iterations 1")
    from data.ablation import ablation_set, ablation_table
    from data.pairs import DataError, write_jsonl_atomic
    from data.stages import run_stage
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    if args.ablation and not pre.heldout:
        print("error: --ablation compares models on held-out pairs: give --heldout", file=sys.stderr)
        return 2
    stages = (STAGES[:7] + (ITERATION2 if pre.iterations == 2 else []) + (["evaluate"] if pre.heldout else [])
              + ([s for s in ABLATION if s != "ablate-oracle" or args.ablation_oracle] if args.ablation else []))
    for flag, name in ((args.from_stage, "--from"), (args.until, "--until")):
        if flag and flag not in stages:
            print(f"error: {name} {flag}: this run has no such stage (its stages: {', '.join(stages)})",
                  file=sys.stderr)
            return 2
    redo_from = stages.index(args.from_stage) if args.from_stage in stages else None
    last = stages.index(args.until) if args.until in stages else len(stages) - 1
    mflags = model_flags(pre, args.device)
    quiet = ["--no-progress"] if args.no_progress else []
    # The evaluation rates held-out pairs with the prompt curation used (same few-shot count);
    # the preset's and --eval-args' flags come after, so they can still change it.
    eval_flags = ["--k-shot", str(pre.k_shot)] + pre.evaluate
    (work / "preset.json").write_text(json.dumps(pre.__dict__, indent=2))

    def stage(i_name: str, config: dict, inputs: list[Path], body, at: str | None = None) -> Path:
        """Run stage ``i_name`` (cached); ``at``: the stage of STAGES it belongs to (extra draws)."""
        i = stages.index(at or i_name)
        redo = redo_from is not None and i >= redo_from
        d, _ = run_stage(i_name, work, config, [str(x) for x in inputs], body, redo=redo)
        return d

    def train_argv(data: Path, d: Path, direction: str = "forward", tag: str = "seed", flags: list[str] = pre.train,
                   seed: int = args.seed) -> list[str]:
        return mflags + ["--data", str(data), "--direction", direction, "--tag", tag, "--out", str(d),
                         "--seed", str(seed), "--resume"] + flags + quiet

    def train(argv: list[str]) -> list[str]:
        """train.py with ``argv`` (from train_argv); returns the files the stage promises."""
        call("train", argv)
        return ["adapter/adapter_model.safetensors", "adapter/adapter_config.json"]

    def evaluate(models: list[str], d: Path) -> None:
        """evaluate.py on the held-out pairs, into stage folder ``d``."""
        call("evaluate", mflags + models + ["--heldout", pre.heldout, "--out", str(d), "--seed", str(args.seed)]
             + eval_flags + quiet)

    def train_stage(name: str, data: Path, direction: str, tag: str) -> Path:
        def body(d: Path) -> list[str]:
            return train(train_argv(data, d, direction, tag))
        return stage(name, {"model": pre.model, "quantize": pre.quantize, "direction": direction, "tag": tag,
                            "train": pre.train, "seed": args.seed}, [data], body) / "adapter"

    def curate_stage(name: str, rater: Path, augmented: Path) -> Path:
        """Rate with adapter ``rater`` (M0, or M1 in iteration 2) on the base, or with --rater-model alone."""
        who = model_flags(pre, args.device, pre.rater_model) if pre.rater_model else mflags + ["--adapter", str(rater)]

        def body(d: Path) -> list[str]:
            call("curate", who + ["--pairs", str(augmented), "--out", str(d / "rated.jsonl"),
                                  "--curated", str(d / "curated.jsonl"), "--threshold", str(pre.threshold),
                                  "--k-shot", str(pre.k_shot), "--seed", str(args.seed)] + pre.curate + quiet)
            return ["rated.jsonl", "curated.jsonl"]
        config = {"model": pre.model, "threshold": pre.threshold, "k_shot": pre.k_shot, "curate": pre.curate}
        if pre.rater_model:  # absent by default: older runs stay cached
            config |= {"rater_model": pre.rater_model, "rater_quantize": pre.quantize}
        return stage(name, config, [augmented] if pre.rater_model else [rater, augmented], body)

    def respond_stage(name: str, adapter: Path, tests: Path) -> Path:
        def body(d: Path) -> list[str]:
            call("generate", mflags + ["--adapter", str(adapter), "--predict", str(tests), "--out",
                                       str(d / "responses.csv"), "--seed", str(args.seed)] + pre.respond + quiet)
            show_responses(d / "responses.csv")
            return ["responses.csv"]
        return stage(name, {"model": pre.model, "respond": pre.respond, "seed": args.seed}, [adapter, tests], body)

    try:
        data_dir = stage("data", {"seed_data": pre.seed_data, "unlabelled": pre.unlabelled,
                                  "test_prompts": pre.test_prompts, "n_seed": pre.n_seed,
                                  "n_unlabelled": pre.n_unlabelled, "n_test": pre.n_test, "seed": args.seed},
                         [], lambda d: prepare_data(pre, args.seed, d))
        seed_file, texts, tests = data_dir / "seed.jsonl", data_dir / "unlabelled.jsonl", data_dir / "test_prompts.jsonl"
        if last >= 1:
            backward = train_stage("backward", seed_file, "backward", "none")
        if last >= 2:
            m0 = train_stage("m0", seed_file, "forward", "seed")
        if last >= 3:
            def augment_body(d: Path) -> list[str]:
                call("generate", mflags + ["--adapter", str(backward), "--unlabelled", str(texts), "--out",
                                           str(d / "augmented.jsonl"), "--seed", str(args.seed)] + pre.augment + quiet)
                return ["augmented.jsonl"]
            augmented = stage("augment", {"model": pre.model, "augment": pre.augment, "seed": args.seed},
                              [backward, texts], augment_body) / "augmented.jsonl"
        rater, curated_dirs, forward_adapters = m0 if last >= 2 else None, [], []
        for it in range(1, pre.iterations + 1):
            suffix = "" if it == 1 else "2"
            if last < stages.index("curate" + suffix):
                break
            cdir = curate_stage("curate" + suffix, rater, augmented)
            curated_dirs.append(cdir)
            if last < stages.index("forward" + suffix):
                break
            fname = "forward" + suffix

            def fbody(d: Path, cdir=cdir) -> list[str]:
                out = forward_training_set(pre, seed_file, cdir / "curated.jsonl", d / "data")
                return train(train_argv(d / "data" / out[0], d))
            fdir = stage(fname, {"model": pre.model, "quantize": pre.quantize, "forward_data": pre.forward_data,
                                 "train": pre.train, "seed": args.seed}, [seed_file, cdir / "curated.jsonl"], fbody)
            forward_adapters.append(fdir / "adapter")
            rater = fdir / "adapter"  # iteration 2 curates with M1 (the paper's M1 -> M2 step)
            if last >= stages.index("respond" + suffix):
                respond_stage("respond" + suffix, fdir / "adapter", tests)
        if "evaluate" in stages and last >= stages.index("evaluate"):
            def eval_body(d: Path) -> list[str]:
                rates = ["--rater", "base", "--rater-model", pre.rater_model] if pre.rater_model \
                    else ["--rater", str(m0)]
                evaluate(["--backward", str(backward)] + rates
                         + [x for a in [m0, *forward_adapters] for x in ("--forward", str(a))], d)
                return ["eval.json", "eval.md"]
            config = {"model": pre.model, "heldout": pre.heldout, "evaluate": eval_flags, "seed": args.seed}
            if pre.rater_model:
                config["rater_model"] = pre.rater_model
            stage("evaluate", config, [backward, m0, *forward_adapters, *heldout_files(pre.heldout)], eval_body)
        if args.ablation and last >= stages.index("ablate-curated"):
            # The paper's quality-vs-quantity ablation (its section 4.3, in miniature): forward models
            # trained the same way on different pairs, each prompted with the seed tag line, compared on
            # the held-out pairs, with M0 as the seed-only model (d). M0 is reused as the m0 stage
            # trained it, so --ablation-train-args (e.g. more epochs for the small sets) do not apply to it.
            ablation_train = pre.train + shlex.split(args.ablation_train_args)
            curated = curated_dirs[0] / "curated.jsonl"
            adapters = []
            # (b) once per draw k = 0 .. K-1 (stages ablate-random, ablate-random-2, ...):
            # sample and training seed SEED + k
            runs = [("curated", "ablate-curated", 0)] + \
                [("random", "ablate-random" + (f"-{k + 1}" if k else ""), k) for k in range(args.ablation_draws)] + \
                ([("oracle", "ablate-oracle", 0)] if args.ablation_oracle else []) + [("all", "ablate-all", 0)]
            for which, name, k in runs:
                if last < stages.index(f"ablate-{which}"):
                    break

                def abody(d: Path, which=which, name=name, k=k) -> list[str]:
                    argv = train_argv(d / "data" / "train.jsonl", d, flags=ablation_train, seed=args.seed + k)
                    # "tokens": counted as this very training will count them (template, tag, --max-len)
                    count = answer_tokens(argv) if which in ("random", "oracle") and args.ablation_match == "tokens" \
                        else None
                    rows = ablation_set(which, augmented, curated, args.seed + k, count, source=args.ablation_oracle)
                    write_jsonl_atomic(d / "data" / "train.jsonl", rows)
                    print(f"{name}: {len(rows)} training pairs")
                    return train(argv)
                # (c) does not depend on curation: changing the rater must not retrain it
                inputs = [augmented] if which == "all" else [augmented, curated]
                config = {"model": pre.model, "quantize": pre.quantize, "set": which, "train": ablation_train,
                          "seed": args.seed + k}
                # absent by default: older runs stay cached
                if which in ("random", "oracle") and args.ablation_match != "pairs":
                    config["match"] = args.ablation_match
                if which == "oracle":
                    config["source"] = args.ablation_oracle
                adir = stage(name, config, inputs, abody, at=f"ablate-{which}")
                adapters.append(adir / "adapter")
            if last >= stages.index("ablation"):
                adapters.append(m0)  # (d) seed only: M0 is exactly that model

                def ablation_body(d: Path) -> list[str]:
                    evaluate([x for a in adapters for x in ("--forward", str(a))], d)
                    (d / "ablation.md").write_text(ablation_table(d / "eval.json", adapters, seed_file,
                                                                   args.ablation_match, args.ablation_oracle))
                    print((d / "ablation.md").read_text())
                    return ["eval.json", "eval.md", "ablation.md"]
                config = {"model": pre.model, "heldout": pre.heldout, "evaluate": eval_flags, "seed": args.seed}
                if args.ablation_match != "pairs":  # its wording changes even if no adapter does
                    config["match"] = args.ablation_match
                stage("ablation", config, [*adapters, *heldout_files(pre.heldout)], ablation_body)
        if args.push_to_hub and forward_adapters:
            push(args.push_to_hub, pre, work, forward_adapters, curated_dirs)
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\npipeline finished: {work}")
    return 0


def answer_tokens(train_argv: list[str]) -> Callable[[Any], int]:
    """How many answer tokens ``train.py TRAIN_ARGV`` would train one pair on: its model's
    tokenizer (loaded alone, not the model), its direction, tag and --max-len, read from the
    very flags the training gets (the pair's own tag wins, as in train.py)."""
    import train as train_script
    from data.batching import tokenize_pair
    from model.load import resolve_model_dir
    from model.tokenizer import load_tokenizer
    flags = train_script.build_parser().parse_args(train_argv)
    tok = load_tokenizer(resolve_model_dir(flags.model))

    def count(pair: Any) -> int:
        prompt, target = train_script.to_examples([pair], flags.direction, flags.tag)[0]
        return tokenize_pair(tok, prompt, target, flags.max_len).target_tokens
    return count


def heldout_files(spec: str) -> list[Path]:
    """The held-out spec's local file, if it is one, so that editing it re-runs the evaluations."""
    from data.readers import split_spec
    path = Path(split_spec(spec)[1]).expanduser()
    return [path] if path.is_file() else []


def push(prefix: str, pre: Preset, work: Path, adapters: list[Path], curated_dirs: list[Path]) -> None:
    """Publish the forward adapters and the last curated set; upload folders first, then the hub."""
    from data.curate import histogram, read_rated
    from data.publish import PushError, publish_adapter, publish_dataset
    errors = []
    for i, adapter in enumerate(adapters, start=1):
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        info = dict(base_model=pre.model, direction="forward", tag=cfg.get("tag", "seed"),
                    data=f"{pre.seed_data} + curated {' + '.join(pre.unlabelled)}", precision=pre.quantize or "bf16")
        try:
            publish_adapter(adapter, f"{prefix}-m{i}", info, work / "hub" / f"m{i}")
        except PushError as e:
            errors.append(str(e))
    cdir = curated_dirs[-1]
    rows = read_rated(cdir / "rated.jsonl")
    info = dict(unlabelled=" + ".join(pre.unlabelled), backward_model=f"{pre.model} + backward LoRA",
                rater=pre.rater_model or ("seed model M0" if len(curated_dirs) == 1 else "M1 (iteration 2)"),
                threshold=pre.threshold, rated=len(rows), histogram=histogram(rows),
                kept=sum(1 for _ in open(cdir / "curated.jsonl")))
    try:
        publish_dataset(cdir / "curated.jsonl", f"{prefix}-curated", info, work / "hub" / "curated")
    except PushError as e:
        errors.append(str(e))
    if errors:
        raise StageFailed("; ".join(errors))


if __name__ == "__main__":
    sys.exit(main())
