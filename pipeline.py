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
The recipes are in humback/presets.py, the stage cache in humback/stages.py, the ablation's
stages in humback/ablation.py.
"""
from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path

from data.pairs import DataError, read_pairs, require_unique_ids, sample, write_jsonl_atomic
from data.readers import format_stats, load_source
from humback.ablation import ablation_stages
from humback.backtranslate import texts_to_backtranslate
from humback.cli import INPUT_ERRORS, fail
from humback.flags import check_pipeline_flags, pipeline_parser
from humback.pipeline_run import Run, StageFailed, UntilReached, call, heldout_files
from humback.presets import Preset, resolve_preset
from humback.publish import PushError, publish_run
from humback.rating import RATER_PROMPT_VERSION


def main(argv: list[str] | None = None) -> int:
    parser = pipeline_parser(__doc__)
    args = parser.parse_args(argv)
    pre = resolve_preset(args)
    check_pipeline_flags(parser, args, pre)  # combinations that cannot work: argparse's error, before any file
    try:
        run = Run.start(args, pre)
        forward, curated = instruction_backtranslation(run)
        if args.push_to_hub and forward:
            publish_run(args.push_to_hub, pre, run.work, forward, curated)
    except (StageFailed, PushError) as e:
        return fail(e, 1)
    except INPUT_ERRORS as e:
        return fail(e)
    print(f"\npipeline finished: {run.work}")
    return 0


def instruction_backtranslation(run: Run) -> tuple[list[Path], list[Path]]:
    """The method, one stage after another (until --until); returns the forward adapters (M1, and
    M2 in a second iteration) and the curate stages' folders."""
    forward: list[Path] = []
    curated: list[Path] = []
    try:
        seed, texts, tests = data_stage(run)
        backward = train_stage(run, "backward", seed, "backward", "none")  # p(instruction | output)
        m0 = train_stage(run, "m0", seed, "forward", "seed")  # the seed model M0: p(output | instruction)
        augmented = augment_stage(run, backward, texts)  # self-augmentation: an instruction per text
        rater = m0
        for suffix in ["", "2"][:run.pre.iterations]:
            curated.append(curate_stage(run, "curate" + suffix, rater, augmented))  # self-curation
            forward.append(forward_stage(run, "forward" + suffix, seed, curated[-1]))  # M1 (M2)
            respond_stage(run, "respond" + suffix, forward[-1], tests)
            rater = forward[-1]  # iteration 2 curates with M1 (the paper's M1 -> M2 step)
        if run.pre.heldout:
            evaluate_stage(run, backward, m0, forward)
        if run.args.ablation:
            ablation_stages(run, augmented, curated[0] / "curated.jsonl", m0, seed)
    except UntilReached:
        pass
    return forward, curated


# ------------------------------------------------------------------------------ the stages


def data_stage(run: Run) -> tuple[Path, Path, Path]:
    """data: the seed pairs, the unlabelled texts and the held-out prompts, frozen as JSONL files."""
    pre, seed = run.pre, run.args.seed
    config = {"seed_data": pre.seed_data, "unlabelled": pre.unlabelled, "test_prompts": pre.test_prompts,
              "n_seed": pre.n_seed, "n_unlabelled": pre.n_unlabelled, "n_test": pre.n_test, "seed": seed}
    d = run.stage("data", config, [], lambda d: prepare_data(pre, seed, d))
    return d / "seed.jsonl", d / "unlabelled.jsonl", d / "test_prompts.jsonl"


def prepare_data(pre: Preset, seed: int, stage_dir: Path) -> list[str]:
    """Read the three sources once and freeze them as JSONL files the later stages hash."""
    seed_pairs, stats = load_source(pre.seed_data)
    print(format_stats(pre.seed_data, stats))
    seed_pairs = [p for p in seed_pairs if p.instruction.strip() and p.output.strip()]
    if pre.n_seed:
        seed_pairs = sample(seed_pairs, pre.n_seed, seed)
    unlabelled = []
    for spec in pre.unlabelled:  # each source sampled on its own, so a big one cannot crowd out a small one
        texts, stats = load_source(spec)
        print(format_stats(spec, stats))
        texts = texts_to_backtranslate(texts)
        unlabelled += sample(texts, pre.n_unlabelled, seed) if pre.n_unlabelled else texts
    # checked here too, not only when augmenting: that stage runs after two trainings
    require_unique_ids(unlabelled, "the unlabelled texts of " + " + ".join(pre.unlabelled))
    tests, stats = load_source(pre.test_prompts)
    print(format_stats(pre.test_prompts, stats))
    tests = [p for p in tests if p.instruction.strip()][:pre.n_test]
    if not seed_pairs or not unlabelled or not tests:
        raise DataError("a source gave no usable rows: "
                        f"{len(seed_pairs)} seed pairs, {len(unlabelled)} texts, {len(tests)} prompts")
    write_jsonl_atomic(stage_dir / "seed.jsonl", [replace(p, meta={**p.meta, "tag": "seed"}) for p in seed_pairs])
    write_jsonl_atomic(stage_dir / "unlabelled.jsonl", unlabelled)
    write_jsonl_atomic(stage_dir / "test_prompts.jsonl", tests)
    print(f"{len(seed_pairs)} seed pairs, {len(unlabelled)} unlabelled texts, {len(tests)} held-out prompts")
    return ["seed.jsonl", "unlabelled.jsonl", "test_prompts.jsonl"]


def train_stage(run: Run, name: str, data: Path, direction: str, tag: str) -> Path:
    """backward, m0: a LoRA adapter trained on ``data`` (train.py); returns the adapter folder."""
    pre = run.pre
    config = {"model": pre.model, "quantize": pre.quantize, "direction": direction, "tag": tag, "train": pre.train,
              "seed": run.args.seed}
    return run.stage(name, config, [data], lambda d: run.train(run.train_argv(data, d, direction, tag))) / "adapter"


def augment_stage(run: Run, backward: Path, texts: Path) -> Path:
    """augment: the backward model writes an instruction for every text (generate.py --unlabelled)."""
    pre, seed = run.pre, run.args.seed

    def body(d: Path) -> list[str]:
        call("generate", run.model_flags() + ["--adapter", str(backward), "--unlabelled", str(texts), "--out",
                                              str(d / "augmented.jsonl"), "--seed", str(seed)] + pre.augment + run.quiet)
        return ["augmented.jsonl"]
    return run.stage("augment", {"model": pre.model, "augment": pre.augment, "seed": seed}, [backward, texts],
                     body) / "augmented.jsonl"


def curate_stage(run: Run, name: str, rater: Path, augmented: Path) -> Path:
    """curate: rate with adapter ``rater`` (M0, or M1 in iteration 2) on the base, or with
    --rater-model alone (curate.py); returns the stage folder (rated.jsonl, curated.jsonl)."""
    pre, seed = run.pre, run.args.seed
    who = run.model_flags(pre.rater_model) if pre.rater_model else run.model_flags() + ["--adapter", str(rater)]

    def body(d: Path) -> list[str]:
        call("curate", who + ["--pairs", str(augmented), "--out", str(d / "rated.jsonl"),
                              "--curated", str(d / "curated.jsonl"), "--threshold", str(pre.threshold),
                              "--k-shot", str(pre.k_shot), "--seed", str(seed)] + pre.curate + run.quiet)
        return ["rated.jsonl", "curated.jsonl"]
    config = {"model": pre.model, "threshold": pre.threshold, "k_shot": pre.k_shot, "curate": pre.curate}
    if pre.rater_model:  # absent by default: older runs stay cached (M0 reads the plain prompt, as ever)
        config |= {"rater_model": pre.rater_model, "rater_quantize": pre.quantize,
                   "rater_prompt": RATER_PROMPT_VERSION}
    return run.stage(name, config, [augmented] if pre.rater_model else [rater, augmented], body)


def forward_stage(run: Run, name: str, seed_file: Path, curated: Path) -> Path:
    """forward: M1 (M2) on the seed pairs and the curated ones (train.py); returns the adapter folder."""
    pre = run.pre

    def body(d: Path) -> list[str]:
        out = forward_training_set(pre, seed_file, curated / "curated.jsonl", d / "data")
        return run.train(run.train_argv(d / "data" / out[0], d))
    config = {"model": pre.model, "quantize": pre.quantize, "forward_data": pre.forward_data, "train": pre.train,
              "seed": run.args.seed}
    return run.stage(name, config, [seed_file, curated / "curated.jsonl"], body) / "adapter"


def forward_training_set(pre: Preset, seed_file: Path, curated_file: Path, out: Path) -> list[str]:
    """Seed pairs tagged "seed" + curated pairs tagged "augmented" (the paper's mix), or curated only."""
    curated = [replace(p, meta={**p.meta, "tag": "augmented"}) for p in read_pairs(curated_file)] \
        if curated_file.stat().st_size else []
    rows = (read_pairs(seed_file) if pre.forward_data == "seed+curated" else []) + curated
    if not rows:
        raise DataError(f"{curated_file}: no curated pairs to train on (lower --threshold, or use "
                        f"--forward-data seed+curated)")
    write_jsonl_atomic(out / "train.jsonl", rows)
    print(f"forward training set: {len(rows) - len(curated)} seed + {len(curated)} curated pairs")
    return ["train.jsonl"]


def respond_stage(run: Run, name: str, adapter: Path, tests: Path) -> None:
    """respond: the forward model answers the held-out prompts (generate.py --predict); 5 are printed."""
    pre, seed = run.pre, run.args.seed

    def body(d: Path) -> list[str]:
        call("generate", run.model_flags() + ["--adapter", str(adapter), "--predict", str(tests), "--out",
                                              str(d / "responses.csv"), "--seed", str(seed)] + pre.respond + run.quiet)
        show_responses(d / "responses.csv")
        return ["responses.csv"]
    run.stage(name, {"model": pre.model, "respond": pre.respond, "seed": seed}, [adapter, tests], body)


def show_responses(csv_path: Path, n: int = 5) -> None:
    """Print the first ``n`` answers of the respond stage."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    print(f"\n{min(n, len(rows))} example responses:")
    for r in rows[:n]:
        print(f"\n### Instruction: {r['instruction']}\n### Response: {r['output'][:600]}")


def evaluate_stage(run: Run, backward: Path, m0: Path, forward: list[Path]) -> None:
    """evaluate: every model on the held-out pairs against the base (evaluate.py)."""
    pre = run.pre

    def body(d: Path) -> list[str]:
        rates = ["--rater", "base", "--rater-model", pre.rater_model] if pre.rater_model else ["--rater", str(m0)]
        run.evaluate(["--backward", str(backward)] + rates + [x for a in [m0, *forward] for x in ("--forward", str(a))],
                     d)
        return ["eval.json", "eval.md"]
    # rater_prompt: the base's rater row reads the base's chat template when it has one
    config = {"model": pre.model, "heldout": pre.heldout, "evaluate": run.eval_flags, "seed": run.args.seed,
              "rater_prompt": RATER_PROMPT_VERSION}
    if pre.rater_model:
        config["rater_model"] = pre.rater_model
    run.stage("evaluate", config, [backward, m0, *forward, *heldout_files(pre.heldout)], body)


if __name__ == "__main__":
    sys.exit(main())
