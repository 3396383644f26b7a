"""``run.sync_batchnorm`` on real gloo process groups: at 2 workers, with the batch split
over the ranks, the training-mode outputs, the running statistics and the DDP-averaged
parameter gradients equal plain BatchNorm on the concatenated batch in one process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from orchestrator.train.sync_batchnorm import GroupBatchNorm, convert_batchnorm

pytestmark = pytest.mark.dist

WORLD, LOCAL = 2, 3


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.PReLU(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 6),
        torch.nn.BatchNorm1d(6),
    ).double()


def batch() -> torch.Tensor:
    return torch.randn(WORLD * LOCAL, 3, 5, 5, generator=torch.Generator().manual_seed(1)).double()


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return (out * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype)).pow(3).mean()


def worker(rank: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    net = DDP(convert_batchnorm(model()))
    x = batch()[rank * LOCAL : (rank + 1) * LOCAL]
    for _ in range(2):  # two steps of running statistics
        net.zero_grad()
        y = net(x)
        loss_of(y).backward()
    grads = {k: p.grad.clone() for k, p in net.module.named_parameters() if p.grad is not None}
    torch.save({"out": y.detach(), "state": net.module.state_dict(), "grads": grads}, out)
    # DDP and the graph of the last step freed while the group lives, as a Ray Train
    # worker's are when its loop returns: freed after destroy_process_group, they hung the
    # process at the function's return (2 runs in 9, both ranks past the destroy).
    del net, y
    dist.barrier()  # no rank tears gloo down while a peer is still exchanging
    dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown race with gloo's threads (see test_sharded_gloo)


def test_group_batchnorm_at_two_workers_equals_one_process_on_the_whole_batch(
    tmp_path: Path,
) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    rendezvous = str(tmp_path / "rendezvous")
    procs = [mp.get_context("spawn").Process(target=worker, args=(r, rendezvous, outs[r])) for r in range(WORLD)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    reference = model()
    x = batch()
    for _ in range(2):
        reference.zero_grad()
        want = reference(x)
        # DDP averages the ranks' gradients of their local-mean losses: the reference is
        # the mean of the two halves' losses on the whole batch's normalisation.
        halves = [loss_of(want[r * LOCAL : (r + 1) * LOCAL]) for r in range(WORLD)]
        (torch.stack(halves).sum() / WORLD).backward()
    ranks = [torch.load(o, weights_only=True) for o in outs]
    for rank, got in enumerate(ranks):
        torch.testing.assert_close(got["out"], want[rank * LOCAL : (rank + 1) * LOCAL].detach())
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(got["state"][key], value, msg=key)
        for key, param in reference.named_parameters():
            torch.testing.assert_close(got["grads"][key], param.grad, msg=key)
    # Plain per-rank BatchNorm differs: the test can tell the two apart.
    plain = model()
    plain(x[:LOCAL])
    assert not torch.allclose(
        plain.state_dict()["1.running_mean"], reference.state_dict()["1.running_mean"]
    )


def test_conversion_keeps_the_state_and_evaluates_like_batchnorm() -> None:
    original = model().eval()
    converted = convert_batchnorm(model()).eval()
    assert sum(isinstance(m, GroupBatchNorm) for m in converted.modules()) == 2
    assert original.state_dict().keys() == converted.state_dict().keys()
    x = batch()
    torch.testing.assert_close(converted(x), original(x))
    converted.train()
    original.train()
    torch.testing.assert_close(converted(x), original(x))  # no process group: plain BatchNorm
