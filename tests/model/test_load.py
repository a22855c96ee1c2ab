"""Loading checkpoints: single file vs shards, NF4, and clear errors on bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from model import load_model
from model.load import CheckpointError, save_model, weight_bytes
from tests.tiny import SHARED, make_tiny, needs_shared


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # wide enough that NF4's per-64 block statistics are a small overhead, as in real models
    return make_tiny(tmp_path_factory.mktemp("tiny"), std=0.02, hidden_size=256, intermediate_size=512,
                     num_attention_heads=4, num_key_value_heads=2)


def test_sharded_equals_single_file(tiny_dir, tmp_path):
    single, tok = load_model(tiny_dir, device="cpu")
    sharded_dir = tmp_path / "sharded"
    save_model(single, sharded_dir, max_shard_bytes=400_000)
    shutil.copy(tiny_dir / "tokenizer.model", sharded_dir)
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2, "the test must really shard"
    sharded, _ = load_model(sharded_dir, device="cpu")
    a, b = single.state_dict(), sharded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([tok.encode("The capital of France", bos=True)])
    assert torch.equal(single(ids), sharded(ids))


def test_nf4_linears_are_4bit_close_to_bf16_and_small(tiny_dir):
    import bitsandbytes as bnb
    ref, tok = load_model(tiny_dir, dtype="bf16", device="cpu")
    q, _ = load_model(tiny_dir, quantize="nf4", device="cpu")
    blocks = [m for n, m in q.named_modules() if n.startswith("model.layers.") and n.endswith("_proj")]
    assert len(blocks) == 7 * 2 and all(isinstance(m, bnb.nn.Linear4bit) for m in blocks)
    assert all(m.weight.quant_type == "nf4" and m.weight.compress_statistics for m in blocks)
    assert q.lm_head.weight.dtype == torch.bfloat16 and q.model.embed_tokens.weight.dtype == torch.bfloat16

    def linear_bytes(m):
        return sum(weight_bytes(x) for n, x in m.named_modules() if n.startswith("model.layers.") and n.endswith("_proj"))
    ratio = linear_bytes(q) / linear_bytes(ref)
    assert ratio <= 0.30, ratio  # 4 bits + double-quantized scales ~ 0.26 of bf16's 16 bits
    assert weight_bytes(q) < weight_bytes(ref)

    # One layer: NF4 rounds each weight to one of 16 levels scaled by its 64-block absmax, so a
    # linear's output moves by ~10% of its norm for Gaussian weights. Bound: 15%.
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    lin_ref, lin_q = ref.model.layers[0].mlp.up_proj, q.model.layers[0].mlp.up_proj
    with torch.no_grad():
        y_ref, y_q = lin_ref(x).float(), lin_q(x).float()
    assert (y_ref - y_q).norm() / y_ref.norm() < 0.15
    # Whole model: the errors of 14 linears compound; bound: cosine similarity of the logits
    # >= 0.95 on random weights with Hugging Face's init scale (std 0.02).
    ids = torch.tensor([tok.encode("Once upon a time there was a little girl", bos=True)])
    with torch.no_grad():
        a, b = ref(ids).float().flatten(), q(ids).float().flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.95


@needs_shared
def test_nf4_real_model_keeps_its_predictions():
    """stories260K (a real trained model, out_features not multiples of 32) in NF4: the
    next-token argmax agrees with bf16 on most positions of a real sentence."""
    ref, tok = load_model(SHARED / "models/stories260K", dtype="bf16", device="cpu")
    q, _ = load_model(SHARED / "models/stories260K", quantize="nf4", device="cpu")
    ids = torch.tensor([tok.encode("Once upon a time, there was a little girl named Lily. She liked to", bos=True)])
    with torch.no_grad():
        a, b = ref(ids).float(), q(ids).float()
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) >= 0.95
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.7


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        load_model(tmp_path / "nope", device="cpu")


def test_unknown_architecture_names_the_file(tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*unsupported architecture"):
        load_model(bad, device="cpu")


def test_truncated_safetensors_names_the_file(tiny_dir, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(tiny_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_model(bad, device="cpu")


def test_shape_mismatch_names_file_tensor_and_expected_shape(tiny_dir, tmp_path):
    bad = tmp_path / "shape"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' "
                                              r"has shape .* config\.json implies"):
        load_model(bad, device="cpu")


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                      "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle checkpoints are not read"):
        load_model(tmp_path, device="cpu")


def test_offline_hub_id_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        load_model("someone/not-a-real-model-xyz", device="cpu")
    assert "could not download 'someone/not-a-real-model-xyz'" in str(e.value)
    assert "\n" not in str(e.value)
