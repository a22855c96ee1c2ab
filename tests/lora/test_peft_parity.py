"""Our LoRA against Hugging Face PEFT, run live (peft is a test-only reference).

The same tiny random Llama is built in transformers and in our code (one state dict); both get
LoRA with the same A and B. Logits must agree to 1e-5 (fp32), and adapter files must cross over
in both directions: ours loads in ``PeftModel.from_pretrained``, PEFT's ``save_pretrained``
output loads in ``load_adapter``. Adapters using PEFT features we do not implement are refused.
"""
from __future__ import annotations

import pytest
import torch

from lora import AdapterError, format_trainable, inject_lora, load_adapter, lora_layers, save_adapter
from model import Llama, LlamaConfig
from tests.lora.common import max_diff, randomize_lora, token_ids

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {  # (config overrides, targets)
    "mha-attention": (dict(num_attention_heads=4, num_key_value_heads=4), ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "gqa-tied-all-linear": (dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), ALL7),
}
IDS = token_ids(vocab=211)


def hf_and_ours(overrides: dict, seed: int = 0):
    """The same random weights as a transformers LlamaForCausalLM and as our Llama, both fp32."""
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    kw = dict(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              max_position_embeddings=128, initializer_range=0.1)
    hf = LlamaForCausalLM(HFConfig(**kw, **overrides)).eval()
    ours = Llama(LlamaConfig.from_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def peft_wrap(hf, r: int, alpha: float, targets: list[str], **extra):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                             task_type="CAUSAL_LM", **extra)
    return peft.get_peft_model(hf, config).eval()


@torch.no_grad()
def copy_ours_into_peft(ours, pm) -> None:
    params = dict(pm.named_parameters())
    for name, layer in lora_layers(ours):
        params[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.lora_A.weight)
        params[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B.weight)


@pytest.mark.parametrize("case", list(CASES))
def test_same_adapter_same_logits_and_counts(case, capsys):
    overrides, targets = CASES[case]
    hf, ours = hf_and_ours(overrides)
    report = inject_lora(ours, targets=targets, r=4, alpha=8, dropout=0.0, seed=0)
    randomize_lora(ours)
    pm = peft_wrap(hf, 4, 8, targets)
    copy_ours_into_peft(ours, pm)
    with torch.no_grad():
        diff = max_diff(pm(IDS).logits, ours(IDS))
    assert diff < 1e-5, diff
    assert (report["trainable"], report["total"]) == pm.get_nb_trainable_parameters()
    pm.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == format_trainable(report)


def test_peft_loads_our_adapter(tmp_path):
    overrides, targets = CASES["gqa-tied-all-linear"]
    hf, ours = hf_and_ours(overrides)
    inject_lora(ours, targets=targets, r=4, alpha=8, dropout=0.05, seed=0)
    randomize_lora(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path="tiny-random-llama")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    cfg = pm.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, set(cfg.target_modules), cfg.lora_dropout) == (4, 8, set(targets), 0.05)
    with torch.no_grad():
        diff = max_diff(pm(IDS).logits, ours(IDS))
    assert diff < 1e-5, diff


def test_we_load_peft_adapter(tmp_path):
    overrides, targets = CASES["mha-attention"]
    hf, ours = hf_and_ours(overrides)
    pm = peft_wrap(hf, 8, 16, ["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        expected = pm(IDS).logits
    pm.save_pretrained(tmp_path)  # PEFT's full config: dozens of fields, most off
    cfg = load_adapter(ours, tmp_path)  # injects q/v LoRA as the config says, then loads
    assert cfg["r"] == 8 and {name.rsplit(".", 1)[1] for name, _ in lora_layers(ours)} == {"q_proj", "v_proj"}
    with torch.no_grad():
        diff = max_diff(ours(IDS), expected)
    assert diff < 1e-5, diff


@pytest.mark.parametrize("feature", ["use_dora", "use_rslora"])
def test_peft_adapters_with_unsupported_math_are_refused(tmp_path, feature):
    hf, ours = hf_and_ours(CASES["mha-attention"][0])
    peft_wrap(hf, 4, 8, ["q_proj"], **{feature: True}).save_pretrained(tmp_path)
    with pytest.raises(AdapterError, match=feature):
        load_adapter(ours, tmp_path)
    assert not list(lora_layers(ours)), "a refused adapter must leave the model untouched"
