"""Tokenizers: sentencepiece (Llama-2, stories260K) against a live Hugging Face reference,
the generic tokenizer.json wrapper on a tiny self-made BPE, and load_tokenizer's errors.

SmolLM2's tokenizer (converted from the GGUF) is tested in test_gguf.py, next to the
conversion it needs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.tokenizer import (
    BPETokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
)
from tests.tiny import hf_llama_tokenizer

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
LLAMA2_MODEL = SHARED / "models" / "llama2-tokenizer" / "tokenizer.model"
STORIES_DIR = SHARED / "models" / "stories260K"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} (shared data/models) is absent")

# Strings that tend to expose tokenizer differences: leading/trailing/multiple spaces,
# newlines and tabs, digits, non-Latin scripts, emoji (byte fallback), special-token text.
TRICKY = [
    "Hello world",
    "",
    " ",
    "  leading spaces",
    "trailing spaces  ",
    "a  b   c",
    "\n\nnewlines\n\n1. first\n  2. second",
    "tabs\tand\ttabs",
    "In 2024, 1234567 people paid $3.50 (½ price).",
    "Emoji 🤗🦙 and 中文 and Ελληνικά and русский",
    "<s>[INST] literal markers [/INST] </s>",
    "don't won't I'm you'll",
]


def shared_texts(per_file: int = 150) -> list[str]:
    """A few hundred real documents from ../shared/data (several languages and formats)."""
    data = SHARED / "data"
    texts: list[str] = []
    for name in ("guanaco/openassistant_best_replies_eval.jsonl", "web/c4_demo.jsonl",
                 "guanaco/guanaco_llama2_1k_train.jsonl"):
        with open(data / name, encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for _, line in zip(range(per_file), f)]
    with open(data / "lima" / "train.jsonl", encoding="utf-8") as f:
        for _, line in zip(range(per_file // 2), f):
            texts += json.loads(line)["conversations"]
    return texts + TRICKY


# --------------------------------------------------------------------------- Llama-2

@pytest.fixture(scope="module")
def llama2() -> SentencePieceTokenizer:
    if not LLAMA2_MODEL.is_file():
        pytest.skip(f"{LLAMA2_MODEL} is absent")
    return SentencePieceTokenizer(LLAMA2_MODEL)


@pytest.fixture(scope="module")
def llama2_hf_reference():
    """The Hugging Face Llama-2 tokenizer, built live by transformers from tokenizer.model
    (see tests.tiny.hf_llama_tokenizer)."""
    if not LLAMA2_MODEL.is_file():
        pytest.skip(f"{LLAMA2_MODEL} is absent")
    return hf_llama_tokenizer(LLAMA2_MODEL)


@needs_shared
def test_llama2_hello_world(llama2: SentencePieceTokenizer) -> None:
    assert llama2.encode("Hello world") == [15043, 3186]
    assert llama2.encode("Hello world", bos=True) == [1, 15043, 3186]
    assert llama2.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert (llama2.vocab_size, llama2.bos_id, llama2.eos_id, llama2.pad_id) == (32000, 1, 2, 2)
    assert llama2.add_bos is True
    assert llama2.stop_ids == [2]
    assert len(llama2) == 32000 and isinstance(llama2, Tokenizer)


@needs_shared
def test_llama2_matches_hf_reference(llama2: SentencePieceTokenizer, llama2_hf_reference) -> None:
    texts = shared_texts()
    assert len(texts) > 400
    mismatches = []
    for text in texts:
        # split_special_tokens: like sentencepiece, read "<s>" in text as characters.
        ref = llama2_hf_reference(text, add_special_tokens=False, split_special_tokens=True).input_ids
        if llama2.encode(text) != ref:
            mismatches.append(text[:80])
    assert not mismatches, f"{len(mismatches)}/{len(texts)} differ, e.g. {mismatches[:3]}"


@needs_shared
def test_llama2_decode_round_trip(llama2: SentencePieceTokenizer) -> None:
    for text in shared_texts(per_file=60):
        assert llama2.decode(llama2.encode(text)) == text
    ids = llama2.encode("Hello world", bos=True, eos=True)
    assert llama2.decode(ids) == "Hello world"  # <s>, </s> skipped
    assert llama2.decode(ids, skip_special=False) == "<s>Hello world</s>"
    assert llama2.id_to_token(15043) == "▁Hello"


@needs_shared
def test_llama2_special_text_is_literal(llama2: SentencePieceTokenizer) -> None:
    # Meta's tokenizer never turns "<s>" typed in the text into the BOS id.
    assert 1 not in llama2.encode("<s>[INST] hi [/INST]")


@needs_shared
def test_llama2_base_has_no_chat_format(llama2: SentencePieceTokenizer) -> None:
    # No chat template ships with a bare tokenizer.model: the model is prompted as plain text.
    assert llama2.chat_template is None and llama2.chat_format is None


# --------------------------------------------------------------------------- stories260K

@needs_shared
def test_stories260k_loads() -> None:
    tok = load_tokenizer(STORIES_DIR)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (512, 1, 2, True)
    text = "Once upon a time, there was a little girl named Lily."
    ids = tok.encode(text, bos=True)
    assert ids[0] == 1 and all(0 <= i < 512 for i in ids)
    assert tok.decode(ids) == text


# --------------------------------------------------------------------------- tokenizer.json

@pytest.fixture(scope="module")
def tiny_bpe_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE trained on the spot, with a post-processor that adds BOS.

    The post-processor is a trap: ``BPETokenizer.encode`` must not add anything by itself.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<s>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokenizer",
              "byte pair encoding merges frequent pairs"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder = tmp_path_factory.mktemp("tiny_bpe")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "special": True},
        "eos_token": "<|endoftext|>",
        "add_bos_token": True,
    }))
    (folder / "tokenizer.model").write_bytes(b"not a sentencepiece model")  # must not be chosen
    return folder


def test_bpe_tokenizer_from_json(tiny_bpe_dir: Path) -> None:
    tok = load_tokenizer(tiny_bpe_dir)
    assert isinstance(tok, BPETokenizer)  # tokenizer.json wins over tokenizer.model
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 0, 0, True)
    assert tok.stop_ids == [0, 2]  # eos, then <|im_end|>; "<s>" is not a stop token
    ids = tok.encode("hello world")
    assert 1 not in ids  # the post-processor's BOS is not added behind our back
    assert tok.encode("hello world", bos=True, eos=True) == [1] + ids + [0]
    for text in ["hello world", " the lazy fox!", "unseen ünïcödé 🤗", "a\n\n b"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("hi<|im_end|>")[-1] == 2  # special-token text becomes its id
    assert tok.decode(tok.encode("hi<|im_end|>")) == "hi"
    assert tok.decode(tok.encode("hi<|im_end|>"), skip_special=False) == "hi<|im_end|>"


def test_bpe_add_bos_inferred_from_post_processor(tiny_bpe_dir: Path, tmp_path: Path) -> None:
    # Without an add_bos_token flag, the post-processor's "<s> $A" says the model wants BOS.
    (tmp_path / "tokenizer.json").write_bytes((tiny_bpe_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert load_tokenizer(tmp_path).add_bos is True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_end|>"}))
    assert load_tokenizer(tmp_path).add_bos is False


def test_encode_without_bos_token_raises(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    HFTokenizer(models.BPE(vocab={"a": 0}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id is None and tok.eos_id is None and tok.pad_id == 0 and not tok.add_bos
    with pytest.raises(TokenizerError, match="BOS"):
        tok.encode("a", bos=True)


def test_load_tokenizer_without_files_names_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "tokenizer.model" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
