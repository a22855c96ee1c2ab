"""Training a model of the method (``train.py``): the backward model, the seed model M0, M1 and M2.

All of them are the same thing: LoRA on the base, fine-tuned on (instruction, output) pairs.
What differs is which way round a pair is read and which tag line comes first:

* the **backward model** p(instruction | output) reads each seed pair the other way round
  (:func:`data.templates.backward_example`): it learns to write the instruction an answer answers;
* the **forward models** p(output | instruction) read them as usual
  (:func:`data.templates.forward_example`), with the paper's tag line: "seed" (assistant style)
  on the human-written pairs, "augmented" (web style) on the curated ones. A pair's own
  ``meta.tag`` wins over --tag, so one model trains on both at once (M1 and M2).

This module turns the flags into that: it reads the pairs (:func:`load_pairs`), makes the
(prompt, target) examples (:func:`to_examples`), loads the base and hands everything to the
training loop, :func:`lora.finetune.train` (which injects LoRA, trains and writes the adapter).
"""
from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from data.pairs import DataError, Pair
from data.readers import format_stats, load_source
from data.templates import backward_example, forward_example
from humback.cli import INPUT_ERRORS, fail
from humback.flags import train_parser
from humback.publish import PushError, publish_adapter

if TYPE_CHECKING:  # only for the type hints: importing lora loads torch
    from lora.finetune import TrainConfig


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`lora.finetune.TrainConfig` of train.py's flags: --qlora's recipe for the LoRA
    settings and learning rate that were not given, the defaults for the rest."""
    from lora.finetune import QLORA_RECIPE, TrainConfig
    defaults = TrainConfig()
    recipe = dict(QLORA_RECIPE) if args.qlora else {}

    def pick(name: str, default: Any) -> Any:
        v = getattr(args, name)
        return v if v is not None else recipe.get(name, default)
    targets = args.targets.split(",") if args.targets else list(recipe.get("targets", defaults.targets))
    return TrainConfig(out_dir=args.out, r=pick("r", defaults.r), alpha=pick("alpha", defaults.alpha),
                       dropout=pick("dropout", defaults.dropout), targets=targets, lr=pick("lr", defaults.lr),
                       weight_decay=args.weight_decay, epochs=args.epochs, max_steps=args.max_steps,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, max_len=args.max_len,
                       warmup_steps=args.warmup_steps, schedule=args.schedule, clip=args.clip,
                       eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
                       autocast=not args.no_autocast, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
                       base_model=args.model,
                       extra={"direction": args.direction, "tag": args.tag, "data": args.data,
                              "quantize": args.quantize})


def pair_tag(pair: Pair, default: str | None) -> str | None:
    """A pair's own tag (``meta.tag``, as the pipeline writes for seed vs augmented data) wins over
    --tag: the paper trains one model on both, each pair tagged by where it came from."""
    tag = pair.meta.get("tag", default)
    return None if tag in (None, "none") else tag


def to_examples(pairs: list[Pair], direction: str, tag: str | None) -> list[tuple[str, str]]:
    """(prompt, target) per pair: the loss covers the target only (the output, or, backward, the instruction)."""
    if direction == "backward":
        return [tuple(backward_example(p.instruction, p.output)) for p in pairs]
    return [tuple(forward_example(p.instruction, p.output, pair_tag(p, tag))) for p in pairs]


def load_pairs(spec: str) -> list[Pair]:
    """The pairs of ``spec`` (any data.readers spec), each with an instruction and an output."""
    pairs, stats = load_source(spec)
    print(format_stats(spec, stats))
    for i, p in enumerate(pairs):
        if not p.instruction.strip() or not p.output.strip():
            which = "instruction" if not p.instruction.strip() else "output"
            raise DataError(f"{spec}: pair {i + 1} (id {p.id}) has an empty {which}; training needs both")
    if not pairs:
        raise DataError(f"{spec}: no pairs to train on")
    return pairs


def answer_tokens(train_argv: list[str]) -> Callable[[Any], int]:
    """How many answer tokens ``train.py TRAIN_ARGV`` would train one pair on: its model's
    tokenizer (loaded alone, not the model), its direction, tag and --max-len, read from the
    very flags the training gets (the pair's own tag wins, as in training)."""
    from data.batching import tokenize_pair
    from model.load import resolve_model_dir
    from model.tokenizer import load_tokenizer
    flags = train_parser().parse_args(train_argv)
    tok = load_tokenizer(resolve_model_dir(flags.model))

    def count(pair: Any) -> int:
        prompt, target = to_examples([pair], flags.direction, flags.tag)[0]
        return tokenize_pair(tok, prompt, target, flags.max_len).target_tokens
    return count


def run(args: argparse.Namespace) -> int:
    """``train.py``: train the LoRA adapter the flags describe (under torchrun, data-parallel over
    the processes), write it to OUT/adapter, and push it with --push-to-hub. Returns the exit code."""
    from lora import distributed
    backend = "gloo" if args.device == "cpu" else None  # None: NCCL when there are GPUs (it needs them)
    with distributed.session(backend):  # joins the other processes when started by torchrun; else nothing
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    from lora import distributed
    from lora.finetune import TrainingDiverged, train, training_dtype
    from model import load_model
    cfg = config_from_args(args)
    tag = None if args.tag == "none" else args.tag
    try:
        pairs = load_pairs(args.data)
        if args.direction == "forward":  # record the tags really used (per-pair tags may mix)
            used = sorted({pair_tag(p, tag) or "none" for p in pairs})
            cfg.extra["tag"] = used[0] if len(used) == 1 else "+".join(used)
        if args.eval_data:
            train_pairs, eval_pairs = pairs, load_pairs(args.eval_data)
        else:
            shuffled = pairs[:]
            random.Random(args.seed).shuffle(shuffled)
            n_eval = int(len(pairs) * args.eval_frac)
            eval_pairs, train_pairs = shuffled[:n_eval], shuffled[n_eval:]
        device = distributed.device_for_rank(args.device)
        model, tok = load_model(args.model, quantize=args.quantize, dtype=training_dtype(args.dtype, device),
                                device=device)
        summary = train(model, tok, to_examples(train_pairs, args.direction, tag), cfg,
                        to_examples(eval_pairs, args.direction, tag), resume=args.resume,
                        progress=not args.no_progress)
    except (*INPUT_ERRORS, TrainingDiverged) as e:
        return fail(e)
    print(f"adapter written to {summary['adapter']} (final loss {summary['final_loss']}, eval loss {summary['eval_loss']})")
    if args.push_to_hub and distributed.is_main():
        info = dict(cfg.extra, base_model=args.model, examples=summary["examples"], steps=summary["steps"],
                    precision=f"{args.quantize or summary['dtype']} base, fp32 LoRA",
                    final_loss=summary["final_loss"], eval_loss=summary["eval_loss"])
        try:
            publish_adapter(summary["adapter"], args.push_to_hub, info, f"{args.out}/hub-upload")
        except PushError as e:
            return fail(e, 1)
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")
    return 0
