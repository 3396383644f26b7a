"""Parameter and multiply-accumulate counts, measured by running one forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelProfile:
    params: int
    macs: int  # multiply-accumulates of conv and linear layers for one image

    @property
    def mparams(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def profile_model(model: nn.Module, input_size: int = 112) -> ModelProfile:
    """Count parameters and the MACs of every Conv2d and Linear for one 3-channel image.

    BatchNorm, PReLU and additions are left out, as in the model-zoo figures.
    """
    total = 0

    def count(module: nn.Module, _inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups
            for k in module.kernel_size:
                per_output *= k
            total += out[0].numel() * per_output
        elif isinstance(module, nn.Linear):
            total += out[0].numel() * module.in_features

    hooks = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return ModelProfile(params=params, macs=total)
