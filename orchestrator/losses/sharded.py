"""Model-parallel margin softmax against a frozen, class-sharded classifier.

Rank r of N holds rows [class_start, class_start + C_r) of the teacher classifier W
(L2-normalised, frozen). For the global batch of normalised embeddings e_i (gathered from
all ranks) with labels y_i, the loss is the mean over the global batch of

    L_i = log sum_j exp(z_ij) - z_{i y_i},   z_ij = s*cos_ij (j != y_i),  z_iy = f(cos_iy)

with f the margin of :mod:`orchestrator.losses.margins` (the same code as the dense loss).

Because W is frozen, the gradient with respect to e_i is known as soon as the softmax
statistics are, with no weight gradient and no third matrix product (README "Millions of identities", orchestrator/losses):

    dL/de_i = 1/B * ( s * sum_j p_ij w_j + (f'(cos_iy) - s) * p_iy * w_y - f'(cos_iy) * w_y )

Each rank makes one pass over its rows in chunks of ``chunk_size``, keeping a running max
m_i, a running sum S_i = sum_j exp(z_ij - m_i) and G_i = sum_j exp(z_ij - m_i) w_j, all three
rescaled when the max grows (flash attention's bookkeeping). Memory is W_r plus
O(B_global x chunk_size + B_global x d), never B_global x C_r. Across ranks: one
all-reduce of the max, one of the sums (and target logits), one reduce-scatter of the
gradient back to the ranks that own the embeddings.

The gradient handed to autograd is scaled for DDP, which averages student gradients over
ranks: each rank returns N x its part, so the average is exactly the gradient of the global
mean loss (:class:`GradientSync`).
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from orchestrator.losses.heads import check_labels, unit_rows
from orchestrator.losses.margins import Margin, target_logit
from orchestrator.losses.objectives import LossOutput
from orchestrator.shards import Shard

__all__ = ["GradientSync", "Shard", "ShardedProxylessLoss", "shard_stats", "sharded_margin_loss"]

DEFAULT_CHUNK = 65536


class GradientSync(enum.StrEnum):
    """How the student's gradients are combined across ranks after this loss."""

    DDP_MEAN = "ddp_mean"  # DDP averages: return N x the local part (the training setting)
    SUM = "sum"  # gradients are summed by the caller (or world size 1): return the local part


@dataclass(frozen=True)
class ShardStats:
    """One shard's softmax statistics for a (global) batch of B rows."""

    row_max: torch.Tensor  # (B,) max logit over this shard's classes (-inf when none)
    sum_exp: torch.Tensor  # (B,) sum_j exp(z_ij - row_max)
    weighted: torch.Tensor | None  # (B, d) sum_j exp(z_ij - row_max) w_j; None without grad
    target: torch.Tensor  # (B,) z_iy where this shard owns y_i, else 0
    target_slope: torch.Tensor  # (B,) f'(cos_iy) where owned, else 0
    target_row: torch.Tensor  # (B, d) w_y where owned, else 0
    owned: torch.Tensor  # (B,) bool


@torch.no_grad()
def shard_stats(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    shard: Shard,
    margin: Margin,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    with_grad: bool = True,
    matmul_dtype: torch.dtype | None = None,
) -> ShardStats:
    """Statistics of one shard. embeddings: (B, d) normalised, labels: (B,) global class
    ids, weight: (C_r, d) normalised rows of this shard. Pure: no collectives.

    ``matmul_dtype`` (e.g. bfloat16) is used for the two matrix products per chunk; the
    exponentials and all statistics stay in float32 (or float64 for float64 inputs).
    """
    acc = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    batch, dim = embeddings.shape
    e = embeddings.to(acc)
    mm = matmul_dtype or acc
    e_mm = e.to(mm)
    owned = (labels >= shard.class_start) & (labels < shard.class_start + shard.local_classes)
    local = torch.where(owned, labels - shard.class_start, torch.zeros_like(labels))
    # Target logits, their slopes and rows, exactly (not in the chunk dtype).
    device = embeddings.device
    target_row = torch.zeros(batch, dim, dtype=acc, device=device)
    if shard.local_classes:  # a rank may own no classes at all (C < N)
        target_row = torch.where(owned.unsqueeze(1), weight[local].to(acc), target_row)
    cos_t = (e * target_row).sum(dim=1)  # (B,)
    with torch.enable_grad():
        c = cos_t.detach().requires_grad_(True)
        z_t = target_logit(c, margin)
        (slope,) = torch.autograd.grad(z_t.sum(), c)
    zero = torch.zeros((), dtype=acc, device=device)
    target = torch.where(owned, z_t.detach().to(acc), zero)
    slope = torch.where(owned, slope.to(acc), zero)

    row_max = torch.full((batch,), float("-inf"), dtype=acc, device=device)
    sum_exp = torch.zeros(batch, dtype=acc, device=device)
    weighted = torch.zeros(batch, dim, dtype=acc, device=device) if with_grad else None
    rows = torch.arange(batch, device=device)
    for start in range(0, shard.local_classes, chunk_size):
        stop = min(start + chunk_size, shard.local_classes)
        w = weight[start:stop].to(mm)  # (chunk, d)
        z = (e_mm @ w.T).to(acc).mul_(margin.scale)  # (B, chunk)
        here = owned & (local >= start) & (local < stop)
        z[rows[here], local[here] - start] = target[here]
        new_max = torch.maximum(row_max, z.max(dim=1).values)
        rescale = torch.exp(row_max - new_max)  # 0 on the first chunk (exp(-inf))
        p = torch.exp(z.sub_(new_max.unsqueeze(1)))  # (B, chunk), in place: one buffer
        sum_exp = sum_exp * rescale + p.sum(dim=1)
        if weighted is not None:
            weighted = weighted * rescale.unsqueeze(1) + (p.to(mm) @ w).to(acc)
        row_max = new_max
    return ShardStats(row_max, sum_exp, weighted, target, slope, target_row, owned)


@dataclass(frozen=True)
class Sampled:
    """A subset of a shard's rows: the positives of the batch plus sampled negatives."""

    index: torch.Tensor  # (K,) sorted local row indices
    weight: torch.Tensor  # (K, d) those rows
    labels: torch.Tensor  # (B,) position of each owned label in ``index``; -1 elsewhere
    shard: Shard  # a shard of K rows starting at 0, for shard_stats


def sample_classes(
    labels: torch.Tensor,
    weight: torch.Tensor,
    *,
    shard: Shard,
    rate: float,
    generator: torch.Generator,
) -> Sampled:
    """Partial FC-style sampling (An et al., "Partial FC", CVPR 2021 / arXiv:2010.05222):
    every class of the global batch that this shard owns is kept, and negatives are drawn
    uniformly until ``rate`` of the shard's rows are in. The softmax over the sample is an
    approximation of the full one (exact at rate 1)."""
    owned = (labels >= shard.class_start) & (labels < shard.class_start + shard.local_classes)
    positives = torch.unique(labels[owned] - shard.class_start)
    count = min(shard.local_classes, max(round(rate * shard.local_classes), positives.numel()))
    # The generator must live where the weights do (torch.Generator(device=weight.device)).
    scores = torch.rand(shard.local_classes, generator=generator, device=weight.device)
    scores[positives] = 2.0  # above any random score: always kept
    index = torch.topk(scores, count).indices.sort().values
    position = torch.searchsorted(
        index, (labels - shard.class_start).clamp(0, max(shard.local_classes - 1, 0))
    )
    remapped = torch.where(owned, position, torch.full_like(labels, -1))
    return Sampled(index, weight[index], remapped, Shard(count, 0, count))


def embedding_gradient(
    stats: ShardStats, *, global_max: torch.Tensor, global_sum: torch.Tensor, scale: float
) -> torch.Tensor:
    """This shard's part of sum_i dL_i/de_i (unnormalised by B): (B, d).

    Summing it over shards gives s * sum_j p_ij w_j + (f' - s) p_iy w_y - f' w_y per row.
    """
    assert stats.weighted is not None
    factor = torch.where(
        torch.isfinite(stats.row_max),
        torch.exp(stats.row_max - global_max),
        torch.zeros_like(global_max),
    )
    grad = (scale * factor / global_sum).unsqueeze(1) * stats.weighted
    p_target = torch.exp(stats.target - global_max) / global_sum
    coefficient = torch.where(
        stats.owned,
        (stats.target_slope - scale) * p_target - stats.target_slope,
        torch.zeros_like(p_target),
    )
    return grad + coefficient.unsqueeze(1) * stats.target_row


def losses_from(
    global_max: torch.Tensor, global_sum: torch.Tensor, global_target: torch.Tensor
) -> torch.Tensor:
    """Per-row cross-entropy: log sum_j exp(z_ij) - z_iy."""
    return global_max + torch.log(global_sum) - global_target


class _ShardedMarginSoftmax(torch.autograd.Function):
    """Forward: gather embeddings (B_local, d) -> (B_global, d), shard statistics, combine
    with all-reduce(max), all-reduce(sum), then reduce-scatter the embedding gradient
    (B_global, d) -> (B_local, d), kept for backward. Backward: scale it by the incoming
    gradient. Returns the mean loss over the global batch (a scalar, equal on all ranks)."""

    @staticmethod
    def forward(
        ctx: Any,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        weight: torch.Tensor,
        shard: Shard,
        margin: Margin,
        chunk_size: int,
        matmul_dtype: torch.dtype | None,
        sync: GradientSync,
        group: dist.ProcessGroup | None,
        sampling: tuple[float, torch.Generator] | None,
    ) -> torch.Tensor:
        world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        global_e = _all_gather(embeddings.detach(), world_size, group)  # (B_global, d)
        global_y = _all_gather(labels, world_size, group)  # (B_global,)
        # Every rank checks the same gathered labels, so every rank raises the same error
        # and none is left waiting in a collective.
        check_labels(global_y, shard.num_classes, "global batch")
        with_grad = bool(ctx.needs_input_grad[0])
        if sampling is not None:
            rate, generator = sampling
            sampled = sample_classes(global_y, weight, shard=shard, rate=rate, generator=generator)
            weight, global_y, shard = sampled.weight, sampled.labels, sampled.shard
        stats = shard_stats(
            global_e,
            global_y,
            weight,
            shard,
            margin,
            chunk_size=chunk_size,
            with_grad=with_grad,
            matmul_dtype=matmul_dtype,
        )
        global_max = stats.row_max.clone()
        _all_reduce(global_max, dist.ReduceOp.MAX, world_size, group)
        global_sum = stats.sum_exp * torch.exp(stats.row_max - global_max)  # exp(-inf) = 0
        summed = torch.stack([global_sum, stats.target])  # one all-reduce for both
        _all_reduce(summed, dist.ReduceOp.SUM, world_size, group)
        global_sum, global_target = summed[0], summed[1]
        loss = losses_from(global_max, global_sum, global_target).mean()
        if with_grad:
            part = embedding_gradient(
                stats, global_max=global_max, global_sum=global_sum, scale=margin.scale
            )  # (B_global, d)
            local = _reduce_scatter(part, world_size, group)  # (B_local, d)
            factor = (world_size if sync is GradientSync.DDP_MEAN else 1) / global_e.shape[0]
            ctx.save_for_backward((local * factor).to(embeddings.dtype))
        return loss.to(embeddings.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_output, None, None, None, None, None, None, None, None, None)


def _all_gather(t: torch.Tensor, world_size: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    if world_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _all_reduce(t: torch.Tensor, op: Any, world_size: int, group: dist.ProcessGroup | None) -> None:
    if world_size > 1:
        dist.all_reduce(t, op=op, group=group)


def _reduce_scatter(
    t: torch.Tensor, world_size: int, group: dist.ProcessGroup | None
) -> torch.Tensor:
    if world_size == 1:
        return t
    chunks = list(t.chunk(world_size))
    if dist.get_backend(group) == "gloo":  # gloo has no reduce_scatter: sum, keep own rows
        dist.all_reduce(t, group=group)
        return t.chunk(world_size)[dist.get_rank(group)].clone()
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, [c.contiguous() for c in chunks], group=group)
    return out


def sharded_margin_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    weight: torch.Tensor,
    shard: Shard,
    margin: Margin,
    chunk_size: int = DEFAULT_CHUNK,
    matmul_dtype: torch.dtype | None = None,
    sync: GradientSync = GradientSync.DDP_MEAN,
    group: dist.ProcessGroup | None = None,
    sampling: tuple[float, torch.Generator] | None = None,
) -> torch.Tensor:
    """Mean margin softmax cross-entropy of the global batch against the sharded W.

    ``sampling=(rate, generator)`` switches on negative sampling (:func:`sample_classes`):
    an approximation, exact for the sampled classes.

    embeddings: this rank's raw (B_local, d) embeddings, equal B_local on every rank.
    labels: this rank's (B_local,) global class ids. weight: this rank's (C_r, d) rows,
    normalised. Call it on every rank of ``group`` (it runs collectives).
    """
    normalised = F.normalize(embeddings, dim=1)
    return _ShardedMarginSoftmax.apply(
        normalised, labels, weight, shard, margin, chunk_size, matmul_dtype, sync, group, sampling
    )


class ShardedProxylessLoss(nn.Module):
    """ProxylessKD with the inherited classifier sharded by identity across ranks.

    Holds only this rank's rows (a non-persistent buffer: not a parameter, never in DDP, the
    optimizer or a checkpoint). Same formula and margin code as :class:`ProxylessLoss`.
    ``normalized``: the rows are unit-length float32 already (what the classifier reader
    hands out) and are used as they are; otherwise a normalised copy is made.
    """

    weight: torch.Tensor
    calls: torch.Tensor

    def __init__(
        self,
        local_weight: torch.Tensor,
        shard: Shard,
        margin: Margin,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        matmul_dtype: torch.dtype | None = None,
        group: dist.ProcessGroup | None = None,
        sample_rate: float = 1.0,
        seed: int = 0,
        normalized: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], found {sample_rate}")
        if local_weight.shape[0] != shard.local_classes:
            raise ValueError(
                f"shard holds {local_weight.shape[0]} rows, expected {shard.local_classes} for {shard}"
            )
        self.register_buffer("weight", unit_rows(local_weight, normalized), persistent=False)
        self.shard, self.margin, self.chunk_size = shard, margin, chunk_size
        self.matmul_dtype, self.group = matmul_dtype, group
        self.sample_rate = sample_rate
        self.seed, self.class_start = seed, shard.class_start
        # The number of sampling draws so far: a buffer, so the training state saves it and
        # a resumed run draws the negatives an uninterrupted one would have drawn.
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_load_state_dict_pre_hook(_calls_default)

    def sampling_generator(self) -> torch.Generator:
        """The generator of this call's negatives, on the weights' device (CUDA draws need a
        CUDA generator), seeded from (seed, shard, call number): reproducible per rank and
        step, and independent of what else used a random stream."""
        generator = torch.Generator(device=self.weight.device)
        generator.manual_seed(
            sampling_seed(self.seed, class_start=self.class_start, call=int(self.calls))
        )
        self.calls.add_(1)
        return generator

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> LossOutput:
        sampling = None
        if self.sample_rate < 1.0:
            sampling = (self.sample_rate, self.sampling_generator())
        loss = sharded_margin_loss(
            embeddings,
            labels,
            weight=self.weight,
            shard=self.shard,
            margin=self.margin,
            chunk_size=self.chunk_size,
            matmul_dtype=self.matmul_dtype,
            sync=GradientSync.DDP_MEAN,
            group=self.group,
            sampling=sampling,
        )
        return LossOutput(loss, {"ce": float(loss.detach())})


def sampling_seed(seed: int, *, class_start: int, call: int) -> int:
    """The 63-bit seed of one sampling draw: a BLAKE2b digest of (seed, the shard's first
    class, the call number). Unlike a product of the three, it cannot overflow
    ``manual_seed`` for any 64-bit seed, and distinct keys give unrelated streams."""
    key = b"%d/%d/%d" % (seed, class_start, call)
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def _calls_default(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """A training state saved before ``calls`` was kept resumes as if no draw was made."""
    state_dict.setdefault(prefix + "calls", torch.zeros((), dtype=torch.int64))
