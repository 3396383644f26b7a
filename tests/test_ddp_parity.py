"""2-worker DDP training (real gloo process group) equals single-process training on the
concatenated batches (float64; rtol 1e-8 allows for summation order over 3 momentum steps).

BatchNorm normalises each worker's batch separately under DDP (as in every DDP face
trainer), so the single-process reference runs the concatenated global batch through the
network as the same two halves and averages their losses: the quantity DDP's gradient
averaging optimises. Everything runs in float64 so the tolerance can be tight.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from orchestrator.config import Arch, LossConfig, MarginConfig, Method
from orchestrator.losses import build_loss
from orchestrator.models import build_backbone
from orchestrator.train.schedule import lr_at
from orchestrator.train.step import train_step

pytestmark = pytest.mark.dist

NUM_CLASSES, EMB_DIM, LOCAL_BATCH, STEPS, WORLD = 7, 16, 3, 3, 2


def make_setup(
    method: Method,
) -> tuple[torch.nn.Module, torch.nn.Module, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    student = build_backbone(Arch.TINY_MOBILEFACENET, EMB_DIM, input_size=32).double()
    teacher_w = torch.randn(NUM_CLASSES, EMB_DIM, dtype=torch.float64)
    loss_fn = build_loss(
        LossConfig(method=method, margin=MarginConfig(scale=16.0, m=0.3)),
        num_classes=NUM_CLASSES,
        emb_dim=EMB_DIM,
        teacher_classifier=teacher_w,
    ).double()
    g = torch.Generator().manual_seed(1)
    images = [
        torch.randn(WORLD * LOCAL_BATCH, 3, 32, 32, generator=g, dtype=torch.float64)
        for _ in range(STEPS)
    ]
    labels = [
        torch.randint(0, NUM_CLASSES, (WORLD * LOCAL_BATCH,), generator=g) for _ in range(STEPS)
    ]
    teacher_emb = torch.randn(STEPS, WORLD * LOCAL_BATCH, EMB_DIM, generator=g, dtype=torch.float64)
    return student, loss_fn, images, labels, teacher_emb


def optimizer_for(student: torch.nn.Module, loss_fn: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [*student.parameters(), *loss_fn.parameters()], lr=0.1, momentum=0.9, weight_decay=5e-4
    )


def worker(rank: int, methods: list[Method], rendezvous: str, out: str) -> None:
    """Each method in turn on one process group (spawned once for all of them): rank 0
    saves the trained state of each under ``out.<method>``."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    for method in methods:
        trained = train_two_workers(rank, method)
        if rank == 0:
            torch.save(trained, f"{out}.{method.value}")
    dist.barrier()  # no rank tears gloo down while a peer is still exchanging
    dist.destroy_process_group()
    # The results are on disk. Skip interpreter teardown: gloo's threads occasionally meet
    # C++ static destructors there ("terminate called without an active exception",
    # SIGABRT after all work is done), which would fail an otherwise finished run.
    os._exit(0)


def train_two_workers(rank: int, method: Method) -> dict[str, dict[str, torch.Tensor]]:
    student, loss_fn, images, labels, teacher_emb = make_setup(method)
    ddp = DDP(student)
    optimizer = optimizer_for(student, loss_fn)
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    for step in range(STEPS):
        train_step(
            ddp,
            loss_fn,
            optimizer=optimizer,
            images=images[step][mine],
            labels=labels[step][mine],
            teacher_embeddings=teacher_emb[step][mine],
            lr=lr_at(step, total_steps=STEPS, warmup_steps=1, base_lr=0.1),
        )
    return {"student": student.state_dict(), "loss": loss_fn.state_dict()}


def reference(method: Method) -> dict[str, dict[str, torch.Tensor]]:
    student, loss_fn, images, labels, teacher_emb = make_setup(method)
    optimizer = optimizer_for(student, loss_fn)
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps=STEPS, warmup_steps=1, base_lr=0.1)
        optimizer.zero_grad()
        halves = [slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH) for r in range(WORLD)]
        total = sum(
            loss_fn(student(images[step][h]), labels[step][h], teacher_emb[step][h]).loss
            for h in halves
        )
        (total / WORLD).backward()
        optimizer.step()
    return {"student": student.state_dict(), "loss": loss_fn.state_dict()}


METHODS = [Method.PROXYLESS, Method.SCRATCH, Method.L2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where rank 0 saved each method's state, from one spawn of two ranks for all three
    (a spawn costs seconds, the steps milliseconds)."""
    root = tmp_path_factory.mktemp("ddp")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(METHODS, str(root / "rendezvous"), str(root / "ddp.pt")), nprocs=WORLD)
    return root


@pytest.mark.parametrize("method", METHODS)
def test_two_worker_ddp_equals_single_process(method: Method, trained: Path) -> None:
    ddp = torch.load(trained / f"ddp.pt.{method.value}", weights_only=True)
    ref = reference(method)
    initial_model = make_setup(method)[0]
    initial = initial_model.state_dict()
    # Trained parameters only: BatchNorm running statistics are buffers that DDP copies from
    # rank 0 (its own halves), so they legitimately differ from the reference's.
    parameter_names = [name for name, _ in initial_model.named_parameters()]
    moved = 0
    for key in parameter_names:
        value = ref["student"][key]
        torch.testing.assert_close(
            ddp["student"][key], value, rtol=1e-8, atol=1e-10, msg=f"parameter {key} differs"
        )
        moved += int(not torch.equal(value, initial[key]))
    assert moved > 10, "the parameters really moved during the steps"
    # The baselines' own classifier is replicated and averaged too; proxyless has none.
    assert ddp["loss"].keys() == ref["loss"].keys()
    for key, value in ref["loss"].items():
        torch.testing.assert_close(ddp["loss"][key], value, rtol=1e-8, atol=1e-10)
    assert (len(ref["loss"]) == 0) == (method is Method.PROXYLESS)
