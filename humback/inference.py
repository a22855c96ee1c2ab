"""Loading a model for inference, with a LoRA adapter, and the model calls the method's steps make.

The steps (:mod:`humback.backtranslate`, :mod:`humback.rating`, :mod:`humback.measures`) take
the model work as plain callables, so they can be read and tested without a model. This module
makes those callables from a loaded model:

* :func:`completer`: ``complete(prompts) -> texts``, sampling with :func:`model.generate`;
* :func:`logprobs_fn`: ``logprobs(prompts, continuations) -> [[log p per token], ...]``.

and loads what they run on: :func:`load_for_inference` (base + adapter, from the model flags),
:func:`adapter_loaded` (an adapter in and out of one loaded base). An adapter folder written by
``train.py`` records the direction and tag it was trained with (:func:`adapter_settings`), so a
backward adapter given where a forward one belongs is refused before anything slow happens.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from humback.cli import UsageError

Complete = Callable[[list[str]], list[str]]
LogProbs = Callable[[list[str], list[str]], list[list[float]]]  # (prompts, continuations) -> per-token log p


# ----------------------------------------------------------------------- adapter settings


def adapter_settings(adapter: str | None) -> dict[str, Any]:
    """The adapter's adapter_config.json (train.py records direction and tag there), or {}."""
    if not adapter:
        return {}
    folder = Path(adapter)
    if not folder.is_dir():
        raise UsageError(f"--adapter {adapter}: no such folder (expected adapter_config.json + "
                         f"adapter_model.safetensors, as train.py writes to RUN/adapter)")
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise UsageError(f"--adapter {adapter}: no adapter_config.json in it")
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{config}: invalid JSON ({e.msg})") from None


def check_direction(settings: dict[str, Any], wanted: str, what: str) -> None:
    """Refuse an adapter trained in the other direction (a classic mix-up), when it says."""
    direction = settings.get("direction")
    if direction and direction != wanted:
        raise UsageError(f"the adapter was trained with --direction {direction}, but {what} needs the "
                         f"{wanted} model")


def resolve_tag(flag: str, settings: dict[str, Any]) -> str | None:
    """--tag auto: the assistant tag if the adapter learned tags, else no tag line."""
    if flag != "auto":
        return None if flag == "none" else flag
    return "seed" if settings.get("tag") not in (None, "none") else None


def prompt_chat_format(tok: Any, adapter: str | None, choice: str = "auto") -> Any:
    """The chat format to prompt with (a :class:`model.chat.ChatFormat`), or None for our plain format.

    ``choice`` is the --prompt-format flag: "auto" uses the model's own chat template when it has
    one that :mod:`model.chat` writes out *and* no adapter of ours is on it (an adapter was trained
    on the plain ``### Instruction`` format, whatever its base knew); "chat" insists on the template;
    "plain" never uses one.
    """
    if choice == "plain":
        return None
    fmt = tok.chat_format
    if choice == "chat":
        if fmt is None:
            raise UsageError("--prompt-format chat: this model has no chat template this project writes out "
                             "(ChatML or Llama-2 chat in its tokenizer_config.json)")
        return fmt
    return fmt if not adapter else None


def rating_tag(flag: str, tag: str | None, chat: Any, label: str = "the rater") -> str | None:
    """The tag line of a rating prompt: ``tag`` (from :func:`resolve_tag`) in our plain format, none
    in a chat template, which has no place for it. A --tag the user wrote that is dropped this way
    is said so on stderr, rather than ignored in silence."""
    if chat is None:
        return tag
    if flag in ("seed", "augmented"):
        print(f"note: --tag {flag} is not used by {label}: it is prompted in its chat template, which has "
              f"no tag line (--prompt-format plain keeps it)", file=sys.stderr)
    return None


# ------------------------------------------------------------------------------- loading


def load_for_inference(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer) from --model/--quantize/--dtype/--device, with --adapter on top."""
    from model import load_model
    from model.load import native_bf16, pick_device
    adapter_settings(args.adapter)  # a missing or broken adapter fails before the slow part
    t0 = time.perf_counter()
    # bf16 wherever it is fast: inference needs no fp32 master weights, and on a CPU with native
    # bf16 it is ~2.5x faster (measured: a batch of 8 rating prompts, 8.3 s vs 20.2 s to prefill).
    dtype = args.dtype or ("bf16" if native_bf16(pick_device(args.device)) else None)
    model, tok = load_model(args.model, quantize=args.quantize, dtype=dtype, device=args.device)
    if args.adapter:
        from lora.adapter import load_adapter  # lazy: plain prompting needs no LoRA code
        load_adapter(model, args.adapter)
        model.eval()
        if getattr(args, "compile", False) and not args.quantize:
            # The compiled step takes plain linears: fold each LoRA update into its base weight.
            from lora.inject import unwrap_lora
            unwrap_lora(model, merge=True)
    if getattr(args, "compile", False):
        from model.compiled import supported
        if not supported(model):
            print("note: --compile needs a plain bf16/fp32 model on CPU or CUDA; decoding eagerly", file=sys.stderr)
    print(f"[loaded {args.model}{' + ' + args.adapter if args.adapter else ''} in {time.perf_counter() - t0:.1f}s]",
          file=sys.stderr)
    return model, tok


@contextmanager
def adapter_loaded(model: Any, folder: str | None) -> Iterator[Any]:
    """Inside the block the model runs with the LoRA adapter in ``folder`` (or as the plain base
    when None); afterwards the LoRA layers are taken out again (not merged), so the next adapter,
    or the base, starts from exactly the original weights. Inside, calls reuse the shared prompt
    prefix the last one computed (:func:`model.engine.keep_prefixes`)."""
    from model.engine import keep_prefixes  # the weights are fixed inside: calls share their prefix
    if folder is None:
        with keep_prefixes(model):
            yield model
        return
    from lora.adapter import load_adapter
    from lora.inject import unwrap_lora
    load_adapter(model, folder)
    model.eval()
    try:
        with keep_prefixes(model):
            yield model
    finally:
        unwrap_lora(model, merge=False)


def free_accelerator_memory() -> None:
    """Collect what no name holds any more and hand CUDA's cached blocks back, so the next model
    loaded finds the memory of one that is done (two 7B-class models rarely fit side by side)."""
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------- model calls


# A ``complete()`` call gets this many batches of prompts at once: the engine decodes --batch-size
# of them together and refills a row's slot with a waiting prompt as soon as the row ends, which
# it can only do while prompts wait (model/engine.py). Each call's rows are then one durable write,
# and the unit of resuming and of torchrun's split (humback/sharding.py).
BATCHES_PER_CALL = 4


def call_size(batch_size: int) -> int:
    """Prompts per ``complete()`` call (and rows per durable write) for a --batch-size."""
    return batch_size * BATCHES_PER_CALL


def completer(model: Any, tok: Any, args: argparse.Namespace, max_new_tokens: int, stop: Sequence[str]) -> Complete:
    """``complete(prompts) -> texts`` with ``model``: up to ``max_new_tokens`` each, cut at the first of
    ``stop``, sampled as the command's flags say (--temperature, --top-p, --batch-size, --compile
    where the command has it). A sampled prompt's randomness comes from --seed and the prompt itself
(``model.engine.row_seed``), so it gets the same text whatever batch, call or process it is in."""
    from model import generate

    def complete(prompts: list[str]) -> list[str]:
        return generate(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, stop=list(stop), seed=args.seed,
                        batch_size=args.batch_size, compile=getattr(args, "compile", False))
    return complete


def logprobs_fn(model: Any, tok: Any, batch_size: int) -> LogProbs:
    """``logprobs(prompts, continuations)``: the log-probability of every token of each continuation
    after its prompt (tokenized apart, as in training: :func:`model.sampling.token_logprobs`)."""
    def logprobs(prompts: list[str], continuations: list[str]) -> list[list[float]]:
        from model.sampling import token_logprobs
        return [t.tolist() for t in token_logprobs(model, tok, prompts, continuations, batch_size)]
    return logprobs
