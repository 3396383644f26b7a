"""bf16 autocast and channels_last: on CPU always, on CUDA when a GPU exists."""

from __future__ import annotations

import pytest
import torch

from orchestrator.config import Arch, LossConfig, MarginConfig
from orchestrator.losses import build_loss
from orchestrator.losses.objectives import ProxylessLoss
from orchestrator.models import build_backbone
from orchestrator.train.step import train_step

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


def setup(
    device: str, channels_last: bool
) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    student = build_backbone(Arch.TINY_IRESNET, 32, input_size=64).to(device)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    loss_fn = build_loss(
        LossConfig(margin=MarginConfig(scale=16.0, m=0.3)),
        num_classes=10,
        emb_dim=32,
        teacher_classifier=torch.randn(10, 32),
    ).to(device)
    images = torch.randn(8, 3, 64, 64, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return student, loss_fn, images, torch.arange(8, device=device) % 10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_step_tracks_fp32(device: str, channels_last: bool) -> None:
    losses = {}
    for bf16 in (False, True):
        student, loss_fn, images, labels = setup(device, channels_last)
        assert isinstance(loss_fn, ProxylessLoss)
        frozen = loss_fn.classifier.weight.clone()
        optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
        out = train_step(
            student, loss_fn, optimizer=optimizer, images=images, labels=labels, bf16=bf16
        )
        losses[bf16] = float(out.loss.detach())
        assert out.loss.dtype == torch.float32, "the loss itself is computed in fp32"
        assert torch.equal(loss_fn.classifier.weight, frozen)
    # bf16 has an 8-bit mantissa: the forward differs, but only by rounding.
    assert losses[True] == pytest.approx(losses[False], rel=0.05)
