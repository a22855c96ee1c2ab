"""Putting LoRA layers into a Llama, and taking them out again.

``inject_lora`` swaps chosen projections of every decoder block for ``LoRALinear`` wrappers and
freezes everything else, so an optimizer given ``lora_parameters(model)`` trains only the
adapters. The wrapped module keeps its name (``model.layers.0.self_attn.q_proj``) and the base
weight moves one level down (``...q_proj.base_layer.weight``), exactly as in PEFT, so adapter
files use the same key names as the ecosystem (see ``adapter.py``).

The rest are the lifecycle operations: ``merge_lora`` / ``unmerge_lora`` (fold the update into
the base weights and back), ``unwrap_lora`` (remove the wrappers), ``disable_lora`` (evaluate the
base model without removing anything).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from .layer import INITS, LoRALinear
from .quant import disable_cpu_packing_, is_4bit

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the attention projections (QLoRA
# and the LoRA paper adapt attention; "all-linear" adds the MLP, as QLoRA recommends for quality)


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: ``model.model.layers`` in a Llama (Hugging Face layout)."""
    try:
        return model.model.layers
    except AttributeError:
        raise TypeError(f"{type(model).__name__} has no model.layers: inject_lora expects a Llama-style "
                        f"causal LM (model.model.layers[i].self_attn/mlp)") from None


def block_linear_names(model: nn.Module) -> list[str]:
    """The short names of the linears inside the decoder blocks, in model order
    (for our Llama: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)."""
    names: dict[str, None] = {}
    for block in _blocks(model):
        for name, module in block.named_modules():
            if isinstance(module, (nn.Linear, LoRALinear)) and not name.endswith(("base_layer", "lora_A", "lora_B")):
                names[name.rpartition(".")[2]] = None
    return list(names)


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Check ``targets`` against the model and return them in model order.

    "all-linear" means every linear in the blocks (never ``lm_head``, as in PEFT). A name that
    matches no module is an error: a typo ("qproj") would otherwise train nothing, silently."""
    valid = block_linear_names(model)
    if isinstance(targets, str):
        targets = [targets]
    if "all-linear" in targets:  # also accepted inside a list, e.g. from a command line
        targets = valid
    if not targets:
        raise ValueError(f"no LoRA targets given; valid names: {valid} or 'all-linear'")
    for t in targets:
        if t not in valid:
            raise ValueError(f"LoRA target {t!r} matches no linear in the decoder blocks; "
                             f"valid names: {valid} or 'all-linear'")
    return [v for v in valid if v in set(targets)]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every ``(qualified_name, LoRALinear)`` in the model, in order."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (every A and B): what the optimizer should get."""
    return [p for _, layer in lora_layers(model) for p in (layer.lora_A.weight, layer.lora_B.weight)]


def _numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for. A 4-bit ``Params4bit`` packs two weights per byte of its
    storage dtype, so its element count understates the layer (PEFT counts it the same way)."""
    if type(p).__name__ == "Params4bit":
        return p.numel() * 2 * p.element_size()
    return p.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` over unique parameters (tied embeddings count once)."""
    trainable = total = 0
    for p in model.parameters():  # parameters() yields a shared (tied) tensor only once
        n = _numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def format_trainable(report: dict) -> str:
    """PEFT's one-line summary: ``trainable params: X || all params: Y || trainable%: Z``."""
    t, a = report["trainable"], report["total"]
    return f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}"


def inject_lora(model: nn.Module, targets: str | Sequence[str] = DEFAULT_TARGETS, r: int = 8,
                alpha: float = 32, dropout: float = 0.05, init: str = "kaiming",
                seed: int | None = None) -> dict:
    """Wrap ``targets`` in every decoder block with ``LoRALinear`` and freeze all else, in place.

    Args:
        targets: short module names ("q_proj", ...) or "all-linear" (all seven block linears).
        r, alpha, dropout, init: see ``LoRALinear``.
        seed: makes the random ``A`` matrices reproducible (without touching the global RNG).

    Returns ``{"trainable": int, "total": int, "targets": [...], "layers": n_wrapped, "r": r,
    "alpha": alpha}``; ``format_trainable(report)`` prints it the way PEFT does.
    """
    if any(True for _ in lora_layers(model)):
        raise ValueError("the model already has LoRA layers: unwrap_lora(model) before injecting again")
    if init not in INITS:
        raise ValueError(f"init={init!r}: expected one of {INITS}")
    names = resolve_targets(model, targets)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model.requires_grad_(False)  # freeze the base: embeddings, norms, head and every linear
    for module in model.modules():
        if is_4bit(module):  # gradients must pass through every 4-bit layer (see quant.py)
            disable_cpu_packing_(module)
    wrapped = 0
    for block in _blocks(model):
        for parent in list(block.modules()):
            for child_name, child in list(parent.named_children()):
                if child_name in names and isinstance(child, nn.Linear):
                    lora = LoRALinear(child, r=r, alpha=alpha, dropout=dropout, init=init, generator=generator)
                    lora.train(child.training)  # new modules start in training mode (dropout on!)
                    setattr(parent, child_name, lora)
                    wrapped += 1
    trainable, total = count_parameters(model)
    return {"trainable": trainable, "total": total, "targets": names, "layers": wrapped, "r": r, "alpha": alpha}


# ------------------------------------------------------------------------------------------
# Merging, unwrapping, disabling
# ------------------------------------------------------------------------------------------
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (W += alpha/r · B A); returns how many layers.
    4-bit bases are re-quantized (lossy; see ``LoRALinear.merge``)."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo ``merge_lora``: full-precision bases subtract ΔW again (exact up to rounding), 4-bit
    bases get their saved pre-merge weight back (exact). Returns how many layers."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.unmerge()
    return len(layers)


def unwrap_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every ``LoRALinear`` by its base layer, in place, and return the model.

    merge=True keeps what was learned (the update is folded into the base weight first);
    merge=False throws the adapters away and gives back the original base model."""
    for name, layer in list(lora_layers(model)):
        layer.merge() if merge else layer.unmerge()
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.base_layer)
    return model


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_lora(model): ...`` runs the base model (every adapter skipped), e.g. to
    compare the fine-tuned model with where it started. Flags are restored on exit."""
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise RuntimeError("disable_lora: some LoRA layers are merged into their base weights; "
                           "unmerge_lora(model) first")
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, before):
            layer.disabled = flag
