"""Several processes, one job: the small set of torch.distributed helpers our scripts use.

``torchrun --nproc_per_node N script.py ARGS`` starts N copies of the script and tells each one,
through environment variables, who it is:

* ``RANK``: 0 .. WORLD_SIZE-1, unique over all machines; rank 0 writes the files;
* ``LOCAL_RANK``: 0 .. N-1 on this machine: which GPU this process uses;
* ``WORLD_SIZE``: how many processes in all (N x the number of machines);
* ``MASTER_ADDR`` / ``MASTER_PORT``: where rank 0 listens, so the processes can meet.

:func:`session` reads them and joins the process group (NCCL between GPUs, gloo between CPU
processes). Started without torchrun (or with one process) nothing is initialised: every helper
then answers as a lone process would (rank 0 of 1, a barrier that returns at once, a sum over
one value), so the scripts run unchanged in a single process.

Two ways the scripts split work:

* training (:func:`wrap_ddp`): every rank holds the whole model and trains on its own share of
  each optimizer step's micro-batches; after backward, the LoRA gradients are summed over ranks
  (an all-reduce), so every rank takes the same optimizer step. See ``lora/finetune.py``.
* generation and rating: every rank takes its shard of the input, writes its own part file, and
  rank 0 merges the parts at the end (``data/augment.py``, :func:`data.augment.merge_parts`).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def launched_by_torchrun() -> bool:
    """True when torchrun started this process as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's number, 0 .. world_size() - 1 (0 when not distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """How many processes share the job (1 when not distributed)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    """This process's number on its own machine: the index of the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def device_for_rank(requested: str | None) -> str | None:
    """The device this rank should use: under torchrun on GPUs, ``cuda:LOCAL_RANK`` (each process
    its own GPU; plain "cuda" would put every process on GPU 0). Otherwise ``requested`` unchanged."""
    if world_size() > 1 and torch.cuda.is_available() and requested in (None, "cuda"):
        return f"cuda:{local_rank()}"
    return requested


@contextmanager
def session(backend: str | None = None, timeout: timedelta | None = None) -> Iterator[None]:
    """Join the process group if torchrun started several processes; leave it on exit.

    ``backend``: "nccl" (GPU tensors) or "gloo" (CPU tensors); default nccl when a GPU is
    available. Scripts that only need a barrier at the end (generation, rating) pass "gloo"
    and a long ``timeout``: a rank that finishes early waits there for the slowest one.
    Ranks other than 0 print nothing on stdout (their errors still reach stderr)."""
    if not launched_by_torchrun() or dist.is_initialized():
        yield
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=timeout)  # reads RANK, WORLD_SIZE, MASTER_ADDR/PORT
    stdout = sys.stdout
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    try:
        yield
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here."""
    if dist.is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where tensors must be for a collective: the GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_across_ranks(*values: float) -> list[float]:
    """Each value summed over all ranks (float64), e.g. a loss or a token count; as is when alone."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` when alone."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------
# Data-parallel training of the LoRA parameters
# ------------------------------------------------------------------------------------------
def _allreduce_sum(state, bucket):  # no annotations: DDP checks them at run time, and this module's
    # `from __future__ import annotations` would turn dist.GradBucket into a string it rejects
    """DDP's communication hook: sum the gradient bucket (a ``dist.GradBucket``) over ranks; returns a
    ``torch.futures.Future`` of the reduced tensor. ``state`` is unused (None).

    DDP's own hook *averages* (sum / world_size), which suits a loss that is a mean over the
    rank's own batch. Our ranks instead divide their summed losses by the token count of the
    whole global step (every rank's micro-batches), so each rank's gradient is already its share
    of the global mean, and the shares must be added up, not averaged."""
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_ddp(model: nn.Module) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel over its trainable (LoRA) parameters only.

    DDP keeps the ranks in step: at construction it copies rank 0's parameters to every rank,
    and in backward it all-reduces gradients, bucket by bucket, while the rest of backward still
    runs. Each rank loaded the frozen base itself, identical everywhere, so we tell DDP to leave
    those parameters and all buffers alone: otherwise it would broadcast the whole base at start
    (14 GB for a 7B model in bf16). ``find_unused_parameters=False``: every LoRA parameter is
    used in every forward, so DDP need not search the graph for unused ones after each step.

    Returned as is when not distributed (one process needs no wrapper)."""
    if world_size() == 1:
        return model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    ignore = [name for name, _ in model.named_parameters() if name not in trainable]
    ignore += [name for name, _ in model.named_buffers()]
    # Private but long-standing (torch >= 1.8) and meant for exactly this (pytorch issue #43690).
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    device = next(p for p in model.parameters() if p.requires_grad).device
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=False)
    ddp.register_comm_hook(None, _allreduce_sum)
    return ddp


def sync_gradients(net: nn.Module, now: bool):
    """Context for one micro-batch's forward + backward: all-reduce its gradients only if ``now``.

    With gradient accumulation, gradients are summed locally over a rank's micro-batches
    (``no_sync``) and all-reduced once, in the backward of the rank's last micro-batch."""
    if now or not isinstance(net, DistributedDataParallel):
        return nullcontext()
    return net.no_sync()
