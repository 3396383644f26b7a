"""Does the GPU path work, and how fast? One self-contained check for a machine with a GPU.

    python bench/gpu_check.py                       # CUDA: about 3-6 minutes on one H100/H200
    python bench/gpu_check.py --device cpu --quick  # small shapes on CPU (make test runs it)
    python bench/gpu_check.py --device cpu          # the same table on CPU, still small shapes

Pure PyTorch plus this package's math modules (losses, models, the training step): no Ray,
no simplejpeg, no object store, no YAML library, so it runs on a bare GPU box that has
only torch. It prints three tables and, last, one JSON line (keys documented in README):

1. parity: the dense and the sharded frozen losses (world size 1, W in several chunks) on
   the device in fp32 and bf16, against a float64 CPU reference: max relative error of the
   loss and of the embedding gradient;
2. a full student training step (MobileFaceNet, 112x112, 512-d, global batch 512, bf16
   autocast, channels_last) with the frozen 1M x 512 classifier, side by side with the
   same step against a trainable 1M x 512 margin classifier + SGD momentum (Partial FC at
   sample rate 1.0), the backbone alone (no classifier: the bound for the loss's
   overhead) and the frozen loss with sampling at rate 0.1: images/s and peak memory;
3. the frozen loss alone at 1M x 512 and 10M x 128 in bf16: time against its two-GEMM
   bound (the same two matrix products per chunk, timed bare) and working memory beyond W.

Targets (a benchmark, not a test): frozen step >= 0.85x the backbone-only rate and >= 1.5x
the trainable-classifier rate; frozen loss <= 1.3x its GEMM bound in bf16; loss working
memory <= 1 GiB beyond W at 10M identities.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.config import Arch
from orchestrator.losses.heads import FrozenClassifier
from orchestrator.losses.margins import Margin
from orchestrator.losses.objectives import ProxylessLoss, ScratchLoss, classifier_loss
from orchestrator.losses.sharded import (
    GradientSync,
    Shard,
    ShardedProxylessLoss,
    sharded_margin_loss,
)
from orchestrator.models import build_backbone
from orchestrator.train.step import train_step

MARGIN = Margin.arcface(64.0, 0.5)
TOLERANCE = {"fp32": (1e-5, 1e-4), "bf16": (1e-2, 2e-2)}  # (loss, gradient): as the CPU tests


@dataclass(frozen=True)
class Shapes:
    parity: tuple[int, int, int]  # (C, d, B)
    parity_chunk: int
    step_arch: Arch
    step_batch: int
    step_classes: int
    step_steps: int
    loss_alone: tuple[tuple[int, int], ...]  # (C, d)
    loss_batch: int
    chunk: int

    @classmethod
    def full(cls) -> Shapes:
        return cls(
            (100_000, 512, 256), 16_384, Arch.MOBILEFACENET, 512, 1_000_000, 10,
            ((1_000_000, 512), (10_000_000, 128)), 512, 65_536,
        )  # fmt: skip

    @classmethod
    def small(cls, quick: bool) -> Shapes:
        return cls(
            (3000, 64, 32), 700, Arch.TINY_MOBILEFACENET, 8 if quick else 32,
            2000 if quick else 20_000, 1 if quick else 3,
            ((5000, 64), (20_000, 16)) if quick else ((100_000, 64), (400_000, 16)),
            64, 2048,
        )  # fmt: skip


class Clock:
    """Wall time with the device synchronised, and peak device memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self) -> float | None:
        if self.device.type != "cuda":
            return None  # no allocator statistics on CPU
        return torch.cuda.max_memory_allocated(self.device) / 2**20

    def seconds(self, fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        self.sync()
        return (time.perf_counter() - started) / repeats


def unit_rows(c: int, d: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(c, d, generator=g, device=device)
    return w.div_(w.norm(dim=1, keepdim=True))


# --- 1. parity -----------------------------------------------------------------------------


def reference(e: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The dense loss in float64 on CPU and its gradient w.r.t. the raw embeddings."""
    e64 = e.detach().cpu().double().requires_grad_(True)
    loss = classifier_loss(FrozenClassifier(w.cpu().double()), MARGIN, e64, y.cpu()).loss
    loss.backward()
    assert e64.grad is not None
    return float(loss.detach()), e64.grad


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().cpu().double() - want).norm() / want.norm())


def parity(shapes: Shapes, device: torch.device) -> dict[str, dict[str, float]]:
    c, d, b = shapes.parity
    w = unit_rows(c, d, device)
    g = torch.Generator(device=device).manual_seed(1)
    e = torch.randn(b, d, generator=g, device=device)
    y = torch.randint(0, c, (b,), generator=g, device=device)
    ref_loss, ref_grad = reference(e, y, w)
    out: dict[str, dict[str, float]] = {}
    shard = Shard.for_rank(c, 1, 0)
    for precision in ("fp32", "bf16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        dense_fn = ProxylessLoss(w, MARGIN, normalized=True)
        x = e.to(dtype).detach().requires_grad_(True)
        loss = dense_fn(x, y).loss
        loss.backward()
        out[f"dense_{precision}"] = result(loss, x.grad, ref_loss, ref_grad)
        x = e.clone().requires_grad_(True)
        loss = sharded_margin_loss(
            x, y, weight=w, shard=shard, margin=MARGIN, chunk_size=shapes.parity_chunk,
            matmul_dtype=dtype if precision == "bf16" else None, sync=GradientSync.SUM,
        )  # fmt: skip
        loss.backward()
        out[f"sharded_{precision}"] = result(loss, x.grad, ref_loss, ref_grad)
    return out


def result(
    loss: torch.Tensor, grad: torch.Tensor | None, ref_loss: float, ref_grad: torch.Tensor
) -> dict[str, float]:
    assert grad is not None
    return {
        "loss_rel_err": abs(float(loss.detach()) - ref_loss) / abs(ref_loss),
        "grad_rel_err": relative(grad, ref_grad),
    }


# --- 2. the full training step -----------------------------------------------------------


class Autocast(torch.nn.Module):
    """The trainable classifier's GEMMs in bf16 on CUDA, as the frozen loss's are (Partial FC
    also runs its logits under autocast): the comparison is between the methods, not dtypes."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: Any = None) -> Any:
        enabled = embeddings.device.type == "cuda"
        with torch.autocast(embeddings.device.type, dtype=torch.bfloat16, enabled=enabled):
            return self.inner(embeddings, labels)


class BackboneOnly(torch.nn.Module):
    """No classifier at all: a trivial loss on the embeddings (the step's lower bound)."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: Any = None) -> Any:
        from orchestrator.losses.objectives import LossOutput

        return LossOutput(embeddings.float().square().mean())


def step_rates(shapes: Shapes, device: torch.device, clock: Clock) -> dict[str, dict[str, Any]]:
    c, d, b = shapes.step_classes, 512, shapes.step_batch
    w = unit_rows(c, d, device, seed=2)
    shard = Shard.for_rank(c, 1, 0)
    bf16 = torch.bfloat16 if device.type == "cuda" else None

    def frozen(rate: float) -> torch.nn.Module:
        return ShardedProxylessLoss(
            w, shard, MARGIN, chunk_size=shapes.chunk, matmul_dtype=bf16, normalized=True,
            sample_rate=rate,
        )  # fmt: skip

    variants: dict[str, Callable[[], torch.nn.Module]] = {
        "frozen": lambda: frozen(1.0),
        "trainable": lambda: Autocast(ScratchLoss(c, d, MARGIN)),
        "backbone_only": BackboneOnly,
        "frozen_sampled_0.1": lambda: frozen(0.1),
    }
    images = torch.rand(b, 3, 112, 112, device=device).mul_(2).sub_(1)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, c, (b,), device=device)
    return {
        name: time_step(make().to(device), shapes, images=images, labels=labels, clock=clock)
        for name, make in variants.items()
    }


def time_step(
    loss_fn: torch.nn.Module,
    shapes: Shapes,
    *,
    images: torch.Tensor,
    labels: torch.Tensor,
    clock: Clock,
) -> dict[str, Any]:
    """images/s and peak memory of full training steps (student forward and backward, the
    loss, SGD momentum over the student and the loss's own parameters)."""
    device = images.device
    torch.manual_seed(0)
    student = build_backbone(shapes.step_arch, 512, input_size=112).to(device)
    student = student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    params = list(student.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    clock.reset_peak()

    def step() -> None:
        train_step(
            student, loss_fn, optimizer=optimizer, images=images, labels=labels,
            bf16=device.type == "cuda",
        )  # fmt: skip

    seconds = clock.seconds(step, shapes.step_steps, warmup=2)
    return {"images_per_s": len(labels) / seconds, "peak_mb": clock.peak_mb()}


# --- 3. the frozen loss alone -------------------------------------------------------------


def gemm_bound(e: torch.Tensor, w: torch.Tensor, chunk: int) -> Callable[[], None]:
    """The two matrix products per chunk that any frozen margin softmax needs: logits
    (B, chunk) = e W_c^T and the gradient accumulation (B, d) += P W_c."""
    acc = torch.zeros_like(e)

    def run() -> None:
        for start in range(0, w.shape[0], chunk):
            block = w[start : start + chunk]
            acc.add_((e @ block.T) @ block)

    return run


def loss_alone(shapes: Shapes, device: torch.device, clock: Clock) -> dict[str, dict[str, Any]]:
    return {
        f"{c}x{d}": time_loss(c, d, shapes, device=device, clock=clock)
        for c, d in shapes.loss_alone
    }


def time_loss(
    c: int, d: int, shapes: Shapes, *, device: torch.device, clock: Clock
) -> dict[str, Any]:
    """The frozen loss's forward and backward (bf16 GEMMs) against its two-GEMM bound."""
    clock.reset_peak()
    w = unit_rows(c, d, device, seed=3)
    w_mb = w.numel() * w.element_size() / 2**20
    g = torch.Generator(device=device).manual_seed(4)
    e = torch.randn(shapes.loss_batch, d, generator=g, device=device)
    y = torch.randint(0, c, (shapes.loss_batch,), generator=g, device=device)
    shard = Shard.for_rank(c, 1, 0)

    def loss_step() -> None:
        x = e.detach().requires_grad_(True)
        sharded_margin_loss(
            x, y, weight=w, shard=shard, margin=MARGIN, chunk_size=shapes.chunk,
            matmul_dtype=torch.bfloat16, sync=GradientSync.SUM,
        ).backward()  # fmt: skip

    repeats = 3 if device.type == "cuda" else 1
    seconds = clock.seconds(loss_step, repeats)
    peak = clock.peak_mb()
    bf16 = torch.bfloat16
    bound = clock.seconds(gemm_bound(e.to(bf16), w.to(bf16), shapes.chunk), repeats)
    return {
        "seconds": seconds,
        "gemm_bound_seconds": bound,
        "ratio_to_bound": seconds / bound,
        "w_mb": w_mb,
        "peak_mb": peak,
        "working_mb": None if peak is None else peak - w_mb,
    }


# --- report -------------------------------------------------------------------------------


def targets(
    step: dict[str, dict[str, Any]], alone: dict[str, dict[str, Any]], full: bool
) -> dict[str, Any]:
    rate = {k: v["images_per_s"] for k, v in step.items()}
    largest = list(alone.values())[-1]
    working = largest["working_mb"]
    return {
        "frozen_vs_backbone": rate["frozen"] / rate["backbone_only"],
        "frozen_vs_trainable": rate["frozen"] / rate["trainable"],
        "frozen_vs_backbone_met": rate["frozen"] / rate["backbone_only"] >= 0.85,
        "frozen_vs_trainable_met": rate["frozen"] / rate["trainable"] >= 1.5,
        "loss_within_1.3x_gemm_met": all(v["ratio_to_bound"] <= 1.3 for v in alone.values()),
        "working_memory_within_1gib_met": None if working is None else working <= 1024,
        "full_shapes": full,  # the targets are about the full shapes on a GPU
    }


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def print_table(title: str, rows: dict[str, dict[str, Any]]) -> None:
    keys = list(next(iter(rows.values())))
    print(f"\n{title}\n| case | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(fmt(row[k]) for k in keys) + " |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=" ".join((__doc__ or "").strip().split("\n\n")[0].split())
    )
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device here (try --device cpu)", file=sys.stderr)
        return 2
    full = device.type == "cuda" and not args.quick
    shapes = Shapes.full() if full else Shapes.small(args.quick)
    clock = Clock(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"[gpu_check] {name}, torch {torch.__version__}, {'full' if full else 'small'} shapes")
    checks = parity(shapes, device)
    print_table("1. parity against CPU float64", checks)
    step = step_rates(shapes, device, clock)
    print_table(f"2. training step, batch {shapes.step_batch}, C={shapes.step_classes}", step)
    alone = loss_alone(shapes, device, clock)
    print_table("3. frozen loss alone (bf16 GEMMs)", alone)
    goals = targets(step, alone, full)
    print_table("targets", {"result": goals})
    parity_ok = all(
        v["loss_rel_err"] <= TOLERANCE[k.rsplit("_", 1)[1]][0]
        and v["grad_rel_err"] <= TOLERANCE[k.rsplit("_", 1)[1]][1]
        for k, v in checks.items()
    )
    record = {
        "device": name,
        "torch": torch.__version__,
        "full_shapes": full,
        "parity": checks,
        "parity_ok": parity_ok,
        "step": step,
        "loss_alone": alone,
        "targets": goals,
    }
    print(json.dumps(record))
    return 0 if parity_ok else 1


if __name__ == "__main__":
    sys.exit(main())
