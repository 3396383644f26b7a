"""Everything the workers do together, in one room, each function with its collective:

- the student: DDP (:func:`wrap_student`, Ray's ``prepare_model``): its gradients are
  all-reduced in buckets during the backward;
- a baseline's own trainable classifier: :func:`overlapped_averaging` (all-reduce per
  gradient, issued from the backward, averaged at its end);
- the class-sharded loss's own collectives live with its math
  (:mod:`orchestrator.losses.sharded`): all-gather of embeddings, all-reduce of the
  softmax statistics, reduce-scatter of the embedding gradient;
- :func:`barrier` and :func:`gather_ids` (``all_gather_object``) for the mid-epoch
  checkpoint protocol (:mod:`orchestrator.train.midepoch`).

The frozen teacher classifier takes part in none of them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@contextlib.contextmanager
def overlapped_averaging(
    params: Iterable[nn.Parameter], group: dist.ProcessGroup | None = None
) -> Iterator[None]:
    """Around a backward pass: each of ``params``' gradients is all-reduced as soon as it is
    accumulated (asynchronously, while the rest of the backward runs, as DDP does for its
    buckets), and averaged when the block ends: after the backward each gradient is the
    mean over the workers, what DDP gives the student. A baseline's own classifier (C x d:
    51 MB at C = 100k, d = 128) is the first gradient the backward produces, so its
    all-reduce overlaps the whole student backward instead of following it (measured with
    ``bench/train_throughput.py``: scratch at C = 100k went from 0.64 to 0.96 of plain DDP).

    Collectives on one group run in the order they are issued, the same on every rank:
    these are issued from the backward in its fixed order, before DDP's buckets."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        yield
        return
    world_size = dist.get_world_size(group)
    pending: list[tuple[torch.Tensor, dist.Work]] = []

    def launch(p: torch.Tensor) -> None:
        assert p.grad is not None
        pending.append((p.grad, dist.all_reduce(p.grad, group=group, async_op=True)))

    handles = [p.register_post_accumulate_grad_hook(launch) for p in params if p.requires_grad]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for grad, work in pending:
            work.wait()
            grad.div_(world_size)


def gather_ids(ids: list[str], world_size: int) -> list[str]:
    """Every rank's ``ids``, on every rank, in rank order (``all_gather_object``)."""
    if world_size == 1:
        return list(ids)
    parts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(parts, ids)
    return [i for part in parts for i in part]


def unwrap(model: nn.Module) -> nn.Module:
    """The student inside its DDP wrapper (no collective)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def wrap_student(student: nn.Module) -> nn.Module:
    """DDP over the Ray Train workers (Ray's ``prepare_model``; on one worker, the model
    as it is): the student's gradients are all-reduced in buckets during the backward."""
    # ray.train: heavy (about a second to import); the gloo tests use this room without Ray
    import ray.train.torch

    return ray.train.torch.prepare_model(student)


def barrier(world_size: int) -> None:
    """Every rank waits for every other (a no-op alone)."""
    if world_size > 1:
        torch.distributed.barrier()
