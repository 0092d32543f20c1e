"""A round's training and validation inside a ``torch.distributed`` process group (docs/design.md, "Several devices").

Pure ML code over the process group that :mod:`gcml_app.rounds.ranks` starts (one process per device,
NCCL on GPUs, gloo on CPUs). Every helper is the identity when no group is initialised, so one device,
the simulator and the bench run exactly as before:

- :func:`parallel`: a model wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` for its training
  passes (gradients averaged across ranks in the backward pass);
- :func:`share`: this rank's share of the validation cases, of the cases to preprocess, and of each case's
  training crops (:func:`~gcml_app.ml.transforms.crop_transforms`), so the ranks together train on the
  one-device batch;
- :func:`all_true`, :func:`global_mean`: a decision every rank takes alike (skip a non-finite step) and
  the loss figures of the whole step;
- :func:`global_sum`: a loss's batch statistics (DCML's region balance and normalisers, InfoNCE's count of
  volumes, a teacher's Dice) over every rank's crops, so each rank's loss is its part of the one-device loss;
- :func:`gather_cases`: per-case results scored on ``cases[rank::world]``, back in the cases' order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["all_true", "barrier", "gather_cases", "global_mean", "global_sum", "parallel", "rank", "share", "unwrap",
           "world"]

T = TypeVar("T")


def world() -> int:
    """Processes in the round's group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the round's group (0 without one)."""
    return dist.get_rank() if world() > 1 else 0


def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op on one device)."""
    if world() > 1:
        dist.barrier()


def share(items: Sequence[T]) -> list[T]:
    """This rank's items of ``items``: ``items[rank::world]`` (all of them on one device)."""
    return list(items[rank()::world()])


def gather_cases(mine: Sequence[T]) -> list[T]:
    """Every rank's :func:`share` results, back in the original order (the inverse of ``items[r::world]``).

    Example:
        two ranks scored cases ``[a, c]`` and ``[b]``: both get ``[a, b, c]``.
    """
    n = world()
    if n == 1:
        return list(mine)
    parts: list[list[T]] = [[] for _ in range(n)]
    dist.all_gather_object(parts, list(mine))
    out: list[T] = []
    for i in range(max(len(p) for p in parts)):
        out.extend(p[i] for p in parts if i < len(p))
    return out


@contextlib.contextmanager
def parallel(model: torch.nn.Module, head: bool = True) -> Iterator[torch.nn.Module]:
    """``model`` for training passes: wrapped in ``DistributedDataParallel`` when there are several ranks.

    Rank 0's weights are broadcast to the others when the wrapper is built, and every backward pass
    averages the gradients, so the ranks' models stay equal. A network's projection head that the loss
    does not use (``head=False``: a supervised step, DCML without InfoNCE) is frozen for the wrapper's life,
    so no parameter goes without a gradient and DDP needs no unused-parameter search. Batch norm is
    synchronised across ranks on NCCL (a GPU step's batch is the ranks' crops together).

    Yields:
        the module to call for training forward passes (``model`` itself on one device).
    """
    if world() == 1:
        yield model
        return
    frozen = [] if head or not hasattr(model, "head") else [p for p in model.head.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        if dist.get_backend() == "nccl":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device = next(model.parameters()).device
        yield DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a :func:`parallel` wrapper (its own methods: ``embed_points``, ``with_guidance``)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_true(*flags: bool) -> list[bool]:
    """Each flag, true only if it is true on every rank (one all-reduce): a step is skipped on all ranks or none."""
    if world() == 1:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, without gradient: a batch statistic (a count, a normaliser) of the step's
    crops on every rank together. The identity on one device."""
    if world() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def global_mean(values: Sequence[float]) -> list[float]:
    """The mean of each value over the ranks (a step's loss over all its crops: the ranks' shares are equal)."""
    if world() == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [v / world() for v in t.tolist()]
