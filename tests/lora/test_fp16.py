"""fp16 mixed precision with dynamic loss scaling (lora/finetune.py), on the CPU and, when there is
one, on a GPU: which dtype is chosen where, a step with overflowing gradients is skipped (weights
and AdamW state untouched, scale halved, logged), and a resumed fp16 run equals an uninterrupted one."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lora.finetune as finetune
import train as train_script
from lora.finetune import TrainConfig, train, training_dtype
from model import load_model
from model.load import half_dtype, native_bf16
from tests.lora.test_finetune import PAIRS, comparable_log, examples
from tests.tiny import make_tiny

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), std=0.1, hidden_size=128, intermediate_size=256,
                     num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("capability, want", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                              ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_gpus_without_bf16_get_fp16_and_the_rest_bf16(monkeypatch, capability, want):
    """A T4 (7.5) or V100 (7.0) has fp16 tensor cores only; A100 (8.0) and H100 (9.0) have bf16."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert native_bf16("cuda") == (want == torch.bfloat16)
    assert half_dtype("cuda") == want == training_dtype(None, "cuda")
    assert training_dtype("bf16", "cuda") == torch.bfloat16  # asked for: kept, even where it is slow
    assert training_dtype("fp32", "cuda") == torch.float32
    assert half_dtype("cpu") == torch.bfloat16 == training_dtype(None, "cpu")  # CPUs keep bf16 as before
    assert training_dtype("fp16", "cpu") == torch.float16


def fp16_run(tmp, tiny_dir, steps, resume=False, **kw):
    model, tok = load_model(tiny_dir, dtype="fp16", device="cpu")
    cfg = TrainConfig(out_dir=str(tmp), dtype="fp16", r=4, alpha=8, dropout=0.1, max_steps=steps, batch_size=2,
                      grad_accum=2, warmup_steps=2, eval_every=3, save_every=2, max_len=64, lr=5e-3, **kw)
    return train(model, tok, examples() * 2, cfg, eval_pairs=examples()[:2], progress=False, resume=resume)


def rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def poison_step(monkeypatch, bad_steps: set[int]):
    """Make the training loss of optimizer steps ``bad_steps`` (1-based) 1e30 times larger: still
    finite, so the step runs, but times the loss scale its gradients overflow fp16 to inf.
    The step number is read off ``lr_at``, which the loop calls once at the top of every step,
    so it holds across a kill and a resume."""
    now = {"step": None}
    real_lr_at, real_loss = finetune.lr_at, finetune.batch_loss_sum

    def lr_at(step, total, cfg):
        now["step"] = step + 1
        return real_lr_at(step, total, cfg)

    def loss(*a, **k):
        out = real_loss(*a, **k)
        return out * 1e30 if torch.is_grad_enabled() and now["step"] in bad_steps else out
    monkeypatch.setattr(finetune, "lr_at", lr_at)
    monkeypatch.setattr(finetune, "batch_loss_sum", loss)


def test_fp16_trains_with_fp32_lora_weights_and_optimizer_state(tiny_dir, tmp_path):
    model, tok = load_model(tiny_dir, dtype=training_dtype("fp16", "cpu"), device="cpu")
    assert model.model.embed_tokens.weight.dtype == torch.float16
    cfg = TrainConfig(out_dir=str(tmp_path), dtype="fp16", r=16, alpha=32, dropout=0.0, targets=["all-linear"],
                      lr=1e-2, max_steps=20, batch_size=4, warmup_steps=3, eval_every=0, save_every=19, max_len=96)
    summary = train(model, tok, examples(), cfg, progress=False)
    log = rows(tmp_path)
    assert summary["dtype"] == "fp16" and summary["skipped_steps"] == 0
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]  # it learns
    assert all(r["loss_scale"] == finetune.LOSS_SCALE_INIT for r in log)  # no overflow, no growth in 20 steps
    lora = [p for p in model.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    opt = load_file(tmp_path / "checkpoints/step-000019/optimizer.safetensors")
    assert all(v.dtype == torch.float32 for k, v in opt.items() if k.endswith(("exp_avg", "exp_avg_sq")))
    assert json.loads((tmp_path / "train_config.json").read_text())["compute_dtype"] == "fp16"


def test_a_step_whose_gradients_overflow_is_skipped_and_the_scale_halved(tiny_dir, tmp_path, monkeypatch, capsys):
    poison_step(monkeypatch, {3})
    model, tok = load_model(tiny_dir, dtype="fp16", device="cpu")
    cfg = TrainConfig(out_dir=str(tmp_path), dtype="fp16", r=4, alpha=8, dropout=0.0, max_steps=4, batch_size=2,
                      warmup_steps=1, eval_every=0, save_every=1, log_every=2, max_len=64, lr=5e-3)
    summary = train(model, tok, examples(), cfg, progress=False)
    log = {r["step"]: r for r in rows(tmp_path)}
    assert sorted(log) == [2, 3, 4]  # the skipped step is logged although log_every is 2
    assert log[3]["skipped"] is True and log[3]["grad_norm"] is None and log[3]["loss"] > 1e29
    assert "skipped" not in log[2] and "skipped" not in log[4]
    assert (log[2]["loss_scale"], log[3]["loss_scale"], log[4]["loss_scale"]) == (65536, 65536, 32768)
    assert summary["skipped_steps"] == 1
    assert "step 3: inf/NaN gradients in fp16, step skipped (not applied); loss scale 65536 -> 32768" in \
        capsys.readouterr().out
    # The checkpoints before and after step 3 hold the same LoRA weights and AdamW state, bit for bit
    ck = tmp_path / "checkpoints"
    for name in ("adapter/adapter_model.safetensors", "optimizer.safetensors"):
        a, b = load_file(ck / "step-000002" / name), load_file(ck / "step-000003" / name)
        a.pop("rng.torch", None), b.pop("rng.torch", None)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    states = [json.loads((ck / f"step-00000{i}/state.json").read_text()) for i in (2, 3)]
    assert [s["grad_scaler"]["scale"] for s in states] == [65536, 32768]


def test_a_too_large_initial_scale_comes_down_by_halving(tiny_dir, tmp_path, monkeypatch):
    """No injected fault: fp16 itself overflows at a scale of 2^40, until the scale is small enough."""
    monkeypatch.setattr(finetune, "LOSS_SCALE_INIT", 2.0 ** 40)
    model, tok = load_model(tiny_dir, dtype="fp16", device="cpu")
    cfg = TrainConfig(out_dir=str(tmp_path), dtype="fp16", r=4, alpha=8, dropout=0.0, max_steps=40, batch_size=4,
                      warmup_steps=1, eval_every=0, save_every=0, max_len=64, lr=1e-3)
    train(model, tok, examples(), cfg, progress=False)
    log = rows(tmp_path)
    skipped = [r for r in log if r.get("skipped")]
    assert skipped and len(skipped) < len(log) and log[0].get("skipped")  # some skipped, the first one too
    for r, nxt in zip(log, log[1:]):
        assert nxt["loss_scale"] == r["loss_scale"] * (0.5 if r.get("skipped") else 1)
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


def test_fp16_resume_after_a_kill_is_exact_loss_scale_included(tiny_dir, tmp_path, monkeypatch):
    """Step 2 overflows (scale halves); with a growth interval of 3 the scale doubles after step 5,
    i.e. after the checkpoint at step 4: only a resume that restored the scale *and* the count of
    clean steps logs the same scales as the uninterrupted run."""
    monkeypatch.setattr(finetune, "LOSS_SCALE_GROWTH_INTERVAL", 3)
    poison_step(monkeypatch, {2})
    fp16_run(tmp_path / "straight", tiny_dir, 8)
    scales = [r["loss_scale"] for r in rows(tmp_path / "straight") if "loss" in r]
    assert scales == [65536, 65536, 32768, 32768, 32768, 65536, 65536, 65536]

    poisoned_loss = finetune.batch_loss_sum
    calls = {"n": 0}

    def dying_loss(*a, **k):  # the process "dies" in the middle of step 6 (checkpoint at step 4)
        calls["n"] += 1
        if calls["n"] == 5 * 2 + 1:
            raise KeyboardInterrupt
        return poisoned_loss(*a, **k)
    monkeypatch.setattr(finetune, "batch_loss_sum", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        fp16_run(tmp_path / "killed", tiny_dir, 8)
    monkeypatch.setattr(finetune, "batch_loss_sum", poisoned_loss)
    state = json.loads((tmp_path / "killed/checkpoints/step-000004/state.json").read_text())
    assert state["grad_scaler"]["scale"] == 32768 and state["grad_scaler"]["_growth_tracker"] == 2
    fp16_run(tmp_path / "killed", tiny_dir, 8, resume=True)

    a = load_file(tmp_path / "straight/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "killed/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert comparable_log(tmp_path / "straight/metrics.jsonl") == comparable_log(tmp_path / "killed/metrics.jsonl")


def test_checkpoints_without_scaler_state_still_load(tiny_dir, tmp_path, capsys):
    """bf16 checkpoints keep their old format (no scaler state); resuming one in fp16 starts a
    fresh scale and says so."""
    model, tok = load_model(tiny_dir, device="cpu")
    cfg = TrainConfig(out_dir=str(tmp_path), r=4, alpha=8, max_steps=2, batch_size=2, warmup_steps=1,
                      eval_every=0, save_every=1, max_len=64)
    train(model, tok, examples(), cfg, progress=False)
    assert json.loads((tmp_path / "checkpoints/step-000001/state.json").read_text()) == {"step": 1}
    model, tok = load_model(tiny_dir, dtype="fp16", device="cpu")
    cfg.dtype, cfg.max_steps = "fp16", 3
    train(model, tok, examples(), cfg, progress=False, resume=True)
    assert "has no loss-scaler state (not an fp16 run): starting from scale 65536" in capsys.readouterr().out
    assert [r.get("loss_scale") for r in rows(tmp_path)] == [None, 65536, 65536]  # resumed at step 1


def test_train_script_dtype_fp16_on_cpu(tiny_dir, tmp_path, capsys):
    data = tmp_path / "ok.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in PAIRS * 2))
    out = tmp_path / "run"
    assert train_script.main(["--model", str(tiny_dir), "--data", str(data), "--dtype", "fp16", "--device", "cpu",
                              "--max-steps", "2", "--out", str(out), "--no-progress", "--eval-frac", "0"]) == 0
    assert "precision: fp16 base, fp16 autocast, dynamic loss scaling (initial scale 65536)" in capsys.readouterr().out
    assert json.loads((out / "train_config.json").read_text())["compute_dtype"] == "fp16"
    assert all(r["loss_scale"] == 65536 for r in rows(out))


# ------------------------------------------------------------------------------------------
# On a GPU (skipped without one)
# ------------------------------------------------------------------------------------------
@needs_cuda
def test_the_gpu_gets_its_fast_half_dtype_for_inference_and_nf4(tiny_dir):
    fast = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    assert half_dtype("cuda") == fast == training_dtype(None, "cuda")
    model, _ = load_model(tiny_dir, device="cuda")  # the default dtype of inference
    assert model.model.embed_tokens.weight.dtype == fast
    model, _ = load_model(tiny_dir, quantize="nf4", device="cuda")
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == fast == model.lm_head.weight.dtype


@needs_cuda
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_fp16_and_bf16_training_on_the_gpu_agree(tiny_dir, tmp_path, quantize):
    final = {}
    for dtype in ("fp16", "bf16"):
        model, tok = load_model(tiny_dir, quantize=quantize, dtype=dtype, device="cuda")
        if quantize:  # the 4-bit linears compute in the run's dtype
            assert model.model.layers[0].mlp.up_proj.compute_dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        cfg = TrainConfig(out_dir=str(tmp_path / dtype), dtype=dtype, r=16, alpha=32, dropout=0.0,
                          targets=["all-linear"], lr=1e-2, max_steps=20, batch_size=4, warmup_steps=2,
                          eval_every=0, save_every=0, max_len=96)
        summary = train(model, tok, examples(), cfg, progress=False)
        assert summary["dtype"] == dtype and all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        final[dtype] = [r["loss"] for r in rows(tmp_path / dtype)]
    assert final["fp16"][-1] < 0.5 * final["fp16"][0]
    assert abs(final["fp16"][-1] - final["bf16"][-1]) < 0.25 * final["bf16"][0]
