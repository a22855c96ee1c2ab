"""LoRA arithmetic on a full-precision base: the layer, injection, merging, gradients.

Everything runs in float32 on a tiny random Llama (2 blocks, hidden 64), so "equal" means equal
up to float32 rounding: 1e-5 on logits of size ~1, or bit-for-bit where no arithmetic differs.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lora import (LoRALinear, count_parameters, disable_lora, export_merged, format_trainable, inject_lora,
                  lora_layers, lora_parameters, merge_lora, unmerge_lora, unwrap_lora)
from tests.lora.common import max_diff, randomize_lora, tiny_llama, token_ids

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_zero_B_leaves_the_model_exactly_unchanged():
    model, ids = tiny_llama(), token_ids()
    with torch.no_grad():
        before = model(ids)
        inject_lora(model, targets="all-linear", r=4, alpha=8, dropout=0.1, seed=0)
        assert not any(m.training for m in model.modules()), "new LoRA layers follow the model's eval mode"
        after_eval = model(ids)
        model.train()  # dropout is active on the adapter's input, but B = 0 still adds exactly 0
        after_train = model(ids)
    assert torch.equal(before, after_eval) and torch.equal(before, after_train)


def test_layer_equals_the_formula_by_hand():
    torch.manual_seed(0)
    base = nn.Linear(48, 40, bias=True)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 5, 48)
    W, b, A, B = base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight
    expected = x @ (W + (8 / 4) * B @ A).T + b
    assert max_diff(layer(x), expected) < 1e-5
    assert layer.scaling == 2.0


def test_bf16_base_keeps_fp32_adapter_and_bf16_output():
    torch.manual_seed(0)
    base = nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    layer = LoRALinear(base, r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.1)
    x = torch.randn(4, 64).to(torch.bfloat16)
    y = layer(x)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    assert y.dtype == torch.bfloat16
    ref = x.float() @ (base.weight.float() + 2.0 * layer.lora_B.weight @ layer.lora_A.weight).T
    assert max_diff(y, ref) < 2e-2 * ref.abs().max().item()  # bf16: ~3 significant digits


def test_merge_then_unwrap_equals_wrapped_and_unmerge_restores_base():
    model, ids = tiny_llama(), token_ids()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, targets="all-linear", r=4, alpha=16, dropout=0.0, seed=0)
    randomize_lora(model)
    with torch.no_grad():
        wrapped = model(ids)
        assert merge_lora(model) == 2 * 7
        merged = model(ids)
        unmerge_lora(model)
        assert max_diff(model(ids), wrapped) < 1e-5
        for name, layer in lora_layers(model):  # W + ΔW - ΔW == W up to fp32 rounding
            assert max_diff(layer.base_layer.weight, base_weights[name + ".weight"]) < 1e-6
        unwrap_lora(model, merge=True)
        unwrapped = model(ids)
    assert max_diff(merged, wrapped) < 1e-5
    assert max_diff(unwrapped, wrapped) < 1e-5
    assert not list(lora_layers(model))
    assert model.state_dict().keys() == base_weights.keys()  # a plain Llama again
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_unwrap_without_merge_gives_back_the_base_model():
    model, ids = tiny_llama(), token_ids()
    with torch.no_grad():
        base = model(ids)
        inject_lora(model, r=4, seed=0)
        randomize_lora(model)
        merge_lora(model)  # even a merged adapter is taken out again
        unwrap_lora(model, merge=False)
        assert max_diff(model(ids), base) < 1e-5


def test_gradients_reach_only_A_and_B():
    model, ids = tiny_llama(), token_ids()
    report = inject_lora(model, targets=("q_proj", "v_proj", "down_proj"), r=4, alpha=8, dropout=0.1, seed=0)
    randomize_lora(model)  # non-zero B, so A's gradient is non-zero too
    model.train()
    logits = model(ids[:, :-1])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    lora_ids = {id(p) for p in lora_parameters(model)}
    assert len(lora_ids) == 2 * 3 * 2  # (A, B) x 3 targets x 2 blocks
    for name, p in model.named_parameters():
        if id(p) in lora_ids:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert report["trainable"] == sum(p.numel() for p in lora_parameters(model))


def test_gradcheck_float64():
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=True).double()
    layer = LoRALinear(base, r=3, alpha=6, dropout=0.0, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def f(x, A, B):  # the layer as a function of its input and both adapter matrices
        return functional_call(layer, {"lora_A.weight": A, "lora_B.weight": B}, (x,))

    assert torch.autograd.gradcheck(f, (x, A, B), eps=1e-6, atol=1e-7)


def test_unknown_target_is_an_error_naming_it_and_the_valid_names():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"'qproj'.*q_proj.*down_proj"):
        inject_lora(model, targets=("q_proj", "qproj"))
    with pytest.raises(ValueError, match="lm_head"):
        inject_lora(model, targets=["lm_head"])  # outside the blocks, like PEFT's all-linear
    assert not list(lora_layers(model)), "a failed injection must not leave the model half-wrapped"
    inject_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model)


def test_report_counts_and_peft_style_summary():
    model = tiny_llama()
    base_total = sum(p.numel() for p in model.parameters())
    report = inject_lora(model, targets="all-linear", r=4)
    # r * (in + out) per wrapped linear; hidden 64, kv 2 x 16, intermediate 128, 2 blocks
    shapes = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
              "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    expected = 2 * sum(4 * (i + o) for i, o in shapes.values())
    assert report["targets"] == ALL7 and report["layers"] == 14
    assert report["trainable"] == expected and report["total"] == base_total + expected
    assert count_parameters(model) == (expected, base_total + expected)
    line = format_trainable(report)
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", line)
    assert f"{expected:,d}" in line


def test_disable_lora_evaluates_the_base_and_restores_on_exit():
    model, ids = tiny_llama(), token_ids()
    with torch.no_grad():
        base = model(ids)
        inject_lora(model, r=4, seed=0)
        randomize_lora(model)
        tuned = model(ids)
        with disable_lora(model):
            assert torch.equal(model(ids), base)
        assert torch.equal(model(ids), tuned)
        merge_lora(model)
        with pytest.raises(RuntimeError, match="unmerge"):
            with disable_lora(model):
                pass


def test_initialisation_and_seed():
    a, b = tiny_llama(), tiny_llama()
    inject_lora(a, r=4, seed=123)
    inject_lora(b, r=4, seed=123)
    for (_, la), (_, lb) in zip(lora_layers(a), lora_layers(b)):
        assert torch.equal(la.lora_A.weight, lb.lora_A.weight)  # same seed, same A
        assert not la.lora_B.weight.any()  # B starts at zero
        bound = 1 / math.sqrt(la.in_features)  # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in))
        assert la.lora_A.weight.abs().max() <= bound
    c = tiny_llama()
    inject_lora(c, targets="all-linear", r=16, init="gaussian", seed=0)
    A = torch.cat([layer.lora_A.weight.flatten() for _, layer in lora_layers(c)])
    assert abs(A.std().item() - 1 / 16) < 0.1 / 16
    with pytest.raises(ValueError, match="init"):
        inject_lora(tiny_llama(), init="zeros")


def test_dropout_only_touches_the_adapter_path_in_training():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 32, bias=False), r=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(8, 32)
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # a different mask each call
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.disabled = True
    layer.train()
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_dropout_mask_statistics(p):
    """The adapter's dropout keeps each element with probability 1 - p (to 1/65536) and keeps the
    expectation: mean(dropout(1)) = 1. 10^6 draws: the binomial standard error is < 5e-4."""
    from lora.layer import BitsDropout
    torch.manual_seed(0)
    drop = BitsDropout(p).train()
    y = drop(torch.ones(1000, 1000))
    kept = (y != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 3e-3
    assert abs(y.double().mean().item() - 1.0) < 3e-3 / (1 - p)
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p), rel=1e-4)
    odd = drop(torch.ones(3, 5, 7))  # a size that is not a multiple of four 16-bit draws
    assert odd.shape == (3, 5, 7)
    torch.manual_seed(1)
    a = drop(torch.ones(64))
    torch.manual_seed(1)
    assert torch.equal(a, drop(torch.ones(64))), "seeded by the global generator, like nn.Dropout"
    assert torch.equal(drop.eval()(y), y)


def test_export_merged_fp32_loads_back_equal(tmp_path):
    from model import load_model
    from tests.tiny import tiny_spm_bytes
    model, ids = tiny_llama(tie_word_embeddings=True), token_ids()
    inject_lora(model, targets="all-linear", r=4, alpha=8, seed=0)
    randomize_lora(model)
    with torch.no_grad():
        wrapped = model(ids)
    export_merged(model, tmp_path, dtype=torch.float32)
    assert len(list(lora_layers(model))) == 14, "export leaves the LoRA model as it was"
    (tmp_path / "tokenizer.model").write_bytes(tiny_spm_bytes(512))
    exported, _ = load_model(tmp_path, dtype="fp32", device="cpu")
    with torch.no_grad():
        assert max_diff(exported(ids), wrapped) < 1e-5
