#!/usr/bin/env python
"""LoRA training throughput and peak memory: ours vs transformers + peft, same everything.

    python bench/bench_train.py                      # SmolLM2-135M, bf16 base, batch 8 x 256 tokens
    python bench/bench_train.py --quantize nf4       # QLoRA (ours and peft over bitsandbytes NF4)

Each side runs in its own fresh process (so peak RSS is its own): load the base in bf16, add LoRA
(r=8, alpha=32, dropout 0.05 on q/k/v/o unless flags say otherwise), then time --steps optimizer
steps (after --warmup steps) of forward + loss + backward + AdamW on the same token batches under
bf16 autocast. Tokens/s counts every input token of the batch.

Labels: by default every position is a target (labels = input ids), the case least favourable to
our loss, which puts only labelled positions through the output head. ``--prompt-frac 0.5`` masks
the first half of every row with -100 on both sides, as instruction tuning does (loss on the
response only).

Our side runs the trainer's own loss function (``lora.finetune.batch_loss_sum``); theirs the
model's ``labels=`` loss, as trl's SFTTrainer would.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def batches(vocab: int, batch: int, seq: int, n: int, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (batch, seq), generator=g) for _ in range(n)]


def labels_for(ids, prompt_frac: float):
    """Input ids as labels, with the first ``prompt_frac`` of every row masked (-100)."""
    labels = ids.clone()
    labels[:, :int(ids.shape[1] * prompt_frac)] = -100
    return labels


def run_ours(args) -> dict:
    import torch
    from data.batching import target_token_count
    from lora import inject_lora
    from lora.finetune import batch_loss_sum
    from model import load_model
    model, _ = load_model(args.model, quantize=args.quantize, dtype="bf16", device="cpu")
    inject_lora(model, targets=args.targets.split(","), r=args.r, alpha=args.alpha, dropout=0.05, seed=0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(ids):
        labels = labels_for(ids, args.prompt_frac)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        loss = batch_loss_sum(model, model, batch, torch.device("cpu"), amp_dtype=torch.bfloat16) / target_token_count(labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)
    return timed(step, model.config.vocab_size, args)


def run_hf(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from model.load import resolve_model_dir
    kw = {}
    if args.quantize == "nf4":
        from transformers import BitsAndBytesConfig
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(args.model), dtype=torch.bfloat16, **kw)
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.05,
                                             target_modules=args.targets.split(","), task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(ids):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=labels_for(ids, args.prompt_frac))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)
    return timed(step, model.config.vocab_size, args)


def timed(step, vocab, args) -> dict:
    import resource
    data = batches(vocab, args.batch, args.seq, args.warmup + args.steps)
    for ids in data[:args.warmup]:
        step(ids)
    t0 = time.perf_counter()
    losses = [step(ids) for ids in data[args.warmup:]]
    secs = time.perf_counter() - t0
    return {"tokens_per_s": round(args.batch * args.seq * args.steps / secs, 1), "secs": round(secs, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "first_loss": round(losses[0], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quantize", choices=["nf4"], default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--prompt-frac", type=float, default=0.0,
                    help="mask this leading fraction of every row from the loss (default 0: all tokens are targets)")
    ap.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating rounds (ours, hf, then hf, ours, ...); medians are reported (default 3)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.side:  # child process
        print(json.dumps((run_ours if args.side == "ours" else run_hf)(args)))
        return
    config = {k: v for k, v in vars(args).items() if k not in ("side", "json", "rounds")}
    results = {"config": config, "rounds": []}
    # This machine's speed drifts by +-15% from minute to minute (shared CPUs), so the two sides
    # alternate, each in a fresh process, for --rounds rounds; each side's median is reported.
    for rnd in range(args.rounds):
        row = {}
        for side in (("ours", "hf") if rnd % 2 == 0 else ("hf", "ours")):
            cmd = [sys.executable, __file__, "--side", side]
            for k, v in config.items():
                if v is not None:
                    cmd += [f"--{k.replace('_', '-')}", str(v)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
            row[side] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  round {rnd + 1}: ours {row['ours']['tokens_per_s']:.1f} tok/s, transformers + peft "
              f"{row['hf']['tokens_per_s']:.1f} tok/s (x{row['ours']['tokens_per_s'] / row['hf']['tokens_per_s']:.2f})",
              flush=True)
        results["rounds"].append(row)
    for side in ("ours", "hf"):
        runs = sorted((r[side] for r in results["rounds"]), key=lambda x: x["tokens_per_s"])
        median = dict(runs[len(runs) // 2])
        median["peak_rss_mib"] = max(x["peak_rss_mib"] for x in runs)
        results[side] = median
    o, h = results["ours"], results["hf"]
    print(f"LoRA training, {args.model} {'nf4' if args.quantize else 'bf16'}, batch {args.batch} x {args.seq} tokens, "
          f"r={args.r} on {args.targets}, loss on the last {1 - args.prompt_frac:.0%} of each row")
    print(f"  ours:                {o['tokens_per_s']:>8.1f} tok/s, peak RSS {o['peak_rss_mib']} MiB (first loss {o['first_loss']})")
    print(f"  transformers + peft: {h['tokens_per_s']:>8.1f} tok/s, peak RSS {h['peak_rss_mib']} MiB (first loss {h['first_loss']})")
    print(f"  speedup x{o['tokens_per_s'] / h['tokens_per_s']:.2f} (medians of {args.rounds} rounds), memory ratio {o['peak_rss_mib'] / h['peak_rss_mib']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
