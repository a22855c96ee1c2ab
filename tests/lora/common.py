"""Shared helpers for the LoRA tests: a tiny random fp32 Llama in memory, non-zero adapters."""
from __future__ import annotations

import torch

from lora import lora_layers
from model import Llama, LlamaConfig
from tests.tiny import tiny_config


def tiny_llama(seed: int = 0, **overrides) -> Llama:
    """A random fp32 Llama of the tests.tiny shape family (2 blocks, GQA 4:2, hidden 64), eval mode."""
    torch.manual_seed(seed)
    net = Llama(LlamaConfig.from_dict(tiny_config(**overrides)))
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return net.eval()


@torch.no_grad()
def randomize_lora(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Give every A and B random non-zero values (B starts at zero, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        for p in (layer.lora_A.weight, layer.lora_B.weight):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def token_ids(batch: int = 2, length: int = 12, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
