"""One optimisation step, independent of Ray (tested with plain gloo). How its gradients
are combined over the workers: :mod:`orchestrator.train.distributed`."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from orchestrator.losses import LossOutput
from orchestrator.losses.margins import at_least_fp32
from orchestrator.train.distributed import overlapped_averaging


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
