"""Tensors are born where their inputs live, checked on CPU.

Every input below is placed on CPU explicitly, and the code under test runs with
``torch.set_default_device("meta")``. A tensor factory in our code that forgets its
``device=`` (``torch.zeros(n)`` instead of ``torch.zeros(n, device=x.device)``) then makes
a meta tensor, and the next operation that mixes it with a CPU tensor fails: the same
mistake that would mix CPU and CUDA tensors on a GPU. The losses (dense and sharded, three
margins, sampling on and off, world sizes 1 and 2 over gloo), one training step and the
evaluation embedding are covered.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.config import Arch, LossConfig, MarginConfig, MarginType, Method
from orchestrator.evaluation import embed_images
from orchestrator.losses import Margin, build_loss
from orchestrator.losses.sharded import Shard, ShardedProxylessLoss
from orchestrator.models import build_backbone
from orchestrator.train.step import train_step

CPU = torch.device("cpu")
NUM_CLASSES, EMB_DIM, LOCAL_BATCH = 13, 8, 4
MARGINS = {
    "arcface": MarginConfig(type=MarginType.ARCFACE, scale=16.0, m=0.5),
    "cosface": MarginConfig(type=MarginType.COSFACE, scale=16.0, m=0.35),
    "combined": MarginConfig(type=MarginType.COMBINED, scale=16.0, m1=0.95, m2=0.2, m3=0.1),
}


@contextmanager
def default_device_meta() -> Iterator[None]:
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def inputs(rank: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=CPU).manual_seed(rank)
    embeddings = torch.randn(LOCAL_BATCH, EMB_DIM, generator=g, device=CPU, requires_grad=True)
    labels = torch.randint(0, NUM_CLASSES, (LOCAL_BATCH,), generator=g, device=CPU)
    weight = torch.randn(NUM_CLASSES, EMB_DIM, generator=torch.Generator(device=CPU), device=CPU)
    return embeddings, labels, weight


def sharded_step(margin: str, sample_rate: float, *, rank: int, world: int) -> torch.Tensor:
    embeddings, labels, weight = inputs(rank)
    shard = Shard.for_rank(NUM_CLASSES, world, rank)
    rows = weight[shard.class_start : shard.class_start + shard.local_classes]
    loss_fn = ShardedProxylessLoss(
        rows, shard, Margin.from_config(MARGINS[margin]), chunk_size=5, sample_rate=sample_rate
    )
    with default_device_meta():
        loss = loss_fn(embeddings, labels).loss
        loss.backward()
    assert loss.device == CPU and embeddings.grad is not None and embeddings.grad.device == CPU
    assert torch.isfinite(loss) and torch.isfinite(embeddings.grad).all()
    return loss.detach()


@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_sharded_loss_makes_no_tensor_off_its_inputs_device(
    margin: str, sample_rate: float
) -> None:
    sharded_step(margin, sample_rate, rank=0, world=1)


@pytest.mark.parametrize("method", [Method.PROXYLESS, Method.SCRATCH, Method.LOGIT])
@pytest.mark.parametrize("margin", list(MARGINS))
def test_dense_losses_make_no_tensor_off_their_inputs_device(method: Method, margin: str) -> None:
    embeddings, labels, weight = inputs()
    loss_fn = build_loss(
        LossConfig(method=method, margin=MARGINS[margin]),
        num_classes=NUM_CLASSES,
        emb_dim=EMB_DIM,
        teacher_classifier=weight,
    )
    teacher = torch.randn(LOCAL_BATCH, EMB_DIM, device=CPU)
    with default_device_meta():
        loss = loss_fn(embeddings, labels, teacher).loss
        loss.backward()
    assert loss.device == CPU and embeddings.grad is not None and torch.isfinite(loss)


def test_train_step_and_evaluation_embedding_stay_on_cpu() -> None:
    torch.manual_seed(0)
    student = build_backbone(Arch.TINY_MOBILEFACENET, EMB_DIM, input_size=32).to(CPU)
    _, labels, weight = inputs()
    loss_fn = build_loss(
        LossConfig(), num_classes=NUM_CLASSES, emb_dim=EMB_DIM, teacher_classifier=weight
    ).to(CPU)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    images = torch.rand(LOCAL_BATCH, 3, 32, 32, device=CPU) * 2 - 1
    faces = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    # The embedding model has no BatchNorm: torch's own eval-mode batch_norm decomposition
    # makes a tensor without a device under a meta default (a false alarm, not our code).
    embedder = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.Flatten(), torch.nn.LazyLinear(EMB_DIM)
    ).to(CPU)
    embedder(torch.zeros(1, 3, 32, 32, device=CPU))  # materialise the lazy layer
    with default_device_meta():
        out = train_step(student, loss_fn, optimizer=optimizer, images=images, labels=labels)
        embedded = embed_images(embedder, faces, batch_size=2, flip=True)
    assert out.loss.device == CPU and torch.isfinite(out.loss)
    assert all(p.device == CPU for p in student.parameters())
    assert embedded.shape == (3, EMB_DIM) and np.isfinite(embedded).all()


def gloo_worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    losses = {
        f"{margin}@{rate}": float(sharded_step(margin, rate, rank=rank, world=world))
        for margin in MARGINS
        for rate in (1.0, 0.5)
    }
    torch.save(losses, f"{out}.{rank}")
    dist.barrier()
    os._exit(0)  # no interpreter teardown race with gloo's threads (see test_sharded_gloo)


@pytest.mark.dist
def test_sharded_loss_over_gloo_makes_no_tensor_off_its_inputs_device(tmp_path: Path) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out = str(tmp_path / "rank")
    mp.spawn(gloo_worker, args=(2, str(tmp_path / "rendezvous"), out), nprocs=2, join=True)
    results = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert len(results[0]) == 6 and results[0] == results[1]  # the global loss on every rank
