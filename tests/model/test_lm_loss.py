"""The fused head + cross-entropy (model/lm_loss.py) equals the plain definition it replaces in
training: ``masked_lm_loss(model(ids), labels)``, in value and in every LoRA gradient."""
from __future__ import annotations

import pytest
import torch

from data.batching import IGNORE_INDEX, masked_lm_loss
from lora import inject_lora, lora_parameters
from model.lm_loss import fused_lm_loss
from tests.lora.common import randomize_lora, tiny_llama, token_ids


def lora_model(tie: bool):
    model = tiny_llama(tie_word_embeddings=tie)
    inject_lora(model, targets="all-linear", r=4, alpha=8, dropout=0.0, seed=0)
    randomize_lora(model)
    return model


def labels_for(ids: torch.Tensor) -> torch.Tensor:
    """Prompt positions masked (a different prompt length per row) and one row padded at the end."""
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    labels[1, :2] = IGNORE_INDEX
    labels[1, -3:] = IGNORE_INDEX
    return labels


def loss_and_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fused_equals_plain_fp32(tie, reduction):
    model = lora_model(tie)
    ids = token_ids(batch=2, length=12)
    labels = labels_for(ids)
    plain, g_plain = loss_and_grads(model, masked_lm_loss(model(ids), labels, reduction=reduction))
    # chunk_rows=3 splits the 14 labelled positions into uneven chunks
    fused, g_fused = loss_and_grads(model, fused_lm_loss(model(ids, return_hidden=True), model.lm_head.weight,
                                                         labels, reduction=reduction, chunk_rows=3))
    assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_fused, g_plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fused_close_to_plain_under_bf16_autocast():
    """Both compute the logits with a bf16 matmul and the softmax in float32."""
    model = lora_model(tie=True)
    ids = token_ids(batch=2, length=12)
    labels = labels_for(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = masked_lm_loss(model(ids), labels)
    plain, g_plain = loss_and_grads(model, plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_lm_loss(model(ids, return_hidden=True), model.lm_head.weight, labels, reduction="mean")
    fused, g_fused = loss_and_grads(model, fused)
    assert abs(fused.item() - plain.item()) < 1e-3 * plain.item()
    for a, b in zip(g_fused, g_plain):
        assert (a - b).norm() <= 0.02 * b.norm() + 1e-8


def test_no_labels_no_loss_and_frozen_head_required():
    model = lora_model(tie=False)
    ids = token_ids()
    hidden = model(ids, return_hidden=True)
    none = torch.full_like(ids, IGNORE_INDEX)
    loss = fused_lm_loss(hidden, model.lm_head.weight, none)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in lora_parameters(model))
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="head's gradient"):
        fused_lm_loss(model(ids, return_hidden=True), model.lm_head.weight, ids)
