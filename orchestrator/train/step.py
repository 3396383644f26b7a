"""One optimisation step and its schedule, independent of Ray (tested with plain gloo).

How the gradients of one step are combined over workers: the student's by DDP (the
worker wraps it), the loss's own trainable classifier's (baselines only) explicitly by
:func:`average_gradients` here, and the embedding gradient of the class-sharded loss by
that loss's own collectives (:mod:`orchestrator.losses.sharded`). The frozen teacher
classifier takes part in none of them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

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


def average_gradients(
    params: Iterable[nn.Parameter], group: dist.ProcessGroup | None = None
) -> None:
    """All-reduce and average ``params``' gradients over ``group`` (what DDP does for the
    student), for the replicated parameters that live outside the DDP module."""
    if not dist.is_available() or not dist.is_initialized():
        return
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
            p.grad.div_(world_size)


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
    out.loss.backward()
    average_gradients(loss_fn.parameters(), group)
    optimizer.step()
    return out
