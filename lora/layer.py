"""One LoRA layer: a frozen linear plus a trainable low-rank update (Hu et al. 2021, "LoRA").

A linear layer computes ``y = x W^T`` with ``W`` of shape (out, in). Fine-tuning would learn a
full ``ΔW`` of the same shape; LoRA instead learns it as a product of two thin matrices,

    ΔW = (alpha / r) · B A,      A: (r, in),  B: (out, r),  r << min(in, out)

so the layer computes ``y = x W^T + (alpha / r) · (x A^T) B^T`` and only A and B are trained:
r·(in + out) numbers instead of in·out. ``B`` starts at zero, so training starts exactly from the
base model; ``A`` starts random so that gradients reach ``B`` from the first step (with both at
zero, neither would ever move). ``alpha / r`` keeps the update's size roughly independent of r.

The base layer can be a ``torch.nn.Linear`` or a bitsandbytes 4-bit ``Linear4bit`` (QLoRA): LoRA
never looks inside it on the forward pass, it only adds to its output. The adapter's own
parameters are float32 by default even over a bf16 or 4-bit base, because the optimizer's small
updates would be rounded away in bf16; inputs are cast to the adapter's dtype and the sum is cast
back to the base output's dtype. (Same design as PEFT's ``lora.Linear`` and litgpt's ``lora.py``.)

Two switches:
* ``merged``: ΔW has been added into the base weight (``merge()``); the forward is then a single
  matmul, as fast as the base model. ``unmerge()`` takes it out again.
* ``disabled``: skip the adapter and compute the base model only (for comparisons with the base).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .quant import dequantize_4bit_weight, disable_cpu_packing_, is_4bit, quantize_4bit_like

INITS = ("kaiming", "gaussian")


class BitsDropout(nn.Module):
    """Dropout whose mask is drawn as random 16-bit integers, four per 64-bit draw.

    Same distribution as ``nn.Dropout`` (each element kept with probability 1 - p, kept ones
    scaled by 1 / (1 - p)), up to p being rounded to a multiple of 1/65536 (0.05 becomes
    0.0500030...; the scale uses the rounded p, so the expectation stays exactly x). Why not
    ``nn.Dropout``: LoRA draws one mask per adapted layer per step, and on a CPU the default
    generator is sequential, so drawing one float per element (``nn.Dropout``'s Bernoulli
    sampler, or ``torch.rand``) was a tenth to a fifth of a whole training step; one 64-bit draw
    per four elements is ~3x cheaper."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout={p}: expected a probability in [0, 1)")
        self.p = p
        self.drop_65536 = round(p * 65536)  # an element is dropped when its 16 bits fall below this
        if self.drop_65536 >= 65536:
            raise ValueError(f"dropout={p}: rounds to 1 at this resolution (1/65536), which would drop everything")

    def keep_mask(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """Boolean mask, True with probability 1 - drop_65536 / 65536 for each element."""
        n = math.prod(shape)
        words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
        bits = words.view(torch.int16)[:n].view(shape)  # uniform over -32768..32767
        return bits >= self.drop_65536 - 32768

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_65536 == 0:
            return x
        scale = 65536 / (65536 - self.drop_65536)
        return torch.where(self.keep_mask(x.shape, x.device), x * scale, 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LoRALinear(nn.Module):
    """``base_layer(x) + (alpha / r) · lora_B(lora_A(dropout(x)))``.

    Args:
        base_layer: the linear to adapt (``nn.Linear`` or ``bitsandbytes.nn.Linear4bit``); its
            parameters are frozen (``requires_grad=False``).
        r: the rank of the update.
        alpha: the update is scaled by ``alpha / r``.
        dropout: dropout probability on the adapter's input only (the base path sees ``x``).
        init: how ``A`` starts: "kaiming" (uniform, a=sqrt(5), PEFT's default, i.e. bound
            1/sqrt(in_features)) or "gaussian" (normal with std 1/r). ``B`` always starts at zero.
        dtype: dtype of ``A`` and ``B`` (float32 by default, whatever the base's dtype).
        generator: optional random generator, for a reproducible ``A``.
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 init: str = "kaiming", dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):  # Linear4bit subclasses nn.Linear too
            raise TypeError(f"LoRALinear wraps a linear layer, got {type(base_layer).__name__}")
        if r <= 0:
            raise ValueError(f"r={r}: the rank must be a positive integer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout}: expected a probability in [0, 1)")
        self.base_layer = base_layer.requires_grad_(False)
        if is_4bit(base_layer):  # bitsandbytes' CPU fast path would block gradients (see quant.py)
            disable_cpu_packing_(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scaling = alpha / r
        self.lora_dropout = BitsDropout(dropout) if dropout > 0 else nn.Identity()
        # Built and initialised on the CPU (so a seeded CPU generator gives the same A on every
        # device), then moved next to the base weight.
        self.lora_A = nn.Linear(self.in_features, r, bias=False, dtype=dtype, device="cpu")
        self.lora_B = nn.Linear(r, self.out_features, bias=False, dtype=dtype, device="cpu")
        self.reset_lora_parameters(init, generator)
        self.lora_A.to(base_layer.weight.device)
        self.lora_B.to(base_layer.weight.device)
        self.merged = False
        self.disabled = False
        # merge() of a 4-bit base keeps the original quantized weight here, so that unmerge() can
        # restore it exactly. A plain dict, because assigning a Parameter to a module attribute
        # would register it (it would then show up in parameters() and state_dict()).
        self._premerge: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming", generator: torch.Generator | None = None) -> None:
        """A random (so B gets gradients), B zero (so the wrapped layer starts equal to the base)."""
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r, generator=generator)
        else:
            raise ValueError(f"init={init!r}: expected one of {INITS}")
        nn.init.zeros_(self.lora_B.weight)

    # --- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged or self.disabled:
            if self.merged and self.disabled:
                raise RuntimeError("a merged LoRA layer cannot be disabled (its update is inside the "
                                   "base weight): unmerge first")
            return result
        # The adapter runs in its own dtype (float32), and the sum is rounded once, at the end.
        # Under autocast the matmuls run in bf16 whatever the input's dtype, so the cast is skipped.
        h = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(h)) * self.scaling
        return (result + update).to(result.dtype)

    # --- merging ------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """ΔW = (alpha / r) · B A, shape (out_features, in_features), in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def base_weight(self) -> torch.Tensor:
        """The base weight as a full-precision tensor (dequantized if 4-bit), without ΔW unless
        merged. A copy for 4-bit bases, the parameter itself otherwise."""
        w = self.base_layer.weight
        return dequantize_4bit_weight(w) if is_4bit(self.base_layer) else w

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + ΔW, so the forward is one matmul. Do not train A/B while merged.

        For a full-precision base this is an in-place add, computed in float32 and rounded once
        to W's dtype. For a 4-bit base, W is dequantized, ΔW added, and the sum quantized again
        into a new NF4 weight with the same settings: that re-quantization is lossy (its error is
        of the same order as the original quantization error), so the original quantized weight
        is kept in ``_premerge`` for an exact ``unmerge``.
        """
        if self.merged:
            return
        if is_4bit(self.base_layer):
            old = self.base_layer.weight
            merged = dequantize_4bit_weight(old).float() + self.delta_weight().to(old.device)
            self._premerge["weight"] = old
            self.base_layer.weight = quantize_4bit_like(merged, old, module=self.base_layer)
        else:
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: W ← W − ΔW (full precision: exact up to float rounding, i.e. ~1e-7
        relative in float32 but ~1e-2 in bf16), or put back the saved 4-bit weight (exact)."""
        if not self.merged:
            return
        if is_4bit(self.base_layer):
            self.base_layer.weight = self._premerge.pop("weight")
        else:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, "
                f"merged={self.merged}, disabled={self.disabled}")
