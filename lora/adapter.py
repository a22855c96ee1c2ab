"""LoRA adapters on disk, in PEFT's format, so the rest of the ecosystem can use ours and vice versa.

An adapter folder holds two files:

* ``adapter_config.json``: how to rebuild the LoRA layers (r, lora_alpha, target_modules, ...),
  with PEFT's field names (``peft_type: "LORA"``, ``task_type: "CAUSAL_LM"``, ...);
* ``adapter_model.safetensors``: the A and B matrices, under PEFT's key names,
  ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``, where ``<module>`` is the
  Hugging Face name (``model.layers.0.self_attn.q_proj``). ``base_model.model.`` is the path of
  the wrapped network inside a ``PeftModel``; PEFT leaves the adapter name ("default") out of
  saved keys.

``PeftModel.from_pretrained(hf_model, folder)`` loads what ``save_adapter`` writes, and
``load_adapter`` loads what PEFT's ``save_pretrained`` writes. PEFT's config has many more
options than plain LoRA; an adapter that uses one we do not implement (DoRA, rsLoRA, per-layer
ranks, ...) is refused with a clear error rather than loaded with the wrong arithmetic.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .inject import inject_lora, lora_layers, resolve_targets, unwrap_lora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # where PEFT's PeftModel keeps the wrapped model

# PEFT options that change the arithmetic or the set of trained tensors. Each must be "off"
# (False / None / empty) for us to load an adapter, with what it means when it is on.
UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA: an extra magnitude vector per layer)",
    "use_rslora": "rsLoRA (scaling alpha/sqrt(r) instead of alpha/r)",
    "fan_in_fan_out": "transposed (Conv1D-style) base weights",
    "modules_to_save": "fully trained extra modules",
    "layers_to_transform": "LoRA on only some layers",
    "layers_pattern": "LoRA on only some layers",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "exclude_modules": "excluded modules",
    "lora_bias": "a trainable bias on lora_B",
    "use_qalora": "QA-LoRA",
    "target_parameters": "LoRA on raw parameters",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "replicated layers",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "block-diagonal LoRA",
    "megatron_config": "Megatron-parallel layers",
}


class AdapterError(ValueError):
    """An adapter folder we cannot use: the message names the file and what is wrong."""


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------
def _uniform(model: nn.Module, attr: str) -> Any:
    values = {getattr(layer, attr) for _, layer in lora_layers(model)}
    if len(values) != 1:
        raise ValueError(f"LoRA layers disagree on {attr} ({sorted(values)}); PEFT's format would need "
                         f"rank_pattern/alpha_pattern, which we do not write")
    return values.pop()


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` contents describing the model's LoRA layers."""
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers to save (inject_lora first)")
    targets = list(dict.fromkeys(name.rpartition(".")[2] for name, _ in layers))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": _uniform(model, "r"),
        "lora_alpha": _uniform(model, "alpha"),
        "lora_dropout": _uniform(model, "dropout"),
        "target_modules": targets,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
        "use_rslora": False,
    }


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``adapter_config.json``: a plain-LoRA adapter we can load, or AdapterError."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such adapter folder")
    if not path.exists():
        raise AdapterError(f"{path}: missing (an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type is {cfg['peft_type']!r}; only 'LORA' adapters are supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise AdapterError(f"{path}: missing required field {key!r}")
    if not isinstance(cfg["r"], int) or cfg["r"] <= 0:
        raise AdapterError(f"{path}: r={cfg['r']!r} is not a positive integer")
    for key, what in UNSUPPORTED.items():
        if cfg.get(key):  # present and not False / None / {} / []
            raise AdapterError(f"{path}: {key}={cfg[key]!r} ({what}) is not supported by this LoRA "
                               f"implementation; refusing to load it with plain-LoRA arithmetic")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={cfg['bias']!r} (trained biases) is not supported; expected 'none'")
    targets = cfg["target_modules"]
    if isinstance(targets, str) and targets != "all-linear":
        raise AdapterError(f"{path}: target_modules={targets!r} is a regular expression; only a list of "
                           f"module names or 'all-linear' is supported")
    return cfg


# ------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder, then rename over ``path``: a crash or a
    full disk leaves the previous file intact, never a half-written one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_adapter(model: nn.Module, folder: str | os.PathLike, base_model_name_or_path: str | None = None,
                 extra_config: dict[str, Any] | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format) into ``folder``.

    ``base_model_name_or_path`` defaults to the path the model was loaded from. ``extra_config``
    adds fields to the JSON (e.g. training settings). Each file is replaced atomically; the weights
    are written first, so a config never describes weights that were not written.
    """
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = adapter_config(model, base_model_name_or_path or getattr(model, "name_or_path", None))
    cfg.update(extra_config or {})
    tensors = {}
    for name, layer in lora_layers(model):
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
    _atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(folder / CONFIG_NAME, lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
    return folder


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------
def _check_existing_layers(model: nn.Module, cfg: dict, path: Path) -> None:
    """An already-injected model must have the adapter's layout; else the load would be wrong."""
    have = {name.rpartition(".")[2] for name, _ in lora_layers(model)}
    want = set(resolve_targets(model, cfg["target_modules"]))
    if have != want:
        raise AdapterError(f"{path}: target_modules {sorted(want)} differ from the model's LoRA layers "
                           f"{sorted(have)}; load into a model without LoRA to inject them as saved")
    for _, layer in lora_layers(model):
        if layer.r != cfg["r"] or layer.alpha != cfg["lora_alpha"]:
            raise AdapterError(f"{path}: r={cfg['r']}, lora_alpha={cfg['lora_alpha']} differ from the "
                               f"model's LoRA layers (r={layer.r}, alpha={layer.alpha})")


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> dict[str, Any]:
    """Load a PEFT-format LoRA adapter into ``model`` and return its config.

    If the model has no LoRA layers yet they are injected as the config says (targets, r, alpha,
    dropout); otherwise the existing layers must match it. Loading is strict: every tensor in the
    file must be an A or B the model has, with the right shape, and every A and B must be there.
    """
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    cfg_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not weights.exists():
        pickled = " (adapter_model.bin is a pickle; not read, for safety)" if (folder / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{weights}: missing{pickled}")
    try:
        targets = resolve_targets(model, cfg["target_modules"])
    except ValueError as e:
        raise AdapterError(f"{cfg_path}: {e}") from None
    injected = not any(True for _ in lora_layers(model))
    if injected:
        inject_lora(model, targets=targets, r=cfg["r"], alpha=cfg["lora_alpha"],
                    dropout=cfg.get("lora_dropout", 0.0) or 0.0)
    else:
        _check_existing_layers(model, cfg, cfg_path)
    try:
        _copy_weights(model, weights, cfg, targets)
    except AdapterError:
        if injected:  # leave the model as it came, not half-adapted
            unwrap_lora(model, merge=False)
        raise
    return cfg


@torch.no_grad()
def _copy_weights(model: nn.Module, weights: Path, cfg: dict, targets: list[str]) -> None:
    """Strictly copy every A/B tensor of the file into the model's LoRA layers."""
    expected = {}
    for name, layer in lora_layers(model):
        expected[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        expected[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight

    from safetensors import safe_open
    try:
        handle = safe_open(str(weights), framework="pt", device="cpu")
    except Exception as e:
        raise AdapterError(f"{weights}: not a readable safetensors file ({e})") from None
    with handle:
        keys = list(handle.keys())
        unknown = sorted(set(keys) - set(expected))
        if unknown:
            raise AdapterError(f"{weights}: {len(unknown)} tensor(s) that are not LoRA A/B matrices of "
                               f"this model's targets {targets}, e.g. {unknown[:3]}")
        missing = sorted(set(expected) - set(keys))
        if missing:
            raise AdapterError(f"{weights}: lacks {len(missing)} LoRA tensor(s), e.g. {missing[:3]}")
        for key in keys:  # every shape first, so a bad file changes nothing
            shape, want = tuple(handle.get_slice(key).get_shape()), tuple(expected[key].shape)
            if shape != want:
                raise AdapterError(f"{weights}: '{key}' has shape {shape}, but the model expects {want} "
                                   f"(from r={cfg['r']} in {CONFIG_NAME} and the layer's size); "
                                   f"do r and the weights agree?")
        for key in keys:
            param = expected[key]
            param.copy_(handle.get_tensor(key).to(dtype=param.dtype, device=param.device))
