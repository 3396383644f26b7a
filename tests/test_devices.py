"""bf16 autocast and channels_last, and the sharded frozen loss (exact and sampled) against a
float64 reference: on CPU always, on CUDA when a GPU exists (skipped cleanly otherwise)."""

from __future__ import annotations

import pytest
import torch

from orchestrator.config import Arch, LossConfig, MarginConfig
from orchestrator.losses import Margin, build_loss
from orchestrator.losses.heads import FrozenClassifier
from orchestrator.losses.objectives import ProxylessLoss, classifier_loss
from orchestrator.losses.sharded import Shard, ShardedProxylessLoss, sample_classes
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


def float64_reference(
    embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, margin: Margin
) -> tuple[float, torch.Tensor]:
    """The dense frozen loss in float64 on CPU, and its gradient w.r.t. the embeddings."""
    e = embeddings.detach().cpu().double().requires_grad_(True)
    loss = classifier_loss(FrozenClassifier(weight.cpu().double()), margin, e, labels.cpu()).loss
    loss.backward()
    assert e.grad is not None
    return float(loss.detach()), e.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("sample_rate", [1.0, 0.3])
def test_sharded_loss_on_the_device_matches_float64(
    device: str, precision: str, sample_rate: float
) -> None:
    """ShardedProxylessLoss (world size 1, W in 5 chunks) and its sampled variant on the
    device, against the dense float64 loss on CPU over the same classes."""
    num_classes, dim, batch = 300, 16, 24
    g = torch.Generator().manual_seed(7)
    weight = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    embeddings, labels = (
        torch.randn(batch, dim, generator=g),
        torch.randint(0, 40, (batch,), generator=g),
    )
    margin = Margin.arcface(32.0, 0.4)

    def make() -> ShardedProxylessLoss:
        return ShardedProxylessLoss(
            weight.to(device), Shard.for_rank(num_classes, 1, 0), margin, chunk_size=64,
            matmul_dtype=torch.bfloat16 if precision == "bf16" else None,
            sample_rate=sample_rate, normalized=True,
        ).to(device)  # fmt: skip

    loss_fn = make()
    x = embeddings.to(device).requires_grad_(True)
    loss = loss_fn(x, labels.to(device)).loss
    loss.backward()
    assert loss.device.type == torch.device(device).type and x.grad is not None
    ref_weight, ref_labels = weight, labels
    if sample_rate < 1.0:  # the twin's first generator draws the same classes
        sampled = sample_classes(
            labels.to(device), weight.to(device), shard=Shard.for_rank(num_classes, 1, 0),
            rate=sample_rate, generator=make().sampling_generator(),
        )  # fmt: skip
        assert sampled.index.device.type == torch.device(device).type
        assert sampled.index.numel() == round(sample_rate * num_classes)
        ref_weight, ref_labels = weight[sampled.index.cpu()], sampled.labels.cpu()
    ref_loss, ref_grad = float64_reference(embeddings, ref_labels, ref_weight, margin)
    loss_tol, grad_tol = (1e-5, 1e-4) if precision == "fp32" else (1e-2, 2e-2)
    assert abs(float(loss.detach()) - ref_loss) <= loss_tol * abs(ref_loss)
    error = float((x.grad.detach().cpu().double() - ref_grad).norm() / ref_grad.norm())
    assert error <= grad_tol, f"relative gradient error {error:.2e}"
