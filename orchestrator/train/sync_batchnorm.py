"""BatchNorm whose training statistics span every worker (``run.sync_batchnorm``).

torch's ``SyncBatchNorm`` refuses CPU tensors, so this one is written out: per channel,
each rank sums x and x^2 over its batch (and its spatial positions), one differentiable
all-reduce of (sum, sum of squares, count) over ``group`` gives the global batch's mean and
biased variance, and the normalisation uses them. Its backward is the all-reduce's (the
gradient of every rank's loss reaches every rank's inputs), so after DDP averages the
parameter gradients they equal single-process training on the concatenated batch. The
running statistics are updated with the global batch's mean and unbiased variance on
every rank, so they agree across ranks. Evaluation mode, or one worker, is plain
BatchNorm.

Collectives: one all-reduce of 2C + 1 floats per BatchNorm layer per forward, and one in
backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce


class GroupBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm1d/2d with statistics over the whole ``group`` while training."""

    def __init__(
        self, num_features: int, *, eps: float, momentum: float | None, affine: bool,
        group: dist.ProcessGroup | None = None,
    ) -> None:  # fmt: skip
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self.group = group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected a 2-D, 3-D or 4-D input, found {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        spans_workers = (
            self.training and dist.is_initialized() and dist.get_world_size(self.group) > 1
        )
        if not spans_workers:
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        local = torch.cat(
            [
                input.sum(dims),  # (C,)
                (input * input).sum(dims),  # (C,)
                input.new_full((1,), input.numel() / channels),  # this rank's count
            ]
        )
        total = differentiable_all_reduce(local, group=self.group)  # sum over ranks
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels : 2 * channels] / count - mean * mean).clamp_min(0.0)
        self._update_running(mean.detach(), var.detach(), float(count))
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        if not self.track_running_stats or self.running_mean is None or self.running_var is None:
            return
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / max(count - 1.0, 1.0)
        self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)


def convert_batchnorm(module: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """``module`` with every BatchNorm1d/2d replaced by a :class:`GroupBatchNorm` holding
    the same parameters and running statistics (state dict keys unchanged)."""
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        synced = GroupBatchNorm(
            module.num_features, eps=module.eps, momentum=module.momentum,
            affine=module.affine, group=group,
        )  # fmt: skip
        reference = module.running_mean if module.running_mean is not None else module.weight
        if reference is not None:
            synced.to(device=reference.device, dtype=reference.dtype)
        synced.load_state_dict(module.state_dict())
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child, group))
    return module
