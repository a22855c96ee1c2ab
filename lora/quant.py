"""4-bit (bitsandbytes NF4) weights as plain tensors and back again.

QLoRA (Dettmers et al. 2023) trains LoRA adapters over a base whose linears are stored in 4 bits.
Training never needs the full-precision weight, but *merging* the adapter does: the merged weight
is ``dequantize(W_4bit) + (alpha / r) * B @ A``, which is then either quantized again (to keep a
4-bit model) or kept in bf16 (to export a normal checkpoint). This file holds those two steps.

Why not just call ``bitsandbytes.functional.dequantize_4bit(weight, weight.quant_state)``?
On a CPU with AVX512-BF16, ``Linear4bit.forward`` (eval mode, no grad) rewrites its weight
*in place* the first time it runs, into a CPU-kernel-friendly layout (``quant_state.
packing_format_for_cpu = True``): the 4-bit codes are reshuffled and the per-block scales become
a transposed bf16 matrix. ``dequantize_4bit`` does not understand that layout and would return
garbage, so ``dequantize_4bit_weight`` undoes the packing first (on copies: the layer itself is
left untouched). Worse, the packed layout has no backward pass, so LoRA models switch the packing
off altogether (``disable_cpu_packing_``, called by ``inject_lora``).

Nothing here imports bitsandbytes at module level: a full-precision LoRA never needs it.
"""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn


def is_4bit(layer: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` (NF4/FP4). If bitsandbytes was never imported, no
    module can be one, so we avoid importing it (slow, and optional for full-precision LoRA)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(layer, bnb.nn.Linear4bit)


def _unpack_cpu_layout(data: torch.Tensor, state):
    """Undo bitsandbytes' AVX512-BF16 weight packing without touching ``data`` or ``state``.

    Returns ``(codes, plain_state)`` in the standard layout that ``dequantize_4bit`` reads.
    bitsandbytes' own inverse (``_convert_weight_packed_for_cpu_inverse``) restores the 4-bit
    codes exactly, but it also re-quantizes the block scales to 8 bits ("double quantization"),
    which adds a small error. We keep the codes part and rebuild the scales ourselves from the
    bf16 copy the packed kernel actually uses, so the result equals what ``forward`` computes with.
    """
    import bitsandbytes.functional as bnbf
    tmp = copy.copy(state)  # the inverse overwrites attributes of the state it is given
    tmp.original_nested = False  # ... and must not re-quantize the scales (see above)
    codes, _ = bnbf._convert_weight_packed_for_cpu_inverse(data, tmp)
    # The packed layout stores scales as a (in_features / blocksize, out_features) bf16 matrix;
    # dequantize_4bit wants one float32 scale per block, blocks in row-major (out, in) order.
    absmax = state.absmax.T.reshape(-1).float()
    plain = bnbf.QuantState(absmax=absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                            quant_type=state.quant_type, dtype=state.original_dtype)
    return codes, plain


def disable_cpu_packing_(layer: nn.Module) -> None:
    """Keep a ``Linear4bit`` in the standard layout so gradients can flow through it, in place.

    The AVX512-BF16 packed layout is an inference-only fast path: a forward through a packed layer
    computes the right output but records no backward, so the gradient to the layer's *input* is
    silently dropped (bitsandbytes 0.50, CPU). In a LoRA model that input gradient is what trains
    every adapter below this layer. A single eval forward under ``torch.no_grad()`` (say, a
    validation pass) would pack every layer and quietly stop training all but the top adapters.
    So LoRA models undo any packing that already happened and switch it off (CPU inference of the
    4-bit layers then dequantizes on each call: slower, identical results up to rounding).
    """
    weight = layer.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = _unpack_cpu_layout(weight.data, weight.quant_state)
        layer.quant_state = weight.quant_state
    layer.support_avx512bf16_for_cpu = False


def dequantize_4bit_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (out_features, in_features) weight a ``Params4bit`` stands for, in the dtype it was
    quantized from (bf16 for our loader). Works whether or not the CPU packing has happened."""
    import bitsandbytes.functional as bnbf
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = _unpack_cpu_layout(data, state)
    return bnbf.dequantize_4bit(data, state)


def source_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a ``Params4bit`` was quantized from (the packing overwrites ``state.dtype``)."""
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        return state.original_dtype
    return state.dtype


def quantize_4bit_like(w: torch.Tensor, like: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    """Quantize the full-precision ``w`` into a new ``Params4bit`` with the same settings as
    ``like`` (quant type, block size, double quantization, storage dtype, device).

    ``w`` is first cast to the dtype ``like`` was quantized from, so the new weight dequantizes to
    the same dtype as the old one. Quantization is lossy: NF4 keeps 16 levels per 64-value block.
    """
    import bitsandbytes as bnb
    fresh = bnb.nn.Params4bit(w.detach().to(source_dtype(like)).contiguous(), requires_grad=False,
                              blocksize=like.blocksize, compress_statistics=like.compress_statistics,
                              quant_type=like.quant_type, quant_storage=like.quant_storage, module=module)
    return fresh.to(like.device)  # bitsandbytes quantizes when the tensor moves to its device
