"""Tiny random Llamas on disk, for tests: same shape family as Llama-2-7B, seconds to build.

``make_tiny(folder, ...)`` writes a Hugging Face-layout checkpoint (config.json +
model.safetensors + tokenizer.model) whose tokenizer is a small sentencepiece model trained on
the fly on our own demo text, so tests need nothing from the hub or ../shared.
"""
from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared is absent")

TEXT = """Instruction backtranslation starts from a small seed of human-written examples.
A backward model learns to predict the instruction that a given answer responds to.
It then writes instructions for unlabelled documents, and the model rates every pair.
Only the pairs rated highest are kept to train the next, better model.
The capital of France is Paris. The capital of Germany is Berlin. Rome is in Italy.
Once upon a time there was a little girl who liked to read books about the sea.
Numbers like 1, 2, 3, 42 and 2023 appear in text; so do symbols: #, %, & and (brackets)."""


@lru_cache(maxsize=None)
def tiny_spm_bytes(vocab_size: int = 512) -> bytes:
    """A sentencepiece BPE model with byte fallback (like Llama-2's), trained on TEXT."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines() * 20), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
        pad_id=-1, minloglevel=2, num_threads=1)
    return buf.getvalue()


def tiny_config(**overrides) -> dict:
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64,
               intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, hidden_act="silu", torch_dtype="float32")
    cfg.update(overrides)
    return cfg


def make_tiny(folder: Path, seed: int = 0, std: float = 0.1, tokenizer_model: Path | None = None,
              **overrides) -> Path:
    """Random tiny checkpoint in Hugging Face layout; ``overrides`` change config.json keys.
    ``tokenizer_model``: a sentencepiece file to copy in (e.g. Llama-2's, with vocab_size=32000)
    instead of the one trained on TEXT."""
    from model import Llama, LlamaConfig
    from model.load import save_model
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(**overrides)
    torch.manual_seed(seed)
    net = Llama(LlamaConfig.from_dict(cfg))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    save_model(net, folder)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    spm_bytes = Path(tokenizer_model).read_bytes() if tokenizer_model else tiny_spm_bytes(cfg["vocab_size"])
    (folder / "tokenizer.model").write_bytes(spm_bytes)
    return folder


def hf_llama_tokenizer(spm_model: Path):
    """transformers' Llama tokenizer over a sentencepiece vocabulary, built live, as a reference.

    transformers 5 has no slow (sentencepiece) LlamaTokenizer any more, and its automatic
    conversion of a tokenizer.model needs protobuf, which this project does not depend on.
    So we do what transformers' own GGUF loader does for sentencepiece vocabularies: read
    the pieces and scores, derive the BPE merges with ``generate_merges`` and hand both to
    ``LlamaTokenizer``. Its default (``legacy=False``) pre-tokenizer ``Metaspace`` differs from
    sentencepiece on text that *starts* with a space ("  x" -> ``▁ ▁x`` instead of
    ``▁▁ ▁x``), so, as in the official Llama-2 ``tokenizer.json``, the space handling is a
    normalizer (prepend ``▁``, replace spaces) with no pre-tokenizer.
    """
    transformers = pytest.importorskip("transformers")
    import sentencepiece as spm
    from tokenizers import normalizers
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, p in enumerate(pieces)}
    scores = {p: sp.get_score(i) for i, p in enumerate(pieces)}
    ref = transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores),
                                      unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    backend = ref.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    return ref
