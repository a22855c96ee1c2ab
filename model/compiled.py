"""A compiled decode step for generation (``generate(..., compile=True)``): gpt-fast's recipe.

Why it is faster. An eager decode step runs ~15 small ops per layer, one by one from Python, on
one token per row. On a CPU its time goes to (a) the matmuls, which re-block the bf16 weights into
the matmul library's layout on every call, and (b) per-op overheads of the many elementwise ops.
``torch.compile`` (inductor) removes much of both for ``Llama.decode_step``:

* with *freezing*, the weights become constants of the compiled program, so inductor prepacks each
  linear's weight once into oneDNN's blocked layout, and (``cpp.enable_concat_linear``) merges
  q/k/v and gate/up into one matmul each, since they read the same input;
* RMSNorm, rope, SiLU * up and the residual adds fuse into a few C++ loops.
Only the decode step is compiled. The prefill (the prompts, once per batch) stays eager: it runs
once, and its shapes change with every batch.

Shapes. A compiled program is specialised to its input shapes and compiling one takes a while
(SmolLM2-135M: ~1 min on 2 CPU cores), so we keep the number of shapes small:
* the number of cache slots a step attends to grows by one every step: that dimension is marked
  *dynamic*, so one program serves every step of every batch, whatever the prompt lengths (and
  attention reads only the slots in use, not the whole cache);
* the batch size is static (prepacking chooses its blocking for it): one compile per batch size.
  A batch a little smaller than one compiled already (the last batch of ``generate``) is padded
  with empty rows instead of compiling again;
* freezing makes the program check the *identity* of every buffer, so a new KV cache would mean a
  new compile: each batch size keeps its cache between calls. It only grows (to a power of two of
  slots, and then the step is compiled again) when a call needs more.

Keeping it correct. Frozen weights are *copies*: if the model's weights change in place
afterwards (training, merging a LoRA adapter, ``load_state_dict``), the compiled program would
go on using the old ones. We remember the parameters' version counters (which every in-place
write bumps) and throw the compiled programs away when they change. Models whose layers are not
plain ``nn.Linear`` (LoRA wrappers, bitsandbytes 4-bit) are not compiled: ``supported`` says no
and the sampler stays eager.

Memory: each compiled batch size holds its own prepacked copy of the linear weights and its cache.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .llama import MLP, Attention, DecoderLayer, KVCache, Llama, LlamaModel, RMSNorm

# Every module type a compilable model may contain. The types must match exactly: LoRA's
# LoRALinear and bitsandbytes' Linear4bit are nn.Linear subclasses that freezing must not touch.
_PLAIN_MODULES = (Llama, LlamaModel, DecoderLayer, Attention, MLP, RMSNorm, KVCache,
                  nn.ModuleList, nn.Linear, nn.Embedding)

# Inductor settings for the decode step. They are applied around every call rather than passed as
# torch.compile options because dynamo reads ``freezing`` too, while tracing.
_INDUCTOR_CONFIG = {
    "freezing": True,  # weights become constants: prepacked once, not re-blocked every call
    "cpp.enable_concat_linear": True,  # one matmul for q/k/v and one for gate/up (CPU)
    # Time inductor's own matmul kernels (AMX / AVX-512 templates) against oneDNN's and keep the
    # faster, per shape. Measured on 2 CPU cores: steps ~25% faster at batch 16 and at batch 1,
    # compiles ~2x longer (~1 min instead of ~30 s for SmolLM2-135M).
    "max_autotune": True,
}


@functools.cache
def _compiled_step():
    """One compiled function for all models; dynamo keeps a program per (model, batch size, cache).
    Made on first use: merely importing the compiler costs seconds."""
    return torch.compile(Llama.decode_step, fullgraph=True, dynamic=False)


@dataclass
class _ModelState:
    """What one model keeps between calls: a cache per batch size, and its weights' versions."""
    weights_version: int
    caches: dict[int, list[KVCache]] = field(default_factory=dict)  # batch size -> one per layer


_states: weakref.WeakKeyDictionary[Llama, _ModelState] = weakref.WeakKeyDictionary()


def supported(model: nn.Module) -> bool:
    """Whether ``model`` can use the compiled step: a plain ``Llama`` on a CPU or CUDA device."""
    return (isinstance(model, Llama) and model.model.embed_tokens.weight.device.type in ("cpu", "cuda")
            and all(type(m) in _PLAIN_MODULES for m in model.modules()))


def _weights_version(model: Llama) -> int:
    return sum(p._version for p in model.parameters())


def _state(model: Llama) -> _ModelState:
    version = _weights_version(model)
    state = _states.get(model)
    if state is not None and state.weights_version != version:
        # The weights changed in place since they were frozen into the compiled programs. Dynamo's
        # cache of compiled code is process-wide, so this recompiles every model's step (rare).
        torch.compiler.reset()
        state.weights_version = version
    if state is None:
        state = _states[model] = _ModelState(version)
    return state


def batch_size(model: Llama, batch: int) -> int:
    """The batch size to run ``batch`` rows at: a compiled size up to twice as big if there is one
    (padding rows cost less than a compile), else ``batch`` itself."""
    compiled = [b for b in _state(model).caches if batch <= b <= 2 * batch]
    return min(compiled, default=batch)


def setup_cache(model: Llama, batch: int, max_len: int) -> None:
    """Like ``model.setup_cache``, but reusing this batch size's cache from earlier calls when it
    has at least ``max_len`` slots (so the compiled step need not be compiled again)."""
    state = _state(model)
    caches = state.caches.get(batch)
    if caches is None or caches[0].k.shape[2] < max_len:
        slots = max(256, 1 << (max_len - 1).bit_length())  # grow by powers of two: few recompiles
        model.setup_cache(batch, slots)
        state.caches[batch] = [layer.self_attn.cache for layer in model.model.layers]
        return
    for layer, cache in zip(model.model.layers, caches):
        layer.self_attn.cache = cache


def decode_step(model: Llama, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
    """``model.decode_step`` compiled (the first call for a batch size compiles it)."""
    # The number of slots attended to changes every step: compile for any number, once.
    torch._dynamo.mark_dynamic(attention_mask, 1)
    with torch._inductor.config.patch(_INDUCTOR_CONFIG):
        return _compiled_step()(model, input_ids, attention_mask, position_ids)
