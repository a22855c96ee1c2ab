"""``generate.py``'s three modes: complete prompts, self-augmentation, answer a test set.

Exactly one of the mode flags is given (argparse enforces it, :func:`humback.flags.generate_parser`):

* ``--prompt TEXT``: complete the prompts and print them (greedy by default, so repeatable);
* ``--unlabelled SPEC --out JSONL``: self-augmentation, step 1 of the method
  (:func:`humback.backtranslate.run`): the backward model writes an instruction per text;
* ``--predict TEST --out CSV``: the forward model answers each instruction of a test set
  (:func:`predict`), written as CSV ``id,instruction,output``.

Only self-augmentation is shared out under torchrun (:mod:`humback.sharding`).
"""
from __future__ import annotations

import argparse
import sys
import time

from data.csvfile import write_csv_atomic
from data.pairs import DataError
from data.readers import format_stats, load_source
from data.templates import HEADER_STOP, forward_prompt
from humback import backtranslate, inference
from humback.cli import INPUT_ERRORS, UsageError, fail, short
from humback.sharding import RANKS_WAIT

# Defaults per mode: (max_new_tokens, temperature, top_p). The paper samples with
# T = 0.7, p = 0.9; plain prompting stays greedy so the demo output is repeatable.
MODE_DEFAULTS = {"prompt": (64, 0.0, 1.0), "augment": (64, 0.7, 0.9), "predict": (512, 0.7, 0.9)}


def run(args: argparse.Namespace) -> int:
    """``generate.py``: the mode's defaults for the sampling flags not given, then the mode itself.
    Returns the exit code (2, with one ``error:`` line, for bad input)."""
    try:
        mode = "prompt" if args.prompt is not None else "predict" if args.predict is not None else "augment"
        if mode != "prompt" and not args.out:
            raise UsageError(f"--{'predict' if mode == 'predict' else 'unlabelled'} needs --out")
        max_new, temperature, top_p = MODE_DEFAULTS[mode]
        args.max_new_tokens = max_new if args.max_new_tokens is None else args.max_new_tokens
        args.temperature = temperature if args.temperature is None else args.temperature
        args.top_p = top_p if args.top_p is None else args.top_p
        from lora import distributed
        if distributed.launched_by_torchrun() and mode != "augment":
            raise UsageError("under torchrun only self-augmentation is shared out; run --prompt and --predict "
                             "as one process")
        command = {"prompt": complete_prompts, "augment": backtranslate.run, "predict": predict}[mode]
        with distributed.session(backend="gloo", timeout=RANKS_WAIT):  # gloo: we only wait, never send tensors
            return command(args)
    except INPUT_ERRORS as e:
        return fail(e)


def complete_prompts(args: argparse.Namespace) -> int:
    """``--prompt TEXT`` (repeatable): print each prompt followed by its completion."""
    from model import generate
    model, tok = inference.load_for_inference(args)
    t0 = time.perf_counter()
    outs = generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, stop=args.stop, seed=args.seed, batch_size=args.batch_size,
                    compile=args.compile)
    for prompt, out in zip(args.prompt, outs):
        print(prompt + out)
    print(f"[generated in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)
    return 0


def predict(args: argparse.Namespace) -> int:
    """``--predict TEST --out CSV``: the forward model (--adapter) answers every instruction of TEST,
    prompted as in training (with the seed tag line if it learned tags, see --tag)."""
    from model import generate
    settings = inference.adapter_settings(args.adapter)
    inference.check_direction(settings, "forward", "--predict (answering instructions)")
    tag = inference.resolve_tag(args.tag, settings)
    tests, stats = load_source(args.predict)
    print(format_stats(args.predict, stats))
    empty = [p.id for p in tests if not p.instruction.strip()]
    if empty:
        raise DataError(f"{args.predict}: {len(empty)} rows have no instruction (e.g. {empty[0]})")
    model, tok = inference.load_for_inference(args)
    t0 = time.perf_counter()
    answers = generate(model, tok, [forward_prompt(p.instruction, tag) for p in tests],
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       stop=[HEADER_STOP] + (args.stop or []), seed=args.seed, batch_size=args.batch_size,
                       progress=not args.no_progress, compile=args.compile)
    rows = [{"id": p.id, "instruction": p.instruction, "output": a.strip()} for p, a in zip(tests, answers)]
    write_csv_atomic(args.out, rows, ["id", "instruction", "output"])
    print(f"{len(rows)} predictions written to {args.out} in {time.perf_counter() - t0:.1f}s (tag: {tag or 'none'})")
    for row in rows[:3]:
        print(f"- [{row['id']}] {short(row['instruction'])}\n  -> {short(row['output'])}")
    return 0
