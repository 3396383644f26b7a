"""The sharded loss on real gloo process groups with DDP: world sizes 1-4, C not divisible
by N, a rank owning none of the batch's targets, three margins. Loss and the student's
parameter gradients (after DDP's averaging) equal single-process training on the
concatenated global batch with the full W (fp32, rtol 1e-5).

The student here has no BatchNorm, so the dense reference on the concatenated batch is
exactly the same function (BatchNorm would normalise per rank, see test_ddp_parity.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from orchestrator.config import LossConfig, MarginConfig, MarginType
from orchestrator.losses import LabelRangeError, Margin, build_loss
from orchestrator.losses.sharded import Shard, ShardedProxylessLoss

pytestmark = pytest.mark.dist

NUM_CLASSES, EMB_DIM, IN_DIM, LOCAL_BATCH = 23, 8, 12, 4
MARGINS = {
    "arcface": Margin.arcface(16.0, 0.5),
    "cosface": Margin.cosface(16.0, 0.35),
    "combined": Margin(scale=16.0, m1=0.95, m2=0.2, m3=0.1),
}


def setup(
    world: int, bad_label: bool
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    student = torch.nn.Sequential(
        torch.nn.Linear(IN_DIM, 16), torch.nn.PReLU(), torch.nn.Linear(16, EMB_DIM)
    )
    weight = torch.randn(NUM_CLASSES, EMB_DIM)
    x = torch.randn(world * LOCAL_BATCH, IN_DIM)
    # Targets only among the first 5 classes: with N >= 2 the last rank owns none of them.
    labels = torch.randint(0, 5, (world * LOCAL_BATCH,))
    if bad_label:
        labels[-1] = NUM_CLASSES + 4
    return student, weight, x, labels


def worker(
    rank: int, world: int, margin_names: list[str], rendezvous: str, out: str, bad_label: bool
) -> None:
    """Each margin in turn on one process group (spawned once per world size): a fresh
    student and DDP wrap, one forward and backward; the results by margin name."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {name: one_step(rank, world, name, bad_label) for name in margin_names}
    torch.save(results, f"{out}.{rank}")
    dist.barrier()  # no rank tears gloo down while a peer is still exchanging
    dist.destroy_process_group()
    # The results are on disk. Skip interpreter teardown: gloo's threads occasionally meet
    # C++ static destructors there ("terminate called without an active exception",
    # SIGABRT after all work is done), which would fail an otherwise finished run.
    os._exit(0)


def one_step(rank: int, world: int, margin_name: str, bad_label: bool) -> dict[str, object]:
    student, weight, x, labels = setup(world, bad_label)
    shard = Shard.for_rank(NUM_CLASSES, world, rank)
    rows = weight[shard.class_start : shard.class_start + shard.local_classes]
    loss_fn = ShardedProxylessLoss(rows, shard, MARGINS[margin_name], chunk_size=3)
    model = DDP(student)
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    result: dict[str, object] = {
        "owned_targets": int(
            (
                (labels >= shard.class_start) & (labels < shard.class_start + shard.local_classes)
            ).sum()
        )
    }
    try:
        out_loss = loss_fn(model(x[mine]), labels[mine])
        out_loss.loss.backward()
        result["loss"] = float(out_loss.loss.detach())
        result["grads"] = [p.grad.clone() for p in student.parameters()]  # type: ignore[union-attr]
        result["ddp_params"] = sum(p.numel() for p in model.parameters())
        result["ddp_buffers"] = sum(b.numel() for b in model.buffers())
    except LabelRangeError as err:
        result["error"] = str(err)
    return result


def dense_reference(world: int, margin_name: str) -> tuple[float, list[torch.Tensor]]:
    student, weight, x, labels = setup(world, False)
    m = MARGINS[margin_name]
    config = LossConfig(
        margin=MarginConfig(type=MarginType.COMBINED, scale=m.scale, m1=m.m1, m2=m.m2, m3=m.m3)
    )
    loss = build_loss(config, num_classes=NUM_CLASSES, emb_dim=EMB_DIM, teacher_classifier=weight)(
        student(x), labels
    ).loss
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in student.parameters()]  # type: ignore[union-attr]


def run(
    world: int, margin_names: list[str], tmp_path: Path, bad_label: bool = False
) -> list[dict[str, dict[str, object]]]:
    """One spawn of ``world`` ranks; each rank's results by margin name."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out = str(tmp_path / "rank")
    mp.spawn(
        worker,
        args=(world, margin_names, str(tmp_path / "rendezvous"), out, bad_label),
        nprocs=world,
        join=True,
    )
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda world: f"world{world}")
def ranks(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, list[dict[str, dict[str, object]]]]:
    """A world size and its ranks' results for every margin, from one spawn per world size
    (a spawn costs seconds, the steps milliseconds)."""
    world = request.param
    return world, run(world, list(MARGINS), tmp_path_factory.mktemp(f"world{world}"))


@pytest.mark.parametrize("margin_name", list(MARGINS))
def test_sharded_training_equals_dense(
    margin_name: str, ranks: tuple[int, list[dict[str, dict[str, object]]]]
) -> None:
    world, by_rank = ranks
    results = [by_margin[margin_name] for by_margin in by_rank]
    ref_loss, ref_grads = dense_reference(world, margin_name)
    if world > 1:
        assert results[-1]["owned_targets"] == 0, "the last rank owns none of the targets"
    for rank, result in enumerate(results):
        assert result["loss"] == pytest.approx(ref_loss, rel=1e-5), f"rank {rank}"
        for got, ref in zip(result["grads"], ref_grads, strict=True):  # type: ignore[call-overload]
            error = float((got - ref).norm() / ref.norm())
            assert error <= 1e-5, f"rank {rank}: relative gradient error {error:.2e}"
        # DDP holds the student only: its parameters, no classifier rows.
        assert result["ddp_params"] == sum(g.numel() for g in ref_grads)
        assert result["ddp_buffers"] == 0


def test_out_of_range_label_errors_on_every_rank_without_hanging(tmp_path: Path) -> None:
    results = [by_margin["arcface"] for by_margin in run(3, ["arcface"], tmp_path, True)]
    for result in results:
        assert "label 27" in str(result.get("error")) and "num_classes=23" in str(result["error"])
