"""One optimisation step and its schedule, independent of Ray (tested with plain gloo).

How the gradients of one step are combined over workers: the student's by DDP (the
worker wraps it), the loss's own trainable classifier's (baselines only) explicitly by
:func:`overlapped_averaging` here (all-reduced during the backward), and the embedding gradient of the class-sharded loss by
that loss's own collectives (:mod:`orchestrator.losses.sharded`). The frozen teacher
classifier takes part in none of them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from orchestrator.losses import LossOutput
from orchestrator.losses.margins import at_least_fp32


def lr_at(step: int, *, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up to ``base_lr``, then cosine decay to zero at ``total_steps``.

    A pure function of the step, so a resumed run continues the same schedule.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[object]:
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_step(
    student: nn.Module,
    loss_fn: nn.Module,
    *,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    teacher_embeddings: torch.Tensor | None = None,
    lr: float | None = None,
    bf16: bool = False,
    group: dist.ProcessGroup | None = None,
) -> LossOutput:
    """Forward, backward and update on this worker's slice of the global batch.

    Each worker's loss is the mean over its local batch and the gradients are averaged
    over workers, which equals the gradient of the mean over the global batch (the local
    batches are equal in size).
    """
    if lr is not None:
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    with autocast(images.device, bf16):
        embeddings = student(images)
    # bf16 autocast output goes back to fp32 for the loss; fp32/fp64 pass through.
    out: LossOutput = loss_fn(at_least_fp32(embeddings), labels, teacher_embeddings)
    with overlapped_averaging(loss_fn.parameters(), group):
        out.loss.backward()
    optimizer.step()
    return out
