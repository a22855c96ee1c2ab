"""What every command-line script shares: the model flags, usage errors, one-line error reports,
and :func:`short`, the one-line excerpt of a text that the reports print.

A script (``train.py``, ``generate.py``, ``curate.py``, ``evaluate.py``) parses its flags with
its parser from :mod:`humback.flags` and hands them to one library function, which returns the
exit code; ``pipeline.py`` runs those same functions as its stages. Bad input (a missing file,
a malformed row, an adapter trained in the other direction) is not a bug, so it is printed as
one ``error: ...`` line, exit code 2, never as a traceback: every such error is a
:data:`INPUT_ERRORS`, raised with a message that names the file or flag and what was expected.
"""
from __future__ import annotations

import argparse
import sys

# The embedded default model (model/gguf.py converts it on first use): no download needed.
# The same name as model.gguf.DEFAULT_MODEL_NAME, written again here because importing
# model.gguf loads torch, which a script's --help should not wait for.
DEFAULT_MODEL = "smollm2-135m-instruct"

# The errors that mean "bad input" and are printed as one line, not a traceback: DataError,
# CheckpointError, AdapterError, TokenizerError and UsageError are all ValueErrors; a missing
# tokenizer file or an unwritable --out is an OSError.
INPUT_ERRORS = (ValueError, OSError)


class UsageError(ValueError):
    """A bad combination of flags or a missing file: printed as one ``error:`` line."""


def fail(error: BaseException, code: int = 2) -> int:
    """Print ``error`` as one ``error: ...`` line on stderr and return the exit ``code``
    (2: the input was bad; 1: the work is done but publishing it failed)."""
    print(f"error: {error}", file=sys.stderr)
    return code


def add_model_flags(parser: argparse.ArgumentParser, adapter: bool = True,
                    training: bool = False) -> argparse._ArgumentGroup:
    """The flags that say which model to load: --model, --adapter (unless ``adapter`` is False),
    --quantize, --dtype and --device. Returns their group, for a script's own model flags."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"base model: folder, hub repo id, or '{DEFAULT_MODEL}' (the embedded default)")
    if adapter:
        g.add_argument("--adapter", default=None,
                       help="LoRA adapter folder (PEFT format, e.g. runs/backward/adapter from train.py) loaded on top")
    g.add_argument("--quantize", choices=["nf4"], default=None,
                   help="load block linears as 4-bit NF4 (bitsandbytes)" + ("; with LoRA on top: QLoRA" if training
                                                                             else ""))
    if training:
        g.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                       help="what the base is loaded in and autocast computes in; LoRA weights and AdamW stay "
                            "fp32. Default: bf16, or fp16 on a GPU without bf16 (T4, V100). fp16 adds dynamic "
                            "loss scaling (a step whose gradients overflow is skipped); fp32: no autocast")
    else:
        g.add_argument("--dtype", default=None,
                       help="bf16 / fp32 / fp16 (default: bf16 on a GPU with bf16, with nf4, or on a CPU with "
                            "native bf16 (AVX512-BF16/AMX); fp16 on a GPU without bf16 (T4, V100); else fp32)")
    g.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    return g


def add_compile_flag(group: argparse._ArgumentGroup) -> None:
    """--compile: the opt-in compiled decode step (generate.py, curate.py)."""
    group.add_argument("--compile", action="store_true",
                       help="compile the decode step (model/compiled.py): about a minute of compiling per batch "
                            "size, then ~2x faster decoding on CPU; the adapter is merged into the weights first "
                            "(bf16/fp32 bases; an NF4 base runs eagerly). Merging into bf16 weights rounds the "
                            "update, so outputs can differ slightly from an unmerged run")


def short(text: str, n: int = 100) -> str:
    """One line of at most n characters, for printing examples."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."
