"""The LoRA fine-tuning loop: (prompt, target) pairs in, a PEFT-format adapter out.

One optimizer step:
    for each of ``grad_accum`` micro-batches:  loss_sum(target tokens) / tokens(all micro-batches) -> backward
    clip the gradient norm, set the learning rate (warmup then cosine/linear decay), AdamW step.

Dividing each micro-batch's *summed* loss by the token count of the whole accumulated batch makes
k micro-batches produce exactly the gradient of one batch k times larger.

Precision (``TrainConfig.dtype``). The LoRA weights and AdamW's moments are always float32; the
frozen base and the activations are 16-bit, and autocast runs the matmuls in that dtype:
* bf16 (the default): same exponent range as float32, so nothing overflows and gradients need no
  care. Fast on Ampere/Hopper GPUs and on CPUs with AVX512-BF16.
* fp16 (the default on GPUs without bf16, such as the T4 of a free Colab): fp16 tensor cores are
  fast there, but fp16 stops at 65504 and small gradients underflow to zero. So the loss is
  multiplied by a large *loss scale* before ``backward`` and the gradients divided by it again
  before the step (``torch.amp.GradScaler``, Micikevicius et al. 2018, "Mixed Precision
  Training"). The scale is dynamic: a step whose gradients came out inf/NaN is *skipped* (never
  applied) and the scale halved; after ``LOSS_SCALE_GROWTH_INTERVAL`` clean steps it doubles.
  Skipped steps are printed and logged (``"skipped": true`` in metrics.jsonl).
* fp32: no autocast (slow; a reference).

Everything a run needs to continue is checkpointed every ``save_every`` steps, atomically (a
temporary folder renamed into place): the adapter (PEFT format), AdamW's moments, the step, the
RNG state, and in fp16 the loss scaler's state (scale and clean-step count). The data order is a
pure function of (seed, epoch), so the step number alone says where in the data to resume. No
pickle: tensors go to safetensors, the rest to JSON.

Several processes (``torchrun --nproc_per_node N train.py ...``, see ``lora/distributed.py``):
an optimizer step then consumes ``grad_accum x N`` micro-batches, the same list a single process
with ``grad_accum x N`` would take, and rank r trains on micro-batches r, r + N, r + 2N, ...
Every rank divides its summed loss by the target-token count of the *whole* step (known to all
ranks from the deterministic data order), and DDP sums the LoRA gradients over ranks, so the
step equals one process's step with the same global batch (up to float summation order).
Rank 0 writes the files. Dropout masks are drawn per rank, so with dropout > 0 the run is
equivalent in distribution, not bit for bit, to a single process. In fp16 every rank unscales the
same summed gradients, so all ranks skip the same steps and keep the same loss scale.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data.batching import (collate, length_grouped_batches, masked_lm_loss, target_token_count,
                           tokenize_pair)
from model.load import CheckpointError, half_dtype, native_bf16, parse_dtype, pick_device
from model.lm_loss import fused_lm_loss

from . import distributed
from .adapter import load_adapter, save_adapter
from .inject import inject_lora

QLORA_RECIPE = dict(r=64, alpha=16, dropout=0.05, targets=("all-linear",), lr=2e-4)
# fp16 loss scaling: torch's defaults. The first steps of a run may be skipped while the scale
# comes down from 2^16 to what the gradients allow.
LOSS_SCALE_INIT = 2.0 ** 16
LOSS_SCALE_GROWTH_INTERVAL = 2000
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    r: int = 8
    alpha: float = 32
    dropout: float = 0.05
    targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lr: float = 3e-4
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 4
    grad_accum: int = 1
    max_len: int = 512
    warmup_steps: int = 10
    schedule: str = "cosine"  # or "linear"
    clip: float = 1.0
    eval_every: int = 50
    save_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    autocast: bool = True  # autocast to dtype (bf16: where the hardware has it natively)
    dtype: str | None = None  # "bf16", "fp16" (loss-scaled) or "fp32"; None: training_dtype's choice
    gradient_checkpointing: bool = False
    base_model: str = ""
    extra: dict = field(default_factory=dict)  # anything the caller wants recorded with the adapter


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then decay to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def training_dtype(requested: str | torch.dtype | None, device: str | torch.device | None) -> torch.dtype:
    """The dtype a run computes in: ``requested``, else fp16 on a GPU without native bf16 (T4,
    V100) and bf16 everywhere else (``model.load.half_dtype``). The base is loaded in it.
    ``device``: as for ``load_model`` (None: cuda if there is a GPU)."""
    return parse_dtype(requested) or half_dtype(pick_device(device))


def autocasts(device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """Whether ``autocast_context`` turns autocast on. bf16 only where it is native (CUDA from
    Ampere on, CPUs with AVX512-BF16/AMX): elsewhere it is emulated, slower than float32. fp16
    wherever asked: GPUs without bf16 are what it is for, and a CPU runs it too (slowly), so the
    fp16 path can be tested on any machine."""
    return amp_dtype == torch.float16 or (amp_dtype == torch.bfloat16 and native_bf16(device))


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    """Autocast to ``amp_dtype`` where ``autocasts`` says so (None: off)."""
    if autocasts(device, amp_dtype):
        return torch.autocast(device.type, dtype=amp_dtype)
    return torch.autocast(device.type, enabled=False)


def precision_line(dtype: torch.dtype, amp_dtype: torch.dtype | None, device: torch.device) -> str:
    """One line saying how this run computes, for the log."""
    what = f"{DTYPE_NAMES[dtype]} base"
    if autocasts(device, amp_dtype):
        what += f", {DTYPE_NAMES[amp_dtype]} autocast"
    if dtype == torch.float16:
        what += f", dynamic loss scaling (initial scale {LOSS_SCALE_INIT:g})"
    return what + "; LoRA weights and AdamW state in fp32"


# ------------------------------------------------------------------------------------------
# Checkpoints: adapter + optimizer + step + RNG (+ loss scale), written atomically
# ------------------------------------------------------------------------------------------
def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, names: list[str], cfg: TrainConfig,
                    rng_states: list[torch.Tensor] | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> Path:
    """``rng_states``: every rank's RNG state, in rank order (default: this process's only).
    ``scaler``: an enabled (fp16) loss scaler's state goes into state.json."""
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_checkpoint(tmp, model, optimizer, names, cfg, step, rng_states, scaler)
    except Exception as e:  # a full disk shows up as OSError or as safetensors' own error type
        # Nothing half-written stays behind, and the run stops saying where it can resume from.
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(ckpt_root)
        raise CheckpointError(f"writing checkpoint {final} failed ({type(e).__name__}: {e}); removed {tmp.name}; "
                              f"the last good checkpoint is {last or 'none (--resume would start afresh)'}") from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    old = sorted(ckpt_root.glob("step-*"))[:-cfg.keep_checkpoints]
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    return final


def _write_checkpoint(tmp: Path, model, optimizer, names: list[str], cfg: TrainConfig, step: int,
                      rng_states: list[torch.Tensor] | None, scaler: torch.amp.GradScaler | None) -> None:
    """The files of one checkpoint, into the temporary folder ``tmp``."""
    tmp.mkdir(parents=True)
    save_adapter(model, tmp / "adapter", base_model_name_or_path=cfg.base_model)
    rng_states = rng_states or [torch.get_rng_state()]
    tensors = {"rng.torch": rng_states[0]}  # rank 0 (or the only process)
    tensors |= {f"rng.torch.rank{r}": state for r, state in enumerate(rng_states) if r > 0}
    for name, p in zip(names, optimizer.param_groups[0]["params"]):
        st = optimizer.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                tensors[f"{name}.{k}"] = st[k].detach().cpu().contiguous()
        if "step" in st:
            tensors[f"{name}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {"step": step}
    if scaler is not None and scaler.is_enabled():  # fp16: resume with the same scale
        state["grad_scaler"] = scaler.state_dict()
    (tmp / "state.json").write_text(json.dumps(state))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(d for d in ckpt_root.glob("step-*") if (d / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer, names: list[str],
                    scaler: torch.amp.GradScaler | None = None) -> int:
    """Restore what ``save_checkpoint`` wrote into ``model``, ``optimizer`` (and an enabled
    ``scaler``); returns the step. Checkpoints written before fp16 existed have no scaler state."""
    tensors = load_file(str(path / "optimizer.safetensors"))
    ranks = 1 + sum(k.startswith("rng.torch.rank") for k in tensors)
    if ranks != distributed.world_size():
        raise ValueError(f"{path} was written by {ranks} process(es), this run has {distributed.world_size()}: "
                         f"resume with the same number, so that the global batch and data order stay the same")
    load_adapter(model, path / "adapter")
    for name, p in zip(names, optimizer.param_groups[0]["params"]):
        if f"{name}.exp_avg" in tensors:
            optimizer.state[p] = {
                "step": tensors[f"{name}.step"].reshape(()),
                "exp_avg": tensors[f"{name}.exp_avg"].to(p.device),
                "exp_avg_sq": tensors[f"{name}.exp_avg_sq"].to(p.device),
            }
    rank = distributed.rank()
    torch.set_rng_state(tensors["rng.torch" if rank == 0 else f"rng.torch.rank{rank}"])
    state = json.loads((path / "state.json").read_text())
    if scaler is not None and scaler.is_enabled():
        if "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
        else:
            print(f"note: {path} has no loss-scaler state (not an fp16 run): starting from scale {scaler.get_scale():g}")
    return state["step"]


def rewrite_log_until(log_path: Path, step: int) -> None:
    """On resume, drop log rows written after the checkpoint (they will be written again)."""
    if not log_path.exists():
        return
    rows = [ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = log_path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, log_path)


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------
def batch_loss_sum(net, model, batch: dict[str, torch.Tensor], device: torch.device,
                   amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Summed next-token loss over the batch's target tokens.

    ``net`` is what is called (the model, or its DistributedDataParallel wrapper) and ``model``
    the bare Llama. When its output head is a plain frozen linear (always, in LoRA training) the
    loss is taken from the hidden states by ``fused_lm_loss``: the same number as
    ``masked_lm_loss(logits, labels)``, without ever building the (B, T, vocab) logits.
    ``amp_dtype``: what autocast computes in (None: off; see ``autocast_context``).
    """
    labels = batch["labels"].to(device)
    head = model.lm_head
    fused = type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
    with autocast_context(device, amp_dtype):
        out = net(batch["input_ids"].to(device), batch["attention_mask"].to(device), return_hidden=fused)
        if fused:
            return fused_lm_loss(out, head.weight, labels, reduction="sum")
    return masked_lm_loss(out, labels, reduction="sum")


@torch.no_grad()
def evaluate_loss(model, batches: list[dict[str, torch.Tensor]], device, amp_dtype: torch.dtype | None) -> float:
    """Mean next-token loss per target token over held-out batches (shared out among the ranks)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for b in batches[distributed.rank()::distributed.world_size()]:
        total += float(batch_loss_sum(model, model, b, device, amp_dtype))
        tokens += target_token_count(b["labels"])
    model.train(was_training)
    total, tokens = distributed.sum_across_ranks(total, tokens)
    return total / max(tokens, 1)


def train(model, tokenizer, train_pairs: Sequence[tuple[str, str]], cfg: TrainConfig,
          eval_pairs: Sequence[tuple[str, str]] = (), resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune LoRA adapters on ``model`` (16-bit or NF4 base) and write ``cfg.out_dir``:

    adapter/ (PEFT format), metrics.jsonl (one JSON row per logged step and eval),
    checkpoints/step-N/ (resumable), train_config.json. Returns a summary dict.
    Under torchrun every rank calls this; only rank 0 writes (see the module docstring).
    """
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root, log_path = out / "checkpoints", out / "metrics.jsonl"
    device = model.model.embed_tokens.weight.device
    dtype = training_dtype(cfg.dtype, device)
    amp_dtype = dtype if cfg.autocast and dtype != torch.float32 else None
    torch.manual_seed(cfg.seed + rank)  # the dropout masks: a stream of its own per rank

    examples = [tokenize_pair(tokenizer, p, t, cfg.max_len) for p, t in train_pairs]
    if not examples:
        raise ValueError("no training pairs")
    n_trunc = sum(e.truncated for e in examples)
    eval_examples = [tokenize_pair(tokenizer, p, t, cfg.max_len) for p, t in eval_pairs]
    eval_batches = [collate(eval_examples[i:i + cfg.batch_size], tokenizer.pad_id)
                    for i in range(0, len(eval_examples), cfg.batch_size)]
    lengths = [len(e.input_ids) for e in examples]
    n_target = [e.target_tokens for e in examples]
    accum = cfg.grad_accum * world  # micro-batches per optimizer step, over all ranks
    steps_per_epoch = max(1, math.ceil(len(examples) / cfg.batch_size) // accum)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs

    report = inject_lora(model, targets=list(cfg.targets), r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                         seed=cfg.seed)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Loss scaling is for fp16 only. Disabled, every scaler call below is a no-op (scale() returns
    # the loss itself, step() is optimizer.step()), so bf16 and fp32 steps are exactly as without it.
    scaler = torch.amp.GradScaler(device.type, init_scale=LOSS_SCALE_INIT,
                                  growth_interval=LOSS_SCALE_GROWTH_INTERVAL, enabled=dtype == torch.float16)
    net = distributed.wrap_ddp(model)  # the model itself when alone
    ranks = {"world_size": world, "global_batch": cfg.batch_size * accum} if world > 1 else {}

    @functools.lru_cache(maxsize=2)  # steps walk the epochs in order: shuffle each epoch once
    def epoch_order(epoch: int) -> list[list[int]]:
        return length_grouped_batches(lengths, cfg.batch_size, cfg.seed + epoch)

    def step_targets(step_batches: list[list[int]]) -> int:
        """Answer tokens of a whole optimizer step (all micro-batches, all ranks): the loss's divisor."""
        return sum(n_target[j] for b in step_batches for j in b)

    def micro_batches(step: int) -> list[list[int]]:
        """The micro-batches (example indices) of optimizer step ``step`` over all ranks: a pure
        function of (seed, epoch, step), so every rank knows the whole step without asking."""
        out_batches = []
        for k in range(accum):
            flat = step * accum + k
            epoch, idx = divmod(flat, steps_per_epoch * accum)
            order = epoch_order(epoch)
            out_batches.append(order[idx % len(order)])
        return out_batches

    if main:
        # How much text the run trains on, after truncation to max_len: "the same number of pairs"
        # is not the same amount of training when one set's answers are shorter. target_tokens: the
        # answer tokens of the training split (one pass over it); target_tokens_trained: what all
        # total_steps steps see, exactly (--max-steps, epochs, a remainder of micro-batches dropped).
        trained = sum(step_targets(micro_batches(step)) for step in range(total_steps))
        seen = {"total_steps": total_steps, "examples": len(examples), "target_tokens": int(sum(n_target)),
                "target_tokens_trained": int(trained), "compute_dtype": DTYPE_NAMES[dtype]}
        (out / "train_config.json").write_text(json.dumps(asdict(cfg) | seen | ranks, indent=2, default=list))
    print(f"trainable params: {report['trainable']:,} || all params: {report['total']:,} || "
          f"trainable%: {100 * report['trainable'] / report['total']:.4f}")
    print(f"{len(examples)} training examples ({n_trunc} truncated to {cfg.max_len} tokens), "
          f"{len(eval_examples)} held out; {total_steps} steps of {cfg.batch_size}x{cfg.grad_accum} examples")
    print(f"precision: {precision_line(dtype, amp_dtype, device)}")
    if world > 1:
        print(f"global batch = {cfg.batch_size} per rank x {world} ranks x {cfg.grad_accum} accumulation "
              f"= {cfg.batch_size * accum} examples per step")

    start = 0
    if resume and (ck := latest_checkpoint(ckpt_root)) is not None:
        start = load_checkpoint(ck, model, optimizer, names, scaler)
        if main:
            rewrite_log_until(log_path, start)
        print(f"resumed from {ck} at step {start}")
    elif log_path.exists() and main:
        log_path.unlink()  # a fresh run (or --resume before any checkpoint) starts a fresh log

    bar = None
    if progress and main:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    last_eval = None
    t_start, tokens_seen, skipped = time.perf_counter(), 0, 0
    with open(log_path if main else os.devnull, "a") as log:  # the logged numbers are global: rank 0 writes
        for step in range(start, total_steps):
            lr = lr_at(step, total_steps, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            step_batches = micro_batches(step)
            n_tokens = step_targets(step_batches)  # the whole step's, on every rank
            batches = [collate([examples[j] for j in b], tokenizer.pad_id) for b in step_batches[rank::world]]
            loss_total, step_tokens = 0.0, 0
            for i, b in enumerate(batches):
                with distributed.sync_gradients(net, now=i == len(batches) - 1):
                    loss = batch_loss_sum(net, model, b, device, amp_dtype) / max(n_tokens, 1)
                    if not torch.isfinite(loss):  # the forward pass itself: a smaller loss scale cannot help
                        ck = latest_checkpoint(ckpt_root)
                        hint = " (fp16 activations overflowed? try --dtype bf16 or fp32)" if scaler.is_enabled() else ""
                        raise TrainingDiverged(f"loss is {float(loss.detach())} at step {step + 1}{hint}: stopping; the "
                                               f"last good checkpoint is {ck or 'none (no checkpoint written yet)'}")
                    scaler.scale(loss).backward()  # fp16: loss x scale, so small gradients stay above underflow
                loss_total += float(loss.detach())
                step_tokens += int(b["attention_mask"].sum())
            loss_total, step_tokens = distributed.sum_across_ranks(loss_total, step_tokens)
            tokens_seen += int(step_tokens)
            scaler.unscale_(optimizer)  # fp16: divide the gradients by the scale (clipping needs true sizes)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
            scale = scaler.get_scale()
            scaler.step(optimizer)  # fp16: skipped if unscale_ found an inf/NaN gradient
            scaler.update()  # ... and then the scale is halved (or doubled after a run of clean steps)
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            elapsed = time.perf_counter() - t_start
            row = {"step": done, "loss": round(loss_total, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
                   "tokens_per_s": round(tokens_seen / elapsed, 1)}
            if scaler.is_enabled():
                row["loss_scale"] = scale
                if scaler.get_scale() < scale:  # lowered: this step's gradients overflowed
                    skipped += 1
                    row |= {"grad_norm": None, "skipped": True}
                    if main:
                        (bar.write if bar else print)(
                            f"step {done}: inf/NaN gradients in fp16, step skipped (not applied); loss scale "
                            f"{scale:g} -> {scaler.get_scale():g}")
            if eval_batches and ((cfg.eval_every and done % cfg.eval_every == 0) or done == total_steps):
                last_eval = evaluate_loss(model, eval_batches, device, amp_dtype)
                row["eval_loss"] = round(last_eval, 6)
            if done % cfg.log_every == 0 or "eval_loss" in row or "skipped" in row or done == total_steps:
                log.write(json.dumps(row) + "\n")
                log.flush()
            if bar:
                bar.set_postfix(loss=f"{loss_total:.3f}", lr=f"{lr:.1e}", tok_s=f"{row['tokens_per_s']:.0f}",
                                **({"eval": f"{last_eval:.3f}"} if last_eval is not None else {}))
                bar.update(1)
            if cfg.save_every and done % cfg.save_every == 0 and done < total_steps:
                log.flush()
                rng_states = distributed.gather_objects(torch.get_rng_state())  # every rank's dropout stream
                if main:
                    save_checkpoint(ckpt_root, done, model, optimizer, names, cfg, rng_states, scaler)
    if bar:
        bar.close()
    model.eval()
    if main:
        save_adapter(model, out / "adapter", base_model_name_or_path=cfg.base_model, extra_config=cfg.extra or None)
    return {"steps": total_steps, "final_loss": loss_total if total_steps > start else None,
            "eval_loss": last_eval, "truncated": n_trunc, "examples": len(examples),
            "dtype": DTYPE_NAMES[dtype], "skipped_steps": skipped,
            "trainable": report["trainable"], "total": report["total"], "adapter": str(out / "adapter")}
