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

import argparse
import random
import sys

from lora import distributed
from lora.finetune import QLORA_RECIPE, TrainConfig

DEFAULTS = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="training pairs: a JSONL of {instruction, output} (or any "
                   "'kind:path' spec data.readers understands, e.g. guanaco:FILE)")
    g.add_argument("--direction", choices=["forward", "backward"], default="forward",
                   help="forward: learn output given instruction; backward: learn instruction given output")
    g.add_argument("--tag", choices=["seed", "augmented", "none"], default="none",
                   help="forward only: the paper's tag line before the instruction (seed = 'Answer in the style "
                        "of an AI Assistant.', augmented = 'Answer with knowledge from web search.'); a pair's "
                        "own meta.tag, when present, wins")
    g.add_argument("--eval-data", default=None, help="held-out pairs for the eval loss (default: --eval-frac of --data)")
    g.add_argument("--eval-frac", type=float, default=0.05, help="share of --data held out when no --eval-data (default 0.05)")
    g.add_argument("--max-len", type=int, default=DEFAULTS.max_len,
                   help=f"tokens per example; longer ones are truncated keeping >= half for the target (default {DEFAULTS.max_len})")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2-135m-instruct", help="base model: folder, hub id, or smollm2-135m-instruct")
    g.add_argument("--quantize", choices=["nf4"], default=None, help="4-bit NF4 base (QLoRA)")
    g.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="what the base is loaded in and autocast computes in; LoRA weights and AdamW stay fp32. "
                        "Default: bf16, or fp16 on a GPU without bf16 (T4, V100). fp16 adds dynamic loss scaling "
                        "(a step whose gradients overflow is skipped); fp32: no autocast")
    g.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    g = p.add_argument_group("LoRA (defaults: r=8, alpha=32, dropout=0.05 on q/k/v/o; --qlora: r=64, alpha=16, all linears, lr 2e-4)")
    g.add_argument("--qlora", action="store_true", help="use the QLoRA recipe for r/alpha/targets/lr (explicit flags still win)")
    g.add_argument("--r", "--lora-r", type=int, default=None, dest="r",
                   help=f"LoRA rank (default {DEFAULTS.r}); spell it --lora-r under torchrun, whose own parser "
                        "takes --r for an abbreviation of its flags")
    g.add_argument("--alpha", type=float, default=None, help=f"LoRA alpha; the update is scaled by alpha/r (default {DEFAULTS.alpha})")
    g.add_argument("--dropout", type=float, default=None, help=f"dropout on the LoRA input (default {DEFAULTS.dropout})")
    g.add_argument("--targets", default=None, help="comma-separated projections to adapt (q_proj,k_proj,v_proj,o_proj,"
                   "gate_proj,up_proj,down_proj) or all-linear (default q,k,v,o)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {DEFAULTS.lr})")
    g.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help=f"passes over the data (default {DEFAULTS.epochs})")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help=f"examples per micro-batch (default {DEFAULTS.batch_size})")
    g.add_argument("--grad-accum", type=int, default=DEFAULTS.grad_accum, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--warmup-steps", type=int, default=DEFAULTS.warmup_steps, help=f"linear warmup steps (default {DEFAULTS.warmup_steps})")
    g.add_argument("--schedule", choices=["cosine", "linear"], default=DEFAULTS.schedule, help="decay after warmup (default cosine)")
    g.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="AdamW weight decay (default 0)")
    g.add_argument("--clip", type=float, default=DEFAULTS.clip, help="gradient-norm clipping (default 1.0)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    g.add_argument("--no-autocast", action="store_true", help="disable autocast (on by default where supported)")
    g.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed for LoRA init, data order, dropout (default 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=DEFAULTS.out_dir, help=f"run folder (default {DEFAULTS.out_dir})")
    g.add_argument("--eval-every", type=int, default=DEFAULTS.eval_every, help="eval loss every N steps (0 = only at the end)")
    g.add_argument("--save-every", type=int, default=DEFAULTS.save_every, help="checkpoint every N steps (0 = never)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--push-to-hub", metavar="OWNER/NAME", default=None,
                   help="after training, push the adapter + a model card to this hub repo (token from HF_TOKEN "
                        "or the login cache); the upload folder is written to OUT/hub-upload first")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    recipe = dict(QLORA_RECIPE) if args.qlora else {}

    def pick(name, default):
        v = getattr(args, name)
        return v if v is not None else recipe.get(name, default)
    targets = args.targets.split(",") if args.targets else list(recipe.get("targets", DEFAULTS.targets))
    return TrainConfig(out_dir=args.out, r=pick("r", DEFAULTS.r), alpha=pick("alpha", DEFAULTS.alpha),
                       dropout=pick("dropout", DEFAULTS.dropout), targets=targets, lr=pick("lr", DEFAULTS.lr),
                       weight_decay=args.weight_decay, epochs=args.epochs, max_steps=args.max_steps,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, max_len=args.max_len,
                       warmup_steps=args.warmup_steps, schedule=args.schedule, clip=args.clip,
                       eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
                       autocast=not args.no_autocast, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
                       base_model=args.model,
                       extra={"direction": args.direction, "tag": args.tag, "data": args.data,
                              "quantize": args.quantize})


def pair_tag(pair, default: str | None) -> str | None:
    """A pair's own tag (``meta.tag``, as the pipeline writes for seed vs augmented data) wins over
    --tag: the paper trains one model on both, each pair tagged by where it came from."""
    tag = pair.meta.get("tag", default)
    return None if tag in (None, "none") else tag


def to_examples(pairs, direction: str, tag: str | None) -> list[tuple[str, str]]:
    from data.templates import backward_example, forward_example
    if direction == "backward":
        return [tuple(backward_example(p.instruction, p.output)) for p in pairs]
    return [tuple(forward_example(p.instruction, p.output, pair_tag(p, tag))) for p in pairs]


def load_pairs(spec: str) -> list:
    from data.pairs import DataError
    from data.readers import format_stats, load_source
    pairs, stats = load_source(spec)
    print(format_stats(spec, stats))
    for i, p in enumerate(pairs):
        if not p.instruction.strip() or not p.output.strip():
            which = "instruction" if not p.instruction.strip() else "output"
            raise DataError(f"{spec}: pair {i + 1} (id {p.id}) has an empty {which}; training needs both")
    if not pairs:
        raise DataError(f"{spec}: no pairs to train on")
    return pairs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    backend = "gloo" if args.device == "cpu" else None  # None: NCCL when there are GPUs (it needs them)
    with distributed.session(backend):  # joins the other processes when started by torchrun; else nothing
        return run(args)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from data.pairs import DataError
    from lora.finetune import TrainingDiverged, train, training_dtype
    from model import load_model
    from model.load import CheckpointError
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
    except (DataError, CheckpointError, TrainingDiverged, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"adapter written to {summary['adapter']} (final loss {summary['final_loss']}, eval loss {summary['eval_loss']})")
    if args.push_to_hub and distributed.is_main():
        from data.publish import PushError, publish_adapter
        info = dict(cfg.extra, base_model=args.model, examples=summary["examples"], steps=summary["steps"],
                    precision=f"{args.quantize or summary['dtype']} base, fp32 LoRA",
                    final_loss=summary["final_loss"], eval_loss=summary["eval_loss"])
        try:
            publish_adapter(summary["adapter"], args.push_to_hub, info, f"{args.out}/hub-upload")
        except PushError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
