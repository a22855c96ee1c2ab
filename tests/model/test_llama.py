"""The hand-written Llama against Hugging Face transformers' LlamaForCausalLM, run live.

Parity (fp32 logits within 1e-4, greedy tokens identical), exactness of the KV cache and of
left-padded batching, on tiny random configs of the Llama-2 shape family and the real
stories260K model.
"""
from __future__ import annotations

import pytest
import torch

from model import Llama, LlamaConfig
from model.sampling import generate_tokens
from tests.tiny import SHARED, needs_shared

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # Llama-2-7B's family: multi-head attention, untied head
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    # TinyLlama / Llama-2-70B style grouped-query attention
    "gqa-untied": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    # SmolLM2 style: GQA (3:1), tied embeddings, rope theta 1e5
    "gqa-tied": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96, tie_word_embeddings=True,
                     rope_theta=100000.0),
}


def hf_and_ours(name: str, seed: int = 0):
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    kw = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
              max_position_embeddings=256, initializer_range=0.1)
    kw.update(CONFIGS[name])
    hf = LlamaForCausalLM(HFConfig(**kw)).eval()
    ours = Llama(LlamaConfig.from_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def hf_stories():
    from transformers import LlamaForCausalLM
    from model import load_model
    hf = LlamaForCausalLM.from_pretrained(SHARED / "models/stories260K", dtype=torch.float32).eval()
    ours, tok = load_model(SHARED / "models/stories260K", dtype=torch.float32, device="cpu")
    return hf, ours, tok


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    hf, ours = hf_and_ours(name)
    ids = torch.randint(0, 211, (3, 40))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_transformers_generate(name):
    hf, ours = hf_and_ours(name)
    prompt = torch.randint(3, 211, (1, 7))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    mine = generate_tokens(ours, [prompt[0].tolist()], max_new_tokens=20, pad_id=0)
    assert mine[0] == ref[0, 7:].tolist()


@needs_shared
def test_stories260k_logits_and_greedy_match_transformers():
    hf, ours, tok = hf_stories()
    ids = torch.tensor([tok.encode("Once upon a time, there was a little girl named Lily.", bos=True)])
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
        ref = hf.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert diff < 1e-4, diff
    mine = generate_tokens(ours, [ids[0].tolist()], max_new_tokens=40, pad_id=0)
    assert mine[0] == ref[0, ids.shape[1]:].tolist()
    assert "Lily" in tok.decode(mine[0]) or len(set(mine[0])) > 10  # a real story, not a loop


def test_kv_cache_prefill_plus_decode_equals_full_forward():
    _, m = hf_and_ours("gqa-tied")
    ids = torch.randint(0, 211, (2, 24))
    with torch.no_grad():
        full = m(ids)
        m.setup_cache(2, 24)
        steps = [m(ids[:, :10], start_pos=0)]  # prefill 10 tokens
        for t in range(10, 24):  # then one token at a time
            steps.append(m(ids[:, t:t + 1], start_pos=t))
        m.clear_cache()
    cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max().item() < 1e-5


def test_kv_cache_chunked_prefill_is_causal():
    _, m = hf_and_ours("mha-untied")
    ids = torch.randint(0, 211, (1, 16))
    with torch.no_grad():
        full = m(ids)
        m.setup_cache(1, 16)
        a = m(ids[:, :6], start_pos=0)
        b = m(ids[:, 6:], start_pos=6)  # a block of queries after cached keys
        m.clear_cache()
    assert (torch.cat([a, b], 1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["mha-untied", "gqa-tied"])
def test_left_padded_batch_equals_each_prompt_alone(name):
    _, m = hf_and_ours(name)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 211, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    batched = generate_tokens(m, rows, max_new_tokens=15, pad_id=0)
    alone = [generate_tokens(m, [r], max_new_tokens=15, pad_id=0)[0] for r in rows]
    assert batched == alone


def test_left_padded_logits_equal_unpadded():
    _, m = hf_and_ours("gqa-untied")
    ids = torch.randint(3, 211, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        a = m(ids)
        b = m(padded, attention_mask=mask)[:, 4:]
    assert (a - b).abs().max().item() < 1e-5


def test_stop_ids_end_a_row_without_the_stop_token():
    _, m = hf_and_ours("mha-untied")
    free = generate_tokens(m, [[5, 6, 7]], max_new_tokens=12, pad_id=0)[0]
    stop = free[4]
    cut = generate_tokens(m, [[5, 6, 7]], max_new_tokens=12, pad_id=0, stop_ids=[stop])[0]
    assert cut == free[:free.index(stop)]


def test_config_maps_real_configs():
    llama2_7b = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                     intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32,
                     num_key_value_heads=32, rms_norm_eps=1e-5, vocab_size=32000, rope_scaling=None,
                     tie_word_embeddings=False, torch_dtype="float16")
    c = LlamaConfig.from_dict(llama2_7b)
    assert (c.head_dim, c.num_key_value_heads, c.rope_theta) == (128, 32, 10000.0)
    tinyllama = dict(llama2_7b, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                     num_key_value_heads=4, num_hidden_layers=22)
    assert LlamaConfig.from_dict(tinyllama).num_key_value_heads == 4
    v5 = dict(llama2_7b, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})
    assert LlamaConfig.from_dict(v5).rope_theta == 100000.0


@pytest.mark.parametrize("T", [1, 3], ids=["one-query", "with-drafts"])
@pytest.mark.parametrize("heads, kv_heads", [(12, 2), (4, 4)], ids=["gqa", "mha"])
def test_decode_attention_equals_sdpa(heads, kv_heads, T):
    """The CPU decode step's attention (model.llama.decode_attention) against SDPA on the same
    inputs, with a boolean and an additive mask, for one query per row and for a token with two
    drafts after it: float32 to rounding; in bf16 as close to the exact (float64) result as SDPA."""
    import torch.nn.functional as F
    from model.llama import decode_attention
    g = torch.Generator().manual_seed(0)
    B, D, S = 3, 16, 40
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((heads, T), (kv_heads, S), (kv_heads, S)))
    sees = torch.rand(B, 1, T, S, generator=g) > 0.3
    sees &= torch.arange(S) <= torch.arange(S - T, S)[:, None]  # causal within the T queries
    sees[..., 0] = True  # every query sees something
    additive = torch.zeros(B, 1, T, S).masked_fill(~sees, float("-inf"))
    rep = heads // kv_heads
    exact = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(rep, 1),
                                           v.double().repeat_interleave(rep, 1), attn_mask=sees)
    for mask in (sees, additive, None) if T == 1 else (sees, additive):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=rep > 1)
        assert torch.allclose(decode_attention(q, k, v, mask), want, atol=1e-6)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    ours = (decode_attention(qb, kb, vb, additive.bfloat16()).double() - exact).abs().max()
    sdpa = (F.scaled_dot_product_attention(qb, kb, vb, attn_mask=sees, enable_gqa=rep > 1).double() - exact).abs().max()
    assert ours <= sdpa * 1.5 + 1e-3


@pytest.mark.parametrize("T", [1, 3], ids=["one-query", "with-drafts"])
@pytest.mark.parametrize("heads, kv_heads", [(12, 2), (4, 4)], ids=["gqa", "mha"])
def test_decode_attention_with_a_shared_prefix_equals_attention_over_a_copy_per_row(heads, kv_heads, T):
    """A decode step whose rows share a prefix kept once (KVCache.prefix, as the engine keeps the
    rating prompts' instructions) attends as SDPA does over each row's own copy of it followed
    by the row's keys: float32 to rounding, in bf16 (float32 caches, as the engine's CPU cache)
    as close to the exact result as SDPA."""
    import torch.nn.functional as F
    from model.llama import decode_attention
    g = torch.Generator().manual_seed(1)
    B, D, P, S = 3, 16, 25, 9
    q = torch.randn(B, heads, T, D, generator=g)
    pk, pv = (torch.randn(1, kv_heads, P, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, kv_heads, S, D, generator=g) for _ in range(2))
    sees = torch.rand(B, 1, T, S, generator=g) > 0.3
    sees &= torch.arange(S) <= torch.arange(S - T, S)[:, None]  # causal within the T queries
    sees[..., 0] = True
    additive = torch.zeros(B, 1, T, S).masked_fill(~sees, float("-inf"))
    full_k, full_v = torch.cat([pk.expand(B, -1, -1, -1), k], 2), torch.cat([pv.expand(B, -1, -1, -1), v], 2)
    full_mask = torch.cat([torch.ones(B, 1, T, P, dtype=torch.bool), sees], -1)
    rep = heads // kv_heads
    want = F.scaled_dot_product_attention(q, full_k, full_v, attn_mask=full_mask, enable_gqa=rep > 1)
    assert torch.allclose(decode_attention(q, k, v, additive, (pk, pv)), want, atol=1e-6)
    assert torch.allclose(decode_attention(q, k, v, sees, (pk, pv)), want, atol=1e-6)
    exact = F.scaled_dot_product_attention(q.double(), full_k.double().repeat_interleave(rep, 1),
                                           full_v.double().repeat_interleave(rep, 1), attn_mask=full_mask)
    ours = (decode_attention(q.bfloat16(), k.bfloat16().float(), v.bfloat16().float(), additive.bfloat16(),
                                (pk.bfloat16().float(), pv.bfloat16().float())).double() - exact).abs().max()
    sdpa = (F.scaled_dot_product_attention(q.bfloat16(), full_k.bfloat16(), full_v.bfloat16(), attn_mask=full_mask,
                                           enable_gqa=rep > 1).double() - exact).abs().max()
    assert ours <= sdpa * 1.5 + 1e-3


def test_a_cache_prefix_serves_decode_steps_only():
    """A block of queries (prefill) against a cache holding a shared prefix would need the prefix
    in SDPA's keys; the engine never does it, and the model says so rather than ignore the prefix."""
    from model.llama import Attention, KVCache
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    attn = Attention(cfg)
    attn.cache = KVCache(1, 8, 1, cfg.head_dim, torch.float32, "cpu")
    attn.cache.prefix = (torch.zeros(1, 1, 4, cfg.head_dim), torch.zeros(1, 1, 4, cfg.head_dim))
    x, cos, sin = torch.zeros(1, 3, 16), torch.ones(1, 1, 3, cfg.head_dim), torch.zeros(1, 1, 3, cfg.head_dim)
    with pytest.raises(ValueError, match="decode steps"):
        attn(x, cos, sin, None, 0)
