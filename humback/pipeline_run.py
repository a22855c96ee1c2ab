"""One ``pipeline.py`` run: its settings, its folder, which of its stages to run, and how a stage
runs one of the project's commands.

A stage is a folder of WORKDIR, cached by :func:`humback.stages.run_stage`. Most stages run one
command (``train.py``, ``generate.py``, ``curate.py``, ``evaluate.py``) in this process through
:func:`call`: the same parser and the same library function as the script, with the equivalent
command line printed first, so any stage can be rerun or changed by hand.
"""
from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from data.readers import split_spec
from humback import curation, evaluation, flags, generation, training
from humback.cli import UsageError
from humback.presets import Preset, stages_of
from humback.stages import run_stage

# The commands a stage can run: script name -> (the script's parser builder, its library function),
# the very two calls the script's own main() makes.
COMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable[[argparse.Namespace], int]]] = {
    "train": (flags.train_parser, training.run),
    "generate": (flags.generate_parser, generation.run),
    "curate": (flags.curate_parser, curation.run),
    "evaluate": (flags.evaluate_parser, evaluation.run),
}


class StageFailed(RuntimeError):
    """A command a stage ran did not succeed (its own error is printed above)."""


class UntilReached(Exception):
    """The next stage comes after ``--until``: the run stops there (not an error)."""


def call(command: str, argv: list[str]) -> None:
    """Run ``command``.py with ``argv`` in this process, printing the equivalent command line: the
    script's own parser reads ``argv`` and its library function does the work. StageFailed unless
    it succeeds (a flag the script rejects, or a --help among its flags, is a failed stage too)."""
    parser, run = COMMANDS[command]
    print("$ python " + command + ".py " + " ".join(shlex.quote(a) for a in argv), flush=True)
    try:
        rc = run(parser().parse_args(argv))
    except SystemExit as e:  # argparse rejected a flag (e.g. from --train-args), or --help: the stage made nothing
        rc = e.code or "0 before doing its work (a --help among its flags?)"
    if rc:
        raise StageFailed(f"{command}.py exited with status {rc}")


def heldout_files(spec: str) -> list[Path]:
    """The held-out spec's local file, if it is one, so that editing it re-runs the evaluations."""
    path = Path(split_spec(spec)[1]).expanduser()
    return [path] if path.is_file() else []


@dataclass
class Run:
    """A pipeline run: the flags, the resolved preset, WORKDIR, and this run's stages in order.

    Stages are run through :meth:`stage`, which skips the finished ones, redoes those from
    ``--from`` on, and stops the run (:class:`UntilReached`) at the first one after ``--until``.
    """

    args: argparse.Namespace
    pre: Preset
    work: Path
    stages: list[str]
    redo_from: int | None
    last: int

    @classmethod
    def start(cls, args: argparse.Namespace, pre: Preset) -> Run:
        """Make WORKDIR, check --from/--until against this run's stages, record the preset."""
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        if args.ablation and not pre.heldout:
            raise UsageError("--ablation compares models on held-out pairs: give --heldout")
        stages = stages_of(pre, args.ablation, args.ablation_oracle)
        for flag, name in ((args.from_stage, "--from"), (args.until, "--until")):
            if flag and flag not in stages:
                raise UsageError(f"{name} {flag}: this run has no such stage (its stages: {', '.join(stages)})")
        redo_from = stages.index(args.from_stage) if args.from_stage in stages else None
        last = stages.index(args.until) if args.until in stages else len(stages) - 1
        (work / "preset.json").write_text(json.dumps(pre.__dict__, indent=2))
        return cls(args, pre, work, stages, redo_from, last)

    def stage(self, name: str, config: dict, inputs: Sequence[Path], body: Callable[[Path], list[str]],
              at: str | None = None) -> Path:
        """Run stage ``name`` (cached: :func:`humback.stages.run_stage`) and return its folder.
        ``config`` and ``inputs`` decide whether a finished stage is still valid; ``body(folder)``
        does the work and returns the files it promises. ``at``: the stage of the list that
        ``name`` counts as (the ablation's extra random draws count as ``ablate-random``)."""
        i = self.stages.index(at or name)
        if i > self.last:
            raise UntilReached(name)
        redo = self.redo_from is not None and i >= self.redo_from
        folder, _ = run_stage(name, self.work, config, [str(x) for x in inputs], body, redo=redo)
        return folder

    # ------------------------------------------------------------- the commands' flags

    def model_flags(self, model: str | None = None) -> list[str]:
        """--model (``model``, default the preset's), --quantize and --device for our scripts."""
        flags = ["--model", model or self.pre.model]
        if self.pre.quantize:
            flags += ["--quantize", self.pre.quantize]
        if self.args.device:
            flags += ["--device", self.args.device]
        return flags

    @property
    def quiet(self) -> list[str]:
        """--no-progress for every command when the pipeline got it."""
        return ["--no-progress"] if self.args.no_progress else []

    @property
    def eval_flags(self) -> list[str]:
        """evaluate.py's flags: it rates held-out pairs with the prompt curation used (same few-shot
        count); the preset's and --eval-args' flags come after, so they can still change it."""
        return ["--k-shot", str(self.pre.k_shot)] + self.pre.evaluate

    def train_argv(self, data: Path, folder: Path, direction: str = "forward", tag: str = "seed",
                   flags: list[str] | None = None, seed: int | None = None) -> list[str]:
        """train.py's flags for training on ``data`` into ``folder`` (resumable: --resume)."""
        return self.model_flags() + ["--data", str(data), "--direction", direction, "--tag", tag,
                                     "--out", str(folder), "--seed", str(self.args.seed if seed is None else seed),
                                     "--resume"] + (self.pre.train if flags is None else flags) + self.quiet

    def train(self, argv: list[str]) -> list[str]:
        """train.py with ``argv`` (from :meth:`train_argv`); returns the files the stage promises."""
        call("train", argv)
        return ["adapter/adapter_model.safetensors", "adapter/adapter_config.json"]

    def evaluate(self, models: list[str], folder: Path) -> None:
        """evaluate.py on the held-out pairs, for ``models`` (its --backward/--rater/--forward flags)."""
        call("evaluate", self.model_flags() + models + ["--heldout", self.pre.heldout, "--out", str(folder),
                                                        "--seed", str(self.args.seed)] + self.eval_flags + self.quiet)
