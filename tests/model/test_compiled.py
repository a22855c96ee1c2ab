"""The compiled decode step (``generate_tokens(..., compile=True)``, model/compiled.py) against the
eager sampler: same greedy tokens on a tiny random model, one compile serving batches of other
prompt lengths and sizes, fresh weights noticed, and LoRA models left eager.

fp32, so that eager and compiled arithmetic agree closely enough for identical argmaxes. Each test
compiles a 2-layer model (~10 s on 2 CPU cores).
"""
from __future__ import annotations

import pytest
import torch

from model import Llama, LlamaConfig
from model import compiled
from model.sampling import generate_tokens
from tests.tiny import tiny_config


def tiny_llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    cfg = LlamaConfig.from_dict(tiny_config(vocab_size=211, hidden_size=96, num_attention_heads=6,
                                            num_key_value_heads=2, tie_word_embeddings=True))
    m = Llama(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.1) if p.dim() > 1 else p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return m


def random_rows(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 211, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", autouse=True)
def fresh_compiler():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


@pytest.fixture(scope="module")
def model():
    """Shared, so that the tests reuse one compiled program (compiling takes most of their time)."""
    return tiny_llama()


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_greedy_equals_eager_and_compiles_once(model):
    m = model
    rows = random_rows((3, 11, 7, 1))  # left padding of different lengths
    before = graphs_compiled()
    assert generate_tokens(m, rows, 20, pad_id=0, compile=True) == generate_tokens(m, rows, 20, pad_id=0)
    # another call, other prompt lengths and fewer rows (padded to the compiled batch of 4):
    # the same compiled program serves it, the same tokens come out
    rows = random_rows((5, 2, 9), seed=2)
    assert generate_tokens(m, rows, 12, pad_id=0, compile=True) == generate_tokens(m, rows, 12, pad_id=0)
    assert graphs_compiled() - before == 1


def test_stop_ids_with_compile(model):
    m = model
    rows = random_rows((4, 6))  # padded to the compiled batch of 4
    free = generate_tokens(m, rows, 12, pad_id=0)
    stop = free[0][5]
    assert generate_tokens(m, rows, 12, pad_id=0, stop_ids=[stop], compile=True) == \
        generate_tokens(m, rows, 12, pad_id=0, stop_ids=[stop])


def test_weights_changed_in_place_are_used():
    m = tiny_llama(seed=0)
    rows = random_rows((6, 3))
    first = generate_tokens(m, rows, 10, pad_id=0, compile=True)
    # the frozen program holds copies of the old weights: new ones must be noticed
    m.load_state_dict(tiny_llama(seed=3).state_dict())
    again = generate_tokens(m, rows, 10, pad_id=0, compile=True)
    assert again == generate_tokens(m, rows, 10, pad_id=0)
    assert again != first


def test_lora_model_stays_eager():
    from lora.inject import inject_lora
    m = tiny_llama()
    inject_lora(m, r=4, init="kaiming", seed=0)
    m.eval()
    assert not compiled.supported(m)
    before = graphs_compiled()
    rows = random_rows((4, 2))
    assert generate_tokens(m, rows, 6, pad_id=0, compile=True) == generate_tokens(m, rows, 6, pad_id=0)
    assert graphs_compiled() == before
