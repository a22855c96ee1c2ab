"""From a (Q)LoRA-trained model to an ordinary checkpoint.

After fine-tuning, the adapter can be shipped on its own (``adapter.py``), or folded into the base
weights to give a plain model that any Llama loader reads, with no LoRA code and no speed cost:

    export_merged(model, "out/merged")      # config.json + model.safetensors, bf16

For a QLoRA model the exported weight is ``dequantize(W_4bit) + (alpha / r) · B A`` in float32,
rounded once to bf16. That is *more* faithful than merging into 4 bits (``merge_lora`` has to
re-quantize the sum, adding NF4 rounding error a second time), so export never re-quantizes.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .layer import LoRALinear
from .quant import dequantize_4bit_weight, is_4bit


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every 4-bit ``Linear4bit`` (also inside LoRA wrappers) by an ``nn.Linear`` holding
    its dequantized weight in ``dtype``, in place; returns the model. Other parameters keep their
    dtype. The new layers are frozen, like the ones they replace."""
    for name, module in list(model.named_modules()):
        if not is_4bit(module):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device="meta")
        linear.weight = nn.Parameter(dequantize_4bit_weight(module.weight).to(dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, linear)
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The model's weights under their checkpoint names, with every adapter folded in, every 4-bit
    weight dequantized, all in ``dtype`` on the CPU. The model itself is not changed.

    ``model.layers.0.self_attn.q_proj`` (a LoRALinear) contributes ``...q_proj.weight`` =
    W + ΔW (ΔW only if not already merged); its ``base_layer.``/``lora_A.`` names never appear.
    Each tensor is computed in float32 and rounded once to ``dtype``."""
    state: dict[str, torch.Tensor] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, LoRALinear):
            w = module.base_weight().float()
            if not module.merged:
                w = w + module.delta_weight().to(w.device)
            state[prefix + "weight"] = w.to(dtype).cpu()
            if module.base_layer.bias is not None:
                state[prefix + "bias"] = module.base_layer.bias.to(dtype).cpu()
            return
        if is_4bit(module):
            state[prefix + "weight"] = dequantize_4bit_weight(module.weight).to(dtype).cpu()
            if module.bias is not None:
                state[prefix + "bias"] = module.bias.to(dtype).cpu()
            return
        for name, p in module.named_parameters(recurse=False):
            state[prefix + name] = p.detach().to(dtype).cpu()
        for name, child in module.named_children():
            visit(child, prefix + name + ".")

    visit(model, "")
    return state


def export_merged(model: nn.Module, folder: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                  max_shard_bytes: int | None = None) -> Path:
    """Write the merged model as a Hugging Face checkpoint (config.json + safetensors) that
    ``model.load.load_model`` and transformers can read. Tokenizer files are the caller's job
    (copy them from the base model's folder). The model passed in is left as it was.

    Memory: one full copy of the weights in ``dtype`` on the CPU (what the file needs anyway)."""
    from model import Llama
    from model.load import save_model
    state = merged_state_dict(model, dtype)
    with torch.device("meta"):  # a shell with the right names and config; no memory
        plain = Llama(model.config)
    plain.load_state_dict(state, strict=True, assign=True)
    return save_model(plain, folder, max_shard_bytes=max_shard_bytes)
