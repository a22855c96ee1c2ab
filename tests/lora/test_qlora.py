"""QLoRA: LoRA over a 4-bit NF4 base (bitsandbytes ``Linear4bit``), on the CPU.

The tiny checkpoint has hidden 64 / intermediate 128, so every block linear has in_features a
multiple of 64 and out_features a multiple of 32: bitsandbytes' AVX512-BF16 CPU path applies, and
the first eval forward under no_grad repacks each 4-bit weight in place. Each test runs such a
forward *before* touching LoRA, so dequantizing, merging and training all meet packed weights.

Tolerances are relative L2 errors on the logits, rel(a, b) = |a - b| / |b|:
* NF4 rounding of the base itself costs ~0.13 here (the price of 4 bits on a random net);
* merging into 4 bits re-rounds W + ΔW, costing about the same again: we require <= 1.5x the
  base's own quantization error, and per weight <= 0.18 x its 64-block's absmax (half the widest
  gap between NF4 levels, 0.139, plus the 8-bit error of the double-quantized scales);
* exporting to bf16 never re-quantizes, so the exported model matches the LoRA model to bf16
  precision (< 0.03; bf16 vs fp32 of the same base is ~0.006).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lora import (dequantize_model, disable_lora, export_merged, inject_lora, lora_layers, lora_parameters,
                  merge_lora, unmerge_lora)
from lora.quant import dequantize_4bit_weight, is_4bit
from model import load_model
from tests.lora.common import max_diff, randomize_lora, token_ids
from tests.tiny import make_tiny

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import has_avx512bf16  # noqa: E402

IDS = token_ids()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), std=0.02)


def nf4_after_eval_forward(folder):
    """An NF4 model on which one inference forward has run (packing its weights, if the CPU can)."""
    model, _ = load_model(folder, quantize="nf4", device="cpu")
    with torch.no_grad():
        logits = model(IDS)
    if has_avx512bf16():
        q = model.model.layers[0].self_attn.q_proj
        assert q.weight.quant_state.packing_format_for_cpu, "the test is meant to meet packed weights"
    return model, logits


def loss_of(model: nn.Module) -> torch.Tensor:
    logits = model(IDS[:, :-1])
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), IDS[:, 1:].flatten())


def test_dequantize_a_packed_weight(tiny_dir):
    model, _ = nf4_after_eval_forward(tiny_dir)
    fresh, _ = load_model(tiny_dir, quantize="nf4", device="cpu")  # same weights, never packed
    for name in ("self_attn.k_proj", "mlp.down_proj"):
        packed = model.model.layers[1].get_submodule(name)
        plain = fresh.model.layers[1].get_submodule(name)
        w = dequantize_4bit_weight(packed.weight)
        # what the layer computes with: its output on the identity matrix is W^T
        with torch.no_grad():
            used = packed(torch.eye(packed.in_features, dtype=torch.bfloat16)).T
        scale = w.float().abs().max().item()
        assert w.shape == (packed.out_features, packed.in_features) and w.dtype == torch.bfloat16
        assert max_diff(w, used) <= 2 ** -7 * scale  # one bf16 rounding apart, at most
        # the packing rounds the block scales to bf16: ~2^-8 relative from the unpacked weight
        assert max_diff(w, dequantize_4bit_weight(plain.weight)) <= 2 ** -7 * scale


def test_forward_and_gradients_over_nf4(tiny_dir):
    model, base_logits = nf4_after_eval_forward(tiny_dir)
    report = inject_lora(model, targets=("q_proj", "v_proj"), r=8, alpha=16, dropout=0.0, seed=0)
    fp32, _ = load_model(tiny_dir, dtype="fp32", device="cpu")  # a 4-bit weight counts as in_f x out_f
    assert report["total"] == sum(p.numel() for p in fp32.parameters()) + report["trainable"]
    with torch.no_grad():
        wrapped = model(IDS)
        with disable_lora(model):
            assert torch.equal(model(IDS), wrapped)  # B = 0: the adapters add exactly nothing
    # vs. before injection: same 4-bit weights, but the unpacked (training-capable) kernel
    assert wrapped.dtype == torch.bfloat16 and rel(wrapped, base_logits) < 0.02

    randomize_lora(model, std=0.05)
    model.train()
    loss_of(model).backward()
    grads = [p.grad for p in lora_parameters(model)]
    for name, p in model.named_parameters():
        if not name.endswith(("lora_A.weight", "lora_B.weight")):
            assert p.grad is None, name
    # Every adapter gets a gradient, and the right one: the same as over a bf16 copy of the
    # dequantized base. q/v adapters are only reached through o_proj's 4-bit layer, so this fails
    # if a packed layer (which records no backward) is left in the path.
    assert all(g is not None for g in grads)
    ref, _ = nf4_after_eval_forward(tiny_dir)
    dequantize_model(ref, torch.bfloat16)
    inject_lora(ref, targets=("q_proj", "v_proj"), r=8, alpha=16, dropout=0.0, seed=0)
    randomize_lora(ref, std=0.05)
    ref.train()
    loss_of(ref).backward()
    for g, g_ref in zip(grads, (p.grad for p in lora_parameters(ref))):
        assert rel(g, g_ref) < 1e-3


def test_merge_requantizes_close_and_unmerge_is_exact(tiny_dir):
    model, base_logits = nf4_after_eval_forward(tiny_dir)
    bf16, _ = load_model(tiny_dir, dtype="bf16", device="cpu")
    with torch.no_grad():
        quantization_error = rel(base_logits, bf16(IDS))
    inject_lora(model, targets="all-linear", r=8, alpha=16, seed=0)
    randomize_lora(model, std=0.05)
    before = {name: layer.base_layer.weight for name, layer in lora_layers(model)}
    targets = {name: layer.base_weight().float() + layer.delta_weight() for name, layer in lora_layers(model)}
    with torch.no_grad():
        wrapped = model(IDS)
        merge_lora(model)
        merged = model(IDS)
        for name, layer in lora_layers(model):
            assert is_4bit(layer.base_layer) and layer.base_layer.weight is not before[name]
            err = (dequantize_4bit_weight(layer.base_layer.weight).float() - targets[name]).abs().view(-1, 64)
            assert (err <= 0.18 * targets[name].abs().view(-1, 64).amax(1, keepdim=True)).all(), name
        unmerge_lora(model)
        assert all(layer.base_layer.weight is before[name] for name, layer in lora_layers(model))
        assert torch.equal(model(IDS), wrapped)
    assert rel(merged, wrapped) < 1.5 * quantization_error, (rel(merged, wrapped), quantization_error)


def test_export_merged_bf16_loads_back_and_matches(tiny_dir, tmp_path):
    model, _ = nf4_after_eval_forward(tiny_dir)
    inject_lora(model, targets="all-linear", r=8, alpha=16, seed=0)
    randomize_lora(model, std=0.05)
    with torch.no_grad():
        wrapped = model(IDS)
        export_merged(model, tmp_path)
        assert torch.equal(model(IDS), wrapped), "exporting must leave the LoRA model as it was"
    (tmp_path / "tokenizer.model").write_bytes((tiny_dir / "tokenizer.model").read_bytes())
    exported, _ = load_model(tmp_path, dtype="bf16", device="cpu")
    assert exported.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert rel(exported(IDS), wrapped) < 0.03
    with disable_lora(model), torch.no_grad():  # and the adapter really is in there
        assert rel(exported(IDS), model(IDS)) > 0.1


def test_dequantize_model_after_eval_forward(tiny_dir):
    model, nf4_logits = nf4_after_eval_forward(tiny_dir)
    dequantize_model(model, torch.bfloat16)
    assert not any(is_4bit(m) for m in model.modules())
    down = model.model.layers[0].mlp.down_proj
    assert type(down) is nn.Linear and down.weight.dtype == torch.bfloat16 and not down.weight.requires_grad
    with torch.no_grad():
        assert rel(model(IDS), nf4_logits) < 0.02  # the same weights, up to one bf16 rounding


def test_adapter_trained_in_fp32_loads_into_nf4(tiny_dir, tmp_path):
    from lora import load_adapter, save_adapter
    fp32, _ = load_model(tiny_dir, dtype="fp32", device="cpu")
    inject_lora(fp32, targets="all-linear", r=8, alpha=16, seed=0)
    randomize_lora(fp32, std=0.05)
    save_adapter(fp32, tmp_path)
    model, base_logits = nf4_after_eval_forward(tiny_dir)
    load_adapter(model, tmp_path)
    assert all(is_4bit(layer.base_layer) for _, layer in lora_layers(model))
    with torch.no_grad():
        bf16, _ = load_model(tiny_dir, dtype="bf16", device="cpu")
        quantization_error = rel(base_logits, bf16(IDS))
        assert rel(model(IDS), fp32(IDS)) < 1.5 * quantization_error
