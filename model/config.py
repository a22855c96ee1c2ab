"""Model hyper-parameters, read from a Hugging Face ``config.json``.

One dataclass covers every Llama-family checkpoint we load: Llama-2-7B (multi-head
attention, untied head), TinyLlama-style GQA, SmolLM2 (GQA, tied embeddings, rope theta
1e5), llama2.c's stories260K, and Qwen2 / Qwen2.5 (``model_type: "qwen2"``). Field names are
Hugging Face's, so ``config.json`` maps onto it key for key and a config we write is one
``transformers`` reads back.

Qwen2 is a Llama with one architectural difference: its q/k/v projections have biases (o_proj
and the MLP do not). Its other traits are values of fields Llama already has: GQA (Qwen2.5-1.5B:
12 query / 2 key-value heads of dim 128), ``rope_theta`` 1e6, ``rms_norm_eps`` 1e-6, tied or
untied output. Its sliding-window fields are accepted but only while they are switched off
(``use_sliding_window: false``, as in every released Qwen2/2.5 config): then transformers too
gives every layer full attention, and the window size is never used.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# model_type -> the transformers class that reads the same config.json and weights.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES.values())
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)


class ConfigError(ValueError):
    """A config.json that does not describe a model this code can build."""


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None means multi-head attention (= num_attention_heads)
    head_dim: int | None = None  # None means hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"  # "llama" or "qwen2"

    @property
    def qkv_bias(self) -> bool:
        """Whether q_proj/k_proj/v_proj carry a bias: Qwen2's one difference from Llama."""
        return self.model_type == "qwen2"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type not in ARCHITECTURES:
            raise ConfigError(f"model_type={self.model_type!r}: expected one of {SUPPORTED_MODEL_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "LlamaConfig":
        """Build from a parsed config.json, refusing architectures we do not implement."""
        archs = d.get("architectures") or []
        mtype = d.get("model_type")
        if (archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs)) or (
            mtype is not None and mtype not in SUPPORTED_MODEL_TYPES
        ):
            raise ConfigError(
                f"{source}: unsupported architecture {archs or mtype!r}; expected one of "
                f"{SUPPORTED_ARCHITECTURES} (model_type one of {SUPPORTED_MODEL_TYPES})"
            )
        if mtype is None:  # an old config with only "architectures": take the type from the class
            mtype = next((t for t, a in ARCHITECTURES.items() if a in archs), "llama")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={d['hidden_act']!r}; only 'silu' (SwiGLU) is implemented")
        # transformers >= 5 writes {"rope_parameters": {"rope_theta": ..., "rope_type": "default"}};
        # older configs write a top-level "rope_theta" and maybe "rope_scaling".
        d = dict(d)
        for key in ("rope_parameters", "rope_scaling"):
            rope = d.get(key) or {}
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raise ConfigError(f"{source}: {key}={rope!r} is not implemented (only default RoPE)")
            if "rope_theta" in rope:
                d["rope_theta"] = rope["rope_theta"]
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ConfigError(f"{source}: attention_bias/mlp_bias are not implemented (Llama has none)")
        if mtype == "qwen2" and d.get("use_sliding_window"):
            # transformers: layer i slides iff use_sliding_window and i >= max_window_layers
            # (or layer_types says so). Refuse rather than silently attend to everything.
            n = d.get("num_hidden_layers", 0)
            types = d.get("layer_types") or ["sliding_attention" if i >= d.get("max_window_layers", 28)
                                             else "full_attention" for i in range(n)]
            if "sliding_attention" in types:
                raise ConfigError(f"{source}: use_sliding_window=true (sliding-window attention) is not "
                                  f"implemented; only full attention")
        d["model_type"] = mtype
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in kwargs]
        if missing:
            raise ConfigError(f"{source}: missing required keys {missing}")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json (expected a Hugging Face model folder)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """A config.json that Hugging Face transformers reads as LlamaForCausalLM / Qwen2ForCausalLM."""
        d = asdict(self)
        d.update(architectures=[ARCHITECTURES[self.model_type]], hidden_act="silu")
        if self.model_type == "qwen2":
            d["use_sliding_window"] = False
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))
