#!/usr/bin/env python
"""Generate text with a Llama checkpoint (our model, our KV-cached sampler), in three modes.

    # 1. complete prompts and print them
    python generate.py --prompt "The capital of France is Paris. The capital of Germany is"
    python generate.py --model meta-llama/Llama-2-7b-hf --quantize nf4 --prompt "..." --temperature 0.7 --top-p 0.9

    # 2. self-augmentation: the backward model writes an instruction for each unlabelled text
    python generate.py --model BASE --adapter runs/backward/adapter --unlabelled lima:GAIR/lima \\
        --n 150 --seed 0 --out augmented.jsonl [--shard 0/4]

    # 3. predictions: the (forward) model answers a test set, written as CSV id,instruction,output
    python generate.py --model BASE --adapter runs/forward/adapter --predict test.csv --out predictions.csv

Self-augmentation appends to --out batch by batch; run the same command again after an
interruption and it continues where it stopped (see data/augment.py).

Self-augmentation on several GPUs (or CPU processes): the same command under torchrun. Rank r
takes every N-th batch of texts and appends to its own part file (augmented.jsonl ->
augmented.rank{r}-of-{N}.jsonl, resumable like OUT); at the end rank 0 merges the parts into
OUT in input order:

    torchrun --nproc_per_node 8 generate.py --model BASE --adapter runs/backward/adapter \\
        --unlabelled web:FILE --out augmented.jsonl
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import zlib
from collections import Counter
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

# Defaults per mode: (max_new_tokens, temperature, top_p). The paper samples with
# T = 0.7, p = 0.9; plain prompting stays greedy so the demo output is repeatable.
MODE_DEFAULTS = {"prompt": (64, 0.0, 1.0), "augment": (64, 0.7, 0.9), "predict": (512, 0.7, 0.9)}


class UsageError(ValueError):
    """A bad combination of flags or a missing file: printed as one ``error:`` line."""


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The flags that say which model to load (shared with curate.py)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2-135m-instruct",
                   help="base model: folder, hub repo id, or 'smollm2-135m-instruct' (the embedded default)")
    g.add_argument("--adapter", default=None,
                   help="LoRA adapter folder (PEFT format, e.g. runs/backward/adapter from train.py) loaded on top")
    g.add_argument("--quantize", choices=["nf4"], default=None, help="load block linears as 4-bit NF4 (bitsandbytes)")
    g.add_argument("--dtype", default=None,
                   help="bf16 / fp32 / fp16 (default: bf16 on a GPU, with nf4, or on a CPU with native bf16 "
                        "(AVX512-BF16/AMX); else fp32)")
    g.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_argument_group("mode (give one)")
    mode.add_argument("--prompt", action="append", default=None,
                      help="prompt text; repeat the flag to generate for several prompts in one batch")
    mode.add_argument("--unlabelled", default=None,
                      help="self-augmentation source: unlabelled texts (any data.readers spec; labelled data such "
                           "as 'lima:GAIR/lima' loses its instructions). Default lima:GAIR/lima when --out is "
                           "given without --prompt/--predict")
    mode.add_argument("--predict", default=None,
                      help="test set to answer (homework CSV id,instruction,output, or any spec with instructions); "
                           "writes --out as CSV id,instruction,output")
    add_model_flags(p)
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate per prompt (default: 64 for --prompt and self-augmentation, "
                        "512 for --predict)")
    g.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default 0 for --prompt, else 0.7 as in the paper")
    g.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling mass; default 1.0 for --prompt, else 0.9 as in the paper")
    g.add_argument("--stop", action="append", default=None, help="extra stop string (repeatable); cut from the output")
    g.add_argument("--seed", type=int, default=0, help="sampling seed, and the --n sample's seed (default 0)")
    g.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")
    add_compile_flag(g)
    g = p.add_argument_group("self-augmentation and predictions")
    g.add_argument("--out", default=None,
                   help="output file: JSONL of generated pairs (appended to, resumable) or, with --predict, CSV")
    g.add_argument("--n", "--n-texts", type=int, default=None, dest="n",
                   help="use a seeded random sample of N texts (default: all); spell it --n-texts under torchrun, "
                        "whose own parser takes --n for an abbreviation of its flags")
    g.add_argument("--shard", default=None,
                   help="i/n: process only every n-th text from position i (run n shards with separate --out files)")
    g.add_argument("--tag", choices=["auto", "seed", "augmented", "none"], default="auto",
                   help="--predict only: the tag line before each instruction; auto = 'seed' (assistant style, as the "
                        "paper does at inference) if the adapter was trained with a tag, else none")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ------------------------------------------------------------------------ model loading


def adapter_settings(adapter: str | None) -> dict[str, Any]:
    """The adapter's adapter_config.json (train.py records direction and tag there), or {}."""
    if not adapter:
        return {}
    folder = Path(adapter)
    if not folder.is_dir():
        raise UsageError(f"--adapter {adapter}: no such folder (expected adapter_config.json + "
                         f"adapter_model.safetensors, as train.py writes to RUN/adapter)")
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise UsageError(f"--adapter {adapter}: no adapter_config.json in it")
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{config}: invalid JSON ({e.msg})") from None


def check_direction(settings: dict[str, Any], wanted: str, what: str) -> None:
    """Refuse an adapter trained in the other direction (a classic mix-up), when it says."""
    direction = settings.get("direction")
    if direction and direction != wanted:
        raise UsageError(f"the adapter was trained with --direction {direction}, but {what} needs the "
                         f"{wanted} model")


def resolve_tag(flag: str, settings: dict[str, Any]) -> str | None:
    """--tag auto: the assistant tag if the adapter learned tags, else no tag line."""
    if flag != "auto":
        return None if flag == "none" else flag
    return "seed" if settings.get("tag") not in (None, "none") else None


def add_compile_flag(group) -> None:
    group.add_argument("--compile", action="store_true",
                       help="compile the decode step (model/compiled.py): about a minute of compiling per batch "
                            "size, then ~2x faster decoding on CPU; the adapter is merged into the weights first "
                            "(bf16/fp32 bases; an NF4 base runs eagerly). Merging into bf16 weights rounds the "
                            "update, so outputs can differ slightly from an unmerged run")


def load_for_inference(args: argparse.Namespace):
    """(model, tokenizer) from --model/--quantize/--dtype/--device, with --adapter on top."""
    from model import load_model
    from model.load import native_bf16, pick_device
    adapter_settings(args.adapter)  # a missing or broken adapter fails before the slow part
    t0 = time.perf_counter()
    # bf16 wherever it is fast: inference needs no fp32 master weights, and on a CPU with native
    # bf16 it is ~2.5x faster (measured: a batch of 8 rating prompts, 8.3 s vs 20.2 s to prefill).
    dtype = args.dtype or ("bf16" if native_bf16(pick_device(args.device)) else None)
    model, tok = load_model(args.model, quantize=args.quantize, dtype=dtype, device=args.device)
    if args.adapter:
        from lora.adapter import load_adapter  # lazy: plain prompting needs no LoRA code
        load_adapter(model, args.adapter)
        model.eval()
        if getattr(args, "compile", False) and not args.quantize:
            # The compiled step takes plain linears: fold each LoRA update into its base weight.
            from lora.inject import unwrap_lora
            unwrap_lora(model, merge=True)
    if getattr(args, "compile", False):
        from model.compiled import supported
        if not supported(model):
            print("note: --compile needs a plain bf16/fp32 model on CPU or CUDA; decoding eagerly", file=sys.stderr)
    print(f"[loaded {args.model}{' + ' + args.adapter if args.adapter else ''} in {time.perf_counter() - t0:.1f}s]",
          file=sys.stderr)
    return model, tok


def batch_seed(seed: int, prompts: list[str]) -> int:
    """A sampling seed for one batch, from the run's seed and the batch's prompts.

    Seeding each batch by its content (not by its position in the run) means a resumed
    run samples exactly what an uninterrupted one would have for the same batch.
    """
    return (seed * 1_000_003 + zlib.crc32("\x1e".join(prompts).encode("utf-8"))) % 2**31


# Under torchrun, a rank that finishes its shard early waits for the others at the end; with
# sampled lengths the shards can finish hours apart on a big run, so the wait may be long.
RANKS_WAIT = timedelta(hours=24)


def shard_flag(spec: str | None) -> tuple[int, int]:
    """``--shard i/n`` as (i, n), (0, 1) without it; a UsageError for a bad spec, or for --shard
    under torchrun (which shares the work out itself: see :func:`split_work`)."""
    from data.augment import parse_shard
    from lora import distributed
    if spec and distributed.launched_by_torchrun():
        raise UsageError("--shard splits the input by hand; under torchrun each process takes its share itself")
    try:
        return parse_shard(spec) if spec else (0, 1)
    except ValueError as e:
        raise UsageError(str(e)) from None


def split_work(items: list, out: str, batch_size: int, i: int, n: int) -> tuple[list, Path, list[Path]]:
    """This process's share of ``items``, the file it appends to, and other files whose ids count as done.

    * under torchrun (N processes): rank r takes batches r, r + N, ... (whole batches, so each is
      one a single process would form) and appends to its part file (data.augment.part_path);
      :func:`merge_ranks` joins the parts at the end;
    * ``--shard i/n`` by hand: every n-th item from position i, to OUT (one OUT per shard);
    * otherwise: everything, to OUT.
    """
    from data.augment import done_elsewhere, part_path, shard, shard_batches
    from lora import distributed
    rank, world = distributed.rank(), distributed.world_size()
    if world > 1:
        part = part_path(out, rank, world)
        return shard_batches(items, batch_size, rank, world), part, done_elsewhere(out, part)
    return shard(items, i, n), Path(out), []


def add_counts(all_counts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several ranks' counts added up key by key (nested ones, like dropped_by_reason, too)."""
    total: dict[str, Any] = {}
    for counts in all_counts:
        for k, v in counts.items():
            if isinstance(v, dict):
                total[k] = dict(sorted((Counter(total.get(k, {})) + Counter(v)).items()))
            else:
                total[k] = total.get(k, 0) + v
    return total


def merge_ranks(out: str, order: list[str], counts: dict[str, Any]) -> dict[str, Any] | None:
    """Under torchrun: wait until every rank has finished its share, then rank 0 merges the part
    files into ``out`` in the input ``order`` (ids) and gets the counts added up over ranks; the
    other ranks get None (their work is done). Alone: ``counts`` as they are."""
    from data.augment import merge_parts
    from lora import distributed
    if distributed.world_size() == 1:
        return counts
    distributed.barrier()  # from here on, every part file is complete
    all_counts = distributed.gather_objects(counts)
    if not distributed.is_main():
        return None
    merge_parts(out, order)
    return add_counts(all_counts)


# The errors that mean "bad input" and are printed as one line, not a traceback: DataError,
# CheckpointError, AdapterError, TokenizerError and UsageError are all ValueErrors; a missing
# tokenizer file or an unwritable --out is an OSError.
INPUT_ERRORS = (ValueError, OSError)


# ----------------------------------------------------------------------------- modes


def run_prompts(args: argparse.Namespace) -> int:
    from model import generate
    model, tok = load_for_inference(args)
    t0 = time.perf_counter()
    outs = generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, stop=args.stop, seed=args.seed, batch_size=args.batch_size,
                    compile=args.compile)
    for prompt, out in zip(args.prompt, outs):
        print(prompt + out)
    print(f"[generated in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)
    return 0


def short(text: str, n: int = 100) -> str:
    """One line of at most n characters, for printing examples."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."


def run_augment(args: argparse.Namespace) -> int:
    from data.augment import AUGMENT_STOPS, augment, format_counts
    from data.pairs import DataError, as_unlabelled, read_pairs, sample
    from data.readers import format_stats, load_source
    from lora import distributed
    from model import generate

    spec = args.unlabelled or "lima:GAIR/lima"
    settings = adapter_settings(args.adapter)
    check_direction(settings, "backward", "self-augmentation (writing instructions for texts)")
    i, n = shard_flag(args.shard)
    pairs, stats = load_source(spec)
    print(format_stats(spec, stats))
    # Keep a labelled source's human instruction aside (LIMA's, say), to compare with the generated one.
    texts = [replace(u, meta={**u.meta, "human_instruction": p.instruction}) if p.instruction.strip() else u
             for p, u in zip(pairs, as_unlabelled(pairs)) if p.output.strip()]
    if not texts:
        raise DataError(f"{spec}: no texts to backtranslate")
    if args.n is not None:
        texts = sample(texts, args.n, args.seed)  # every shard draws the same sample, then splits it
    mine, out, done_files = split_work(texts, args.out, args.batch_size, i, n)
    world = distributed.world_size()
    print(f"{len(mine)} texts to backtranslate" + (f" (shard {i}/{n})" if n > 1 else "")
          + (f" (rank 0's share of {len(texts)}, over {world} processes)" if world > 1 else ""))

    args.device = distributed.device_for_rank(args.device)
    model, tok = load_for_inference(args)
    stop = list(AUGMENT_STOPS) + (args.stop or [])

    def complete(prompts: list[str]) -> list[str]:
        return generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, stop=stop, seed=batch_seed(args.seed, prompts),
                        batch_size=args.batch_size, compile=args.compile)

    counts = augment(mine, complete, out, batch_size=args.batch_size, done_files=done_files,
                     progress=not args.no_progress and distributed.is_main())
    counts = merge_ranks(args.out, [p.id for p in texts], counts)
    if counts is None:  # a rank other than 0: its part is written and merged
        return 0
    print(format_counts(counts))
    ours = {p.id for p in (texts if world > 1 else mine)}  # rank 0 has merged every rank's rows
    written = [p for p in read_pairs(args.out) if p.id in ours] if Path(args.out).is_file() else []
    print(f"\n{len(written)} pairs in {args.out}; {min(5, len(written))} examples:")
    for p in written[:5]:
        human = p.meta.get("human_instruction")
        human = f"\n  human's instruction: {short(human)}" if human else ""
        print(f"- [{p.id}] instruction: {short(p.instruction)}{human}\n  output: {short(p.output)}")
    return 0


def write_csv_atomic(path: str | Path, rows: list[dict[str, str]], columns: list[str]) -> None:
    """Write a CSV in one step (data.pairs.atomic_writer: temporary file, then rename)."""
    from data.pairs import atomic_writer
    with atomic_writer(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def run_predict(args: argparse.Namespace) -> int:
    from data.pairs import DataError
    from data.readers import format_stats, load_source
    from data.templates import forward_prompt
    from model import generate

    settings = adapter_settings(args.adapter)
    check_direction(settings, "forward", "--predict (answering instructions)")
    tag = resolve_tag(args.tag, settings)
    tests, stats = load_source(args.predict)
    print(format_stats(args.predict, stats))
    empty = [p.id for p in tests if not p.instruction.strip()]
    if empty:
        raise DataError(f"{args.predict}: {len(empty)} rows have no instruction (e.g. {empty[0]})")
    model, tok = load_for_inference(args)
    t0 = time.perf_counter()
    answers = generate(model, tok, [forward_prompt(p.instruction, tag) for p in tests],
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       stop=["\n### "] + (args.stop or []), seed=args.seed, batch_size=args.batch_size,
                       progress=not args.no_progress, compile=args.compile)
    rows = [{"id": p.id, "instruction": p.instruction, "output": a.strip()} for p, a in zip(tests, answers)]
    write_csv_atomic(args.out, rows, ["id", "instruction", "output"])
    print(f"{len(rows)} predictions written to {args.out} in {time.perf_counter() - t0:.1f}s (tag: {tag or 'none'})")
    for row in rows[:3]:
        print(f"- [{row['id']}] {short(row['instruction'])}\n  -> {short(row['output'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        modes = [m for m, on in (("prompt", args.prompt), ("predict", args.predict),
                                 ("augment", args.unlabelled or (args.out and not args.predict))) if on]
        if len(modes) != 1:
            raise UsageError("give exactly one of --prompt TEXT, --predict TEST --out CSV, "
                             "or --out JSONL [--unlabelled SPEC] (self-augmentation)")
        mode = modes[0]
        if mode != "prompt" and not args.out:
            raise UsageError(f"--{'predict' if mode == 'predict' else 'unlabelled'} needs --out")
        max_new, temperature, top_p = MODE_DEFAULTS[mode]
        args.max_new_tokens = max_new if args.max_new_tokens is None else args.max_new_tokens
        args.temperature = temperature if args.temperature is None else args.temperature
        args.top_p = top_p if args.top_p is None else args.top_p
        run = {"prompt": run_prompts, "augment": run_augment, "predict": run_predict}[mode]
        from lora import distributed
        if distributed.launched_by_torchrun() and mode != "augment":
            raise UsageError("under torchrun only self-augmentation is shared out; run --prompt and --predict "
                             "as one process")
        with distributed.session(backend="gloo", timeout=RANKS_WAIT):  # gloo: we only wait, never send tensors
            return run(args)
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
