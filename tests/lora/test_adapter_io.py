"""Saving and loading adapters in PEFT's format: round trip, file contents, and bad input.

Every bad adapter must fail with ``AdapterError`` (a ValueError) whose message names the file
at fault, and must leave the model as it was.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora import (AdapterError, inject_lora, load_adapter, lora_layers, read_adapter_config, save_adapter)
from tests.lora.common import randomize_lora, tiny_llama, token_ids

IDS = token_ids()


@pytest.fixture
def saved(tmp_path):
    """A model with random q/v adapters (r=4, alpha=8), saved to tmp_path/adapter."""
    model = tiny_llama()
    model.name_or_path = "some/base-model"
    inject_lora(model, targets=("q_proj", "v_proj"), r=4, alpha=8, dropout=0.1, seed=0)
    randomize_lora(model)
    folder = save_adapter(model, tmp_path / "adapter", extra_config={"humback_step": "backward"})
    return model, folder


def edit_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_round_trip_is_exact(saved):
    model, folder = saved
    fresh = tiny_llama()
    cfg = load_adapter(fresh, folder)
    with torch.no_grad():
        assert torch.equal(fresh(IDS), model(IDS))
    assert cfg["r"] == 4 and not fresh.training and all(not m.training for m in fresh.modules())
    for (_, a), (_, b) in zip(lora_layers(model), lora_layers(fresh)):
        assert torch.equal(a.lora_A.weight, b.lora_A.weight) and a.dropout == b.dropout == 0.1
        assert b.lora_A.weight.requires_grad  # ready to train further


def test_files_have_peft_names_and_fields(saved):
    _, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg == read_adapter_config(folder)
    expected = dict(peft_type="LORA", task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.1,
                    target_modules=["q_proj", "v_proj"], base_model_name_or_path="some/base-model",
                    bias="none", fan_in_fan_out=False, init_lora_weights=True, inference_mode=True,
                    modules_to_save=None, use_dora=False, use_rslora=False, humback_step="backward")
    assert cfg == expected
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight").shape == (32, 4)
    assert len(keys) == 2 * 2 * 2  # (A, B) x (q, v) x 2 blocks
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys


def test_saving_again_replaces_files_atomically(saved):
    model, folder = saved
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.weight.fill_(0.5)
    save_adapter(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert (tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] == 0.5).all()


def test_loading_into_matching_lora_layers_and_refusing_mismatched_ones(saved):
    model, folder = saved
    same = tiny_llama()
    inject_lora(same, targets=("q_proj", "v_proj"), r=4, alpha=8, seed=1)
    load_adapter(same, folder)
    with torch.no_grad():
        assert torch.equal(same(IDS), model(IDS))
    other_alpha = tiny_llama()
    inject_lora(other_alpha, targets=("q_proj", "v_proj"), r=4, alpha=16)
    with pytest.raises(AdapterError, match="lora_alpha=8"):
        load_adapter(other_alpha, folder)
    other_targets = tiny_llama()
    inject_lora(other_targets, targets=("q_proj",), r=4, alpha=8)
    with pytest.raises(AdapterError, match="target_modules"):
        load_adapter(other_targets, folder)


def test_missing_folder_and_files(saved, tmp_path):
    _, folder = saved
    with pytest.raises(AdapterError, match="no such adapter folder"):
        load_adapter(tiny_llama(), tmp_path / "nope")
    (folder / "adapter_model.safetensors").rename(tmp_path / "weights.safetensors")
    with pytest.raises(AdapterError, match="adapter_model.safetensors: missing"):
        load_adapter(tiny_llama(), folder)
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="pickle"):
        load_adapter(tiny_llama(), folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json: missing"):
        load_adapter(tiny_llama(), folder)


def test_r_that_does_not_match_the_weights(saved):
    _, folder = saved
    edit_config(folder, r=8)
    model = tiny_llama()
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors.*shape \(4, 64\).*\(8, 64\).*r=8"):
        load_adapter(model, folder)
    assert not list(lora_layers(model)), "a failed load must not leave LoRA layers behind"


def test_unknown_and_missing_tensors(saved):
    _, folder = saved
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}, str(path))
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors.*lm_head\.lora_A"):
        load_adapter(tiny_llama(), folder)
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, str(path))
    with pytest.raises(AdapterError, match=r"lacks 1 LoRA tensor.*layers\.1\.self_attn\.q_proj\.lora_B"):
        load_adapter(tiny_llama(), folder)


@pytest.mark.parametrize("change, message", [
    (dict(target_modules=["c_attn"]), "'c_attn' matches no linear"),
    (dict(target_modules=".*proj"), "regular expression"),
    (dict(peft_type="IA3"), "only 'LORA'"),
    (dict(use_dora=True), "DoRA"),
    (dict(rank_pattern={"q_proj": 2}), "per-module ranks"),
    (dict(bias="lora_only"), "bias"),
    (dict(r=0), "positive integer"),
])
def test_config_we_cannot_honour_is_refused(saved, change, message):
    _, folder = saved
    edit_config(folder, **change)
    with pytest.raises(AdapterError, match=rf"adapter_config\.json.*{message}"):
        load_adapter(tiny_llama(), folder)


def test_broken_json_and_saving_without_lora(saved, tmp_path):
    _, folder = saved
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter_config(folder)
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(tiny_llama(), tmp_path / "empty")
