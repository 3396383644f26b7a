"""The sharded softmax's pure pieces in one process: N shards simulated by slicing W, each
shard's statistics computed alone, combined by hand, compared with the dense ProxylessLoss
(autograd through explicit logits) in float64 and float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orchestrator.config import LossConfig, MarginConfig, MarginType
from orchestrator.losses import Margin, build_loss
from orchestrator.losses.sharded import (
    GradientSync,
    Shard,
    ShardStats,
    embedding_gradient,
    losses_from,
    shard_stats,
    sharded_margin_loss,
)

MARGINS = {
    "arcface": Margin.arcface(16.0, 0.5),
    "cosface": Margin.cosface(16.0, 0.35),
    "combined": Margin(scale=16.0, m1=0.95, m2=0.2, m3=0.1),
}


def margin_config(m: Margin) -> LossConfig:
    return LossConfig(
        margin=MarginConfig(type=MarginType.COMBINED, scale=m.scale, m1=m.m1, m2=m.m2, m3=m.m3)
    )


def dense(
    emb: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, m: Margin
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and d loss / d (normalised embeddings) from the dense single-process loss."""
    e = F.normalize(emb, dim=1).detach().requires_grad_(True)
    loss_fn = build_loss(
        margin_config(m),
        num_classes=weight.shape[0],
        emb_dim=weight.shape[1],
        teacher_classifier=weight,
    )
    if weight.dtype == torch.float64:
        loss_fn = loss_fn.double()
    # ProxylessLoss normalises again: a no-op on unit vectors, so the gradient is the same.
    loss = loss_fn(e, labels).loss
    (grad,) = torch.autograd.grad(loss, e)
    return loss.detach(), grad


def simulate(
    emb: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, m: Margin, world: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    e = F.normalize(emb, dim=1)
    num_classes = weight.shape[0]
    shards = [Shard.for_rank(num_classes, world, r) for r in range(world)]
    normalised = F.normalize(weight, dim=1)
    stats = [
        shard_stats(
            e,
            labels,
            normalised[s.class_start : s.class_start + s.local_classes],
            s,
            m,
            chunk_size=chunk,
        )
        for s in shards
    ]
    global_max = torch.stack([s.row_max for s in stats]).max(dim=0).values
    global_sum = torch.zeros_like(global_max)
    global_target = torch.zeros_like(global_max)
    grad = torch.zeros_like(e)
    for part in stats:
        global_sum += part.sum_exp * torch.exp(part.row_max - global_max)
        global_target += part.target
    for part in stats:
        grad += (
            embedding_gradient(part, global_max=global_max, global_sum=global_sum, scale=m.scale)
            / e.shape[0]
        )
    loss = losses_from(global_max, global_sum, global_target).mean()
    # The dense reference differentiates through its own normalize(), i.e. projects onto the
    # tangent space of the unit sphere; so does the outer normalize() in training.
    grad = grad - (grad * e).sum(dim=1, keepdim=True) * e
    return loss, grad


@pytest.mark.parametrize("name", list(MARGINS))
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_simulated_shards_equal_dense(
    name: str, world: int, dtype: torch.dtype, rtol: float
) -> None:
    g = torch.Generator().manual_seed(world)
    num_classes, dim, batch = 23, 8, 10  # 23 is divisible by none of 2, 3, 4
    weight = torch.randn(num_classes, dim, generator=g, dtype=dtype)
    emb = torch.randn(batch, dim, generator=g, dtype=dtype)
    labels = torch.randint(
        0, 5, (batch,), generator=g
    )  # only low classes: high ranks own no target
    ref_loss, ref_grad = dense(emb, labels, weight, MARGINS[name])
    loss, grad = simulate(emb, labels, weight, MARGINS[name], world, chunk=4)
    assert float(loss) == pytest.approx(float(ref_loss), rel=rtol)
    error = float((grad - ref_grad).norm() / ref_grad.norm())
    assert error <= rtol, f"relative gradient error {error:.2e}"


def test_more_ranks_than_classes() -> None:
    weight = torch.randn(3, 4, dtype=torch.float64)
    emb = torch.randn(5, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 2, 0])
    ref_loss, ref_grad = dense(emb, labels, weight, MARGINS["arcface"])
    loss, grad = simulate(
        emb, labels, weight, MARGINS["arcface"], world=5, chunk=2
    )  # ranks 3, 4 own nothing
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunk_size_does_not_change_the_result(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(17, 6, generator=g, dtype=torch.float64)
    emb = torch.randn(9, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 17, (9,), generator=g)
    ref_loss, ref_grad = dense(emb, labels, weight, MARGINS["combined"])
    loss, grad = simulate(emb, labels, weight, MARGINS["combined"], world=2, chunk=chunk)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)


def test_world_size_one_autograd_matches_dense_for_student_parameters() -> None:
    """No process group: the autograd Function end to end, through a small student."""
    torch.manual_seed(0)
    student = torch.nn.Sequential(
        torch.nn.Linear(12, 16), torch.nn.PReLU(), torch.nn.Linear(16, 8)
    ).double()
    weight = torch.randn(11, 8, dtype=torch.float64)
    x = torch.randn(6, 12, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 10, 7, 1])
    m = MARGINS["arcface"]
    loss = sharded_margin_loss(
        student(x),
        labels,
        weight=F.normalize(weight, dim=1),
        shard=Shard.for_rank(11, 1, 0),
        margin=m,
        chunk_size=4,
        sync=GradientSync.SUM,
    )
    grads = torch.autograd.grad(loss, list(student.parameters()))
    dense_fn = build_loss(
        margin_config(m), num_classes=11, emb_dim=8, teacher_classifier=weight
    ).double()
    ref = dense_fn(student(x), labels).loss
    ref_grads = torch.autograd.grad(ref, list(student.parameters()))
    assert float(loss) == pytest.approx(float(ref), rel=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_bf16_matmuls_stay_close_to_fp32() -> None:
    """bf16 for the two chunk GEMMs, fp32 statistics: stated tolerance 2e-2 relative on the
    loss and on the embedding gradient (bf16 keeps 8 mantissa bits)."""
    g = torch.Generator().manual_seed(0)
    weight = F.normalize(torch.randn(2000, 64, generator=g), dim=1)
    emb = torch.randn(32, 64, generator=g)
    labels = torch.randint(0, 2000, (32,), generator=g)
    shard = Shard.for_rank(2000, 1, 0)
    m = MARGINS["arcface"]
    exact = shard_stats(F.normalize(emb, dim=1), labels, weight, shard, m, chunk_size=256)
    fast = shard_stats(
        F.normalize(emb, dim=1),
        labels,
        weight,
        shard,
        m,
        chunk_size=256,
        matmul_dtype=torch.bfloat16,
    )

    def finish(s: ShardStats) -> tuple[torch.Tensor, torch.Tensor]:
        return losses_from(s.row_max, s.sum_exp, s.target).mean(), embedding_gradient(
            s, global_max=s.row_max, global_sum=s.sum_exp, scale=m.scale
        )

    loss32, grad32 = finish(exact)
    loss16, grad16 = finish(fast)
    assert float(loss16) == pytest.approx(float(loss32), rel=2e-2)
    assert float((grad16 - grad32).norm() / grad32.norm()) < 2e-2
    assert fast.sum_exp.dtype == torch.float32, "statistics stay in fp32"


def test_negative_sampling_is_the_exact_loss_over_the_sampled_classes() -> None:
    from orchestrator.losses.sharded import sample_classes

    g = torch.Generator().manual_seed(0)
    num_classes, dim = 200, 8
    weight = F.normalize(torch.randn(num_classes, dim, generator=g, dtype=torch.float64), dim=1)
    emb = torch.randn(12, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (12,), generator=g)
    shard = Shard.for_rank(num_classes, 1, 0)
    m = MARGINS["arcface"]

    def sampled_loss(rate: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = emb.clone().requires_grad_(True)
        loss = sharded_margin_loss(
            x,
            labels,
            weight=weight,
            shard=shard,
            margin=m,
            chunk_size=16,
            sync=GradientSync.SUM,
            sampling=(rate, torch.Generator().manual_seed(5)),
        )
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    full_x = emb.clone().requires_grad_(True)
    full = sharded_margin_loss(
        full_x, labels, weight=weight, shard=shard, margin=m, chunk_size=16, sync=GradientSync.SUM
    )
    (full_grad,) = torch.autograd.grad(full, full_x)
    at_one, grad_one = sampled_loss(1.0)
    assert float(at_one) == pytest.approx(float(full), rel=1e-12)
    torch.testing.assert_close(grad_one, full_grad)

    sample = sample_classes(
        labels, weight, shard=shard, rate=0.3, generator=torch.Generator().manual_seed(5)
    )
    assert sample.index.numel() == 60 and set(labels.tolist()) <= set(sample.index.tolist()), (
        "all positives kept"
    )
    # Reference: the dense loss over exactly the sampled rows, labels renumbered.
    sub = build_loss(
        margin_config(m), num_classes=60, emb_dim=dim, teacher_classifier=weight[sample.index]
    ).double()
    x = emb.clone().requires_grad_(True)
    ref = sub(x, sample.labels).loss
    (ref_grad,) = torch.autograd.grad(ref, x)
    loss, grad = sampled_loss(0.3)
    assert float(loss) == pytest.approx(float(ref), rel=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert float(loss) < float(full), "fewer negatives: a smaller log-sum-exp (the approximation)"


def sampled_loss_module(seed: int) -> torch.nn.Module:
    from orchestrator.losses.sharded import ShardedProxylessLoss

    weight = torch.randn(300, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return ShardedProxylessLoss(
        weight, Shard.for_rank(300, 1, 0), MARGINS["cosface"], sample_rate=0.2, seed=seed
    )


def step_losses(loss_fn: torch.nn.Module, steps: range) -> list[float]:
    """The loss of fixed embeddings at each step: it differs between steps only through
    the negatives drawn."""
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(6, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 300, (6,), generator=g)
    return [float(loss_fn(emb, labels).loss) for _ in steps]


@pytest.mark.parametrize("seed", [0, 20261204, 2**63 - 1])
def test_negatives_resume_where_they_stopped_for_any_seed(seed: int) -> None:
    """A run interrupted after 3 steps and resumed from its saved loss state draws the
    negatives of steps 3-5 that an uninterrupted run draws (the call counter is in the
    state); large seeds (the 20261204 that overflowed) are valid."""
    uninterrupted = step_losses(sampled_loss_module(seed), range(6))
    first = sampled_loss_module(seed)
    before = step_losses(first, range(3))
    saved = first.state_dict()
    assert int(saved["calls"]) == 3
    resumed = sampled_loss_module(seed)
    resumed.load_state_dict(saved)
    after = step_losses(resumed, range(3))
    assert before + after == uninterrupted
    assert len(set(uninterrupted)) == 6, "each step draws other negatives"
    restarted = step_losses(sampled_loss_module(seed), range(3))
    assert restarted == uninterrupted[:3] and restarted != after


def test_a_loss_state_without_the_call_counter_loads_as_no_draws() -> None:
    loss_fn = sampled_loss_module(0)
    loss_fn.load_state_dict({})
    assert int(loss_fn.state_dict()["calls"]) == 0
