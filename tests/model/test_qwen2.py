"""Qwen2 in our Llama: parity with transformers' Qwen2ForCausalLM on tiny random checkpoints.

Qwen2 differs from Llama by biases on q/k/v (config.qkv_bias); these tiny models also cover GQA,
an untied head, a head dim other than hidden/heads, rope theta 1e6 and eps 1e-6. Each checkpoint
is written by transformers' ``save_pretrained`` and read by our ``load_model``, so the config keys
transformers writes (rope_parameters, layer_types, sliding-window fields) are exercised too.
"""
from __future__ import annotations

import json

import pytest
import torch

from model import load_model
from model.config import ConfigError, LlamaConfig
from model.load import save_model
from model.sampling import generate_tokens
from tests.tiny import tiny_spm_bytes

transformers = pytest.importorskip("transformers")

CASES = {
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "gqa-head-dim-32": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32),
}
PROMPTS = [[5, 77, 301, 12, 9, 400, 33], [250, 17, 3], [8, 8, 120, 45, 46, 47, 48, 49, 50, 200]]


def make_qwen2(folder, seed: int = 0, std: float = 0.1, **overrides):
    """A random transformers Qwen2ForCausalLM saved to ``folder`` (+ a tiny tokenizer.model).
    Biases get large random values (transformers initialises them to zero, which would hide a
    missing bias)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1e6, initializer_range=std)
    hf = Qwen2ForCausalLM(Qwen2Config(**{**kw, **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    hf.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(tiny_spm_bytes(512))
    return hf


def hf_greedy(hf, rows: list[list[int]], n: int) -> list[list[int]]:
    """transformers' greedy decoding of left-padded prompts, exactly n new tokens each."""
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, width:].tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_match_transformers(case, tmp_path):
    hf = make_qwen2(tmp_path, **CASES[case])
    ours, _ = load_model(tmp_path, device="cpu")  # float32 on CPU
    assert ours.config.model_type == "qwen2" and ours.config.qkv_bias
    assert ours.model.layers[0].self_attn.q_proj.bias is not None
    assert ours.model.layers[0].self_attn.o_proj.bias is None
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == CASES[case].get("tie_word_embeddings", False)
    ids = torch.tensor([PROMPTS[0] * 3])
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff < 1e-4, diff
    with torch.no_grad():
        ref = hf_greedy(hf, PROMPTS, 8)
    assert generate_tokens(ours, PROMPTS, 8, pad_id=0) == ref


def test_saved_folder_reads_back_in_transformers(tmp_path):
    """save_model writes a config.json transformers reads as Qwen2ForCausalLM, same logits."""
    from transformers import Qwen2ForCausalLM
    make_qwen2(tmp_path / "hf", **CASES["gqa-untied"])
    ours, _ = load_model(tmp_path / "hf", device="cpu")
    save_model(ours, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    back = Qwen2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        assert (back(ids).logits - ours(ids)).abs().max().item() < 1e-5


def test_nf4_keeps_biases_and_predictions(tmp_path):
    """NF4 quantizes the q/k/v weights; their biases stay exact (in bf16)."""
    import bitsandbytes as bnb
    hf = make_qwen2(tmp_path, std=0.02, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                    num_key_value_heads=2)
    ref, _ = load_model(tmp_path, dtype="bf16", device="cpu")
    q, _ = load_model(tmp_path, quantize="nf4", device="cpu")
    lin = q.model.layers[1].self_attn.k_proj
    assert isinstance(lin, bnb.nn.Linear4bit) and lin.bias.dtype == torch.bfloat16
    assert torch.equal(lin.bias, hf.model.layers[1].self_attn.k_proj.bias.detach().to(torch.bfloat16))
    assert q.model.layers[0].self_attn.o_proj.bias is None
    ids = torch.tensor([PROMPTS[0] + PROMPTS[2]])
    with torch.no_grad():
        a, b = ref(ids).float().flatten(), q(ids).float().flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.95
    assert len(generate_tokens(q, PROMPTS, 4, pad_id=0)[0]) == 4  # the packed CPU 4-bit path, with bias


def test_lora_on_biased_linears_matches_peft(tmp_path):
    """LoRA over q/k/v-with-bias: same logits as PEFT on transformers' Qwen2; merging and export
    keep the biases."""
    peft = pytest.importorskip("peft")
    from lora import inject_lora, lora_layers
    from lora.export import export_merged
    from tests.lora.common import randomize_lora

    hf = make_qwen2(tmp_path / "base", **CASES["gqa-untied"])
    ours, _ = load_model(tmp_path / "base", device="cpu")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    inject_lora(ours, targets=targets, r=4, alpha=8, dropout=0.0, seed=0)
    randomize_lora(ours)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                                 task_type="CAUSAL_LM")).eval()
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            params[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.lora_A.weight)
            params[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B.weight)
    ids = torch.tensor(PROMPTS[:1])
    with torch.no_grad():
        with_lora = ours(ids)
        assert (pm(ids).logits - with_lora).abs().max().item() < 1e-5
    export_merged(ours, tmp_path / "merged", dtype=torch.float32)
    (tmp_path / "merged" / "tokenizer.model").write_bytes(tiny_spm_bytes(512))
    merged, _ = load_model(tmp_path / "merged", device="cpu")
    with torch.no_grad():
        assert (merged(ids) - with_lora).abs().max().item() < 1e-4


def test_config_switches():
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2)
    assert not LlamaConfig.from_dict({**base, "model_type": "llama"}).qkv_bias
    assert LlamaConfig.from_dict({**base, "architectures": ["Qwen2ForCausalLM"]}).model_type == "qwen2"
    # Qwen2.5's released configs: a window size, but switched off -> full attention, accepted.
    cfg = LlamaConfig.from_dict({**base, "model_type": "qwen2", "use_sliding_window": False,
                                 "sliding_window": 32768, "max_window_layers": 21})
    assert cfg.qkv_bias and cfg.to_dict()["architectures"] == ["Qwen2ForCausalLM"]
    with pytest.raises(ConfigError, match=r"sliding-window attention\) is not implemented"):
        LlamaConfig.from_dict({**base, "model_type": "qwen2", "use_sliding_window": True,
                               "sliding_window": 4, "max_window_layers": 1})
    # switched on, but no layer at or past max_window_layers: still full attention everywhere
    assert LlamaConfig.from_dict({**base, "model_type": "qwen2", "use_sliding_window": True,
                                  "max_window_layers": 2}).qkv_bias
