"""The training loss straight from the last hidden states: output head + cross-entropy, fused.

The plain way (``data.batching.masked_lm_loss``, the definition this module must equal) is

    logits = lm_head(h)                      # (B, T, vocab): for SmolLM2, 8 x 256 x 49152
    loss = cross_entropy(logits[:, :-1].float(), labels[:, 1:], ignore_index=-100)

and on a CPU most of its time is not the head's matmul but memory traffic around it: the bf16
logits, their float32 copy, the log-softmax and its gradient (each 400 MB at that size), the
zero-filled gradient buffers of the slice and of the one-hot. Measured on SmolLM2-135M, batch
8 x 256: ~0.95 s of a 3.6 s LoRA training step.

This module computes the same loss and its gradient in one pass over chunks of rows (the idea of
Liger-Kernel's fused linear cross-entropy, and of torchtune's chunked loss):

    for each chunk of target positions:
        z = h_chunk @ W^T                     (the logits of a few hundred rows only)
        loss += logsumexp(z) - z[target]
        dL/dz = softmax(z) - onehot(target)   (computed in place over z)
        dL/dh_chunk = dL/dz @ W               (kept: (rows, hidden), small)

so the backward pass has nothing left to do but scale the stored dL/dh. Two more savings fall out:
only the positions that carry a label are ever put through the head (the prompt positions of a
"loss on the target only" batch are skipped entirely), and memory holds one chunk of logits
instead of the whole (B, T, vocab) tensor.

The head's weight must be frozen (it is, in LoRA training): its gradient is not computed.
Numerics follow autocast: under bf16 autocast the logits come from a bf16 matmul and are then
upcast to float32 for the softmax, exactly as ``lm_head`` + ``.float()`` would do.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Rows of logits alive at once. For SmolLM2 a chunk's float32 logits are 1024 x 49152 x 4 bytes =
# 200 MB, and with the bf16 matmul output and logsumexp's temporaries the peak is ~3x that.
CHUNK_ROWS = 1024


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's if it is on (as nn.Linear would), else W's."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return weight.dtype


class _FusedHeadCrossEntropy(torch.autograd.Function):
    """Sum over rows of -log softmax(h W^T)[target]; the gradient w.r.t. h is made in forward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        dtype = _compute_dtype(h, weight)
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=dtype, device=h.device) if h.requires_grad else None
        with torch.autocast(h.device.type, enabled=False):  # dtypes are chosen explicitly here
            for i in range(0, h.shape[0], chunk_rows):
                z = (h[i:i + chunk_rows].to(dtype) @ w.T).float()  # (rows, vocab) float32 logits
                t = targets[i:i + chunk_rows]
                lse = torch.logsumexp(z, dim=-1)
                total += (lse - z.gather(1, t[:, None]).squeeze(1)).sum()
                if grad_h is not None:
                    z.sub_(lse[:, None]).exp_()  # softmax(z), in place
                    z[torch.arange(len(t), device=z.device), t] -= 1.0
                    grad_h[i:i + chunk_rows] = z.to(dtype) @ w
        ctx.save_for_backward(grad_h)
        ctx.h_dtype = h.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return grad_h.to(ctx.h_dtype) * grad_out, None, None, None


def fused_lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                  reduction: str = "sum", chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Next-token cross-entropy over labelled positions, from the final (normed) hidden states.

    Args:
        hidden: (B, T, hidden) output of the last RMSNorm (``model(..., return_hidden=True)``).
        head_weight: (vocab, hidden) weight of the output head, frozen.
        labels: (B, T) token ids, -100 where there is no loss; position t's hidden state
            predicts ``labels[:, t + 1]``, as in ``masked_lm_loss``.
        reduction: "sum" (what gradient accumulation wants) or "mean" over labelled tokens.
    Returns the same value, and the same gradient w.r.t. ``hidden``, as
    ``masked_lm_loss(lm_head(hidden), labels, reduction)``, up to float rounding (one exception:
    with no labelled position at all, "mean" gives 0 where cross_entropy gives NaN).
    """
    if head_weight.requires_grad:
        raise ValueError("fused_lm_loss does not compute the head's gradient: freeze it, or use "
                         "masked_lm_loss(model(...), labels)")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r}: expected 'sum' or 'mean'")
    shifted = labels[:, 1:]
    keep = shifted != IGNORE_INDEX
    rows = hidden[:, :-1][keep]  # (N, hidden): only the positions that are graded
    total = _FusedHeadCrossEntropy.apply(rows, head_weight, shifted[keep], chunk_rows)
    if reduction == "mean":
        return total / keep.sum().clamp(min=1)
    return total
