"""Sharded frozen-classifier loss vs the alternatives, side by side in one run.

    python bench/sharded_loss.py                 # the full grid (C=100k, 1M at d=512; 10M at d=128)
    python bench/sharded_loss.py --quick         # C=20k only, for a smoke run
    python bench/sharded_loss.py --sizes 1000000x512 --worlds 2

For each (C, d, world size N), N gloo processes on this machine each run, one after the
other, forward+backward of the loss for a global batch of 512 (embeddings as leaf tensors):

  ours       the sharded, class-chunked frozen classifier (orchestrator.losses.sharded)
  dense      every rank holds all of W and computes its local batch against all C (frozen)
  pfc@1.0    a trainable model-parallel classifier with SGD momentum (Partial FC's training
             setting): logits materialised, weight gradient and momentum update
  pfc@0.1    the same with 10% of each shard's classes sampled (all positives kept)
  bound      the two matrix products the frozen loss cannot avoid (E @ W_r^T, P @ W_r)

Per rank it reports the median step time and the peak resident memory of that method
(the kernel's high-water mark, reset before each method; includes W_r and the method's
state). Configurations whose estimated memory exceeds --memory-gb are skipped and marked.
A last section runs a few real training steps (a linear student, SGD) at the 10M point.
Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import benchlib  # first: it puts this checkout on sys.path
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnn
import torch.multiprocessing as mp
import torch.nn.functional as F

from orchestrator.losses import Margin
from orchestrator.losses.heads import FrozenClassifier
from orchestrator.losses.margins import margin_logits
from orchestrator.losses.objectives import margin_cross_entropy
from orchestrator.losses.sharded import Shard, sharded_margin_loss

GLOBAL_BATCH = 512
MARGIN = Margin.arcface(64.0, 0.5)
METHODS = ("ours", "ours@0.1", "dense", "pfc@1.0", "pfc@0.1", "bound")


def estimate_gb(method: str, c: int, d: int, world: int) -> float:
    """Rough per-machine memory (all ranks) of a method, to skip what cannot fit."""
    c_r = Shard.for_rank(c, world, 0).local_classes  # rank 0 holds the largest shard
    w_r = c_r * d * 4
    b = GLOBAL_BATCH
    per_rank = {
        "ours": w_r + b * 65536 * 4 * 3,
        "ours@0.1": w_r + b * 65536 * 4 * 3,
        "dense": c * d * 4 + (b // world) * c * 4 * 4,
        "pfc@1.0": 3 * w_r + b * c_r * 4 * 4,
        "pfc@0.1": 3 * w_r + b * (c_r // 10) * 4 * 4 + (c_r // 10) * d * 4 * 3,
        "bound": w_r + b * 65536 * 4 * 2,
    }[method]
    return world * per_rank / 2**30


def time_steps(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unit_rows(rows: int, d: int) -> torch.Tensor:
    """Random unit-length rows, normalised in place (no second copy of W_r)."""
    w = torch.randn(rows, d)
    return w.div_(w.norm(dim=1, keepdim=True))


def run_ours(
    c: int,
    d: int,
    world: int,
    rank: int,
    e: torch.Tensor,
    y: torch.Tensor,
    chunk: int,
    bf16: bool,
    rate: float = 1.0,
) -> Callable[[], None]:
    shard = Shard.for_rank(c, world, rank)
    w = unit_rows(shard.local_classes, d)
    generator = torch.Generator().manual_seed(rank)

    def step() -> None:
        x = e.clone().requires_grad_(True)
        sampling = (rate, generator) if rate < 1.0 else None
        loss = sharded_margin_loss(
            x,
            y,
            weight=w,
            shard=shard,
            margin=MARGIN,
            chunk_size=chunk,
            matmul_dtype=torch.bfloat16 if bf16 else None,
            sampling=sampling,
        )
        loss.backward()

    return step


def run_dense(
    c: int, d: int, world: int, rank: int, e: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    head = FrozenClassifier(torch.randn(c, d))

    def step() -> None:
        x = e.clone().requires_grad_(True)
        margin_cross_entropy(head.cosine(x), y, MARGIN).backward()

    return step


def run_pfc(
    c: int, d: int, world: int, rank: int, e: torch.Tensor, y: torch.Tensor, rate: float
) -> Callable[[], None]:
    """Trainable model-parallel margin softmax with sampling, as in Partial FC training."""
    shard = Shard.for_rank(c, world, rank)
    weight = torch.nn.Parameter(torch.randn(shard.local_classes, d) * 0.01)
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(rank)

    def step() -> None:
        x = e.clone().requires_grad_(True)
        global_x = torch.cat(dnn.all_gather(x))  # (B_global, d), differentiable
        global_y = torch.cat(dnn.all_gather(y))
        owned = (global_y >= shard.class_start) & (
            global_y < shard.class_start + shard.local_classes
        )
        if rate < 1.0:
            positives = torch.unique(global_y[owned] - shard.class_start)
            count = max(int(rate * shard.local_classes), positives.numel())
            scores = torch.rand(shard.local_classes, generator=generator)
            scores[positives] = 2.0  # keep every positive
            index = torch.topk(scores, count).indices.sort().values
            remap = torch.full((shard.local_classes,), -1, dtype=torch.long)
            remap[index] = torch.arange(index.numel())
            sub = weight[index]
            local_y = torch.where(
                owned, remap[(global_y - shard.class_start).clamp(0, shard.local_classes - 1)], -1
            )
        else:
            sub = weight
            local_y = torch.where(owned, global_y - shard.class_start, -1)
        cos = F.normalize(global_x, dim=1) @ F.normalize(sub, dim=1).T  # (B_global, C_sampled)
        logits = margin_logits(cos, local_y, MARGIN)
        row_max = logits.detach().max(dim=1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        exp = torch.exp(logits - row_max.unsqueeze(1))
        total = dnn.all_reduce(exp.sum(dim=1))
        target = torch.where(
            owned, logits.gather(1, local_y.clamp_min(0).unsqueeze(1)).squeeze(1), torch.zeros(())
        )
        target = dnn.all_reduce(target)
        loss = (row_max + torch.log(total) - target).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def run_bound(
    c: int, d: int, world: int, rank: int, e: torch.Tensor, chunk: int, bf16: bool
) -> Callable[[], None]:
    shard = Shard.for_rank(c, world, rank)
    dtype = torch.bfloat16 if bf16 else torch.float32
    w = torch.randn(shard.local_classes, d).to(dtype)
    global_e = torch.randn(GLOBAL_BATCH, d).to(dtype)

    def step() -> None:
        g = torch.zeros(GLOBAL_BATCH, d, dtype=dtype)
        for start in range(0, shard.local_classes, chunk):
            wc = w[start : start + chunk]
            g += (global_e @ wc.T) @ wc

    return step


def worker(rank: int, world: int, rendezvous: str, plan: dict[str, Any], out: str) -> None:
    """One method (or the training run) in a fresh process per rank, so its peak RSS is its own."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.nn deprecation
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    c, d, method = plan["c"], plan["d"], plan["method"]
    torch.manual_seed(rank)
    e = torch.randn(GLOBAL_BATCH // world, d)
    y = torch.randint(0, c, (GLOBAL_BATCH // world,))
    base = benchlib.rss_now_mb()  # the process before this method's state (W_r, optimizer, ...)
    result: dict[str, Any]
    if method == "train(ours)":
        result = train_steps(c, d, world, rank, plan)
    else:
        if method.startswith("ours"):
            rate = float(method[5:]) if "@" in method else 1.0
            step = run_ours(c, d, world, rank, e, y, plan["chunk"], plan["bf16"], rate)
        elif method == "dense":
            step = run_dense(c, d, world, rank, e, y)
        elif method.startswith("pfc@"):
            step = run_pfc(c, d, world, rank, e, y, float(method[4:]))
        else:
            step = run_bound(c, d, world, rank, e, plan["chunk"], plan["bf16"])
        dist.barrier()
        # Peak from here on: the method's resident state plus its working memory during the
        # steps, not set-up transients (e.g. generating random W_r).
        benchlib.rss_reset()
        result = {"seconds": time_steps(step, plan["repeats"])}
    result["peak_mb"] = benchlib.rss_peak_mb() - base
    torch.save(result, f"{out}.{rank}")
    dist.barrier()  # no rank tears gloo down while a peer is still exchanging
    dist.destroy_process_group()
    # The results are on disk. Skip interpreter teardown: gloo's threads occasionally meet
    # C++ static destructors there ("terminate called without an active exception",
    # SIGABRT after all work is done), which would fail an otherwise finished run.
    os._exit(0)


def train_steps(c: int, d: int, world: int, rank: int, plan: dict[str, Any]) -> dict[str, Any]:
    """A few real training steps: a linear student under DDP, ours as the loss."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    shard = Shard.for_rank(c, world, rank)
    w = unit_rows(shard.local_classes, d)
    benchlib.rss_reset()
    torch.manual_seed(0)
    student = torch.nn.Linear(256, d)
    model = DDP(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    losses, times = [], []
    for i in range(plan["train_steps"]):
        g = torch.Generator().manual_seed(1000 * i + rank)
        x = torch.randn(GLOBAL_BATCH // world, 256, generator=g)
        y = torch.randint(0, c, (GLOBAL_BATCH // world,), generator=g)
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = sharded_margin_loss(
            model(x), y, weight=w, shard=shard, margin=MARGIN, chunk_size=plan["chunk"]
        )
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return {"losses": losses, "seconds": statistics.median(times)}


def spawn(
    method: str, c: int, d: int, world: int, args: argparse.Namespace, train: int = 0
) -> list[dict[str, Any]]:
    plan = {
        "c": c,
        "d": d,
        "method": method,
        "chunk": args.chunk,
        "bf16": args.bf16,
        "repeats": args.repeats,
        "train_steps": train,
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(
            worker,
            args=(world, os.path.join(tmp, "rendezvous"), plan, out),
            nprocs=world,
            join=True,
        )
        return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


def run_config(
    c: int, d: int, world: int, args: argparse.Namespace, train: int = 0
) -> list[dict[str, Any]]:
    rows = []
    for method in METHODS:
        row: dict[str, Any] = {"C": c, "d": d, "world": world, "method": method}
        if estimate_gb(method, c, d, world) > args.memory_gb:
            row["skipped"] = (
                f"estimated {estimate_gb(method, c, d, world):.0f} GB > {args.memory_gb} GB"
            )
        else:
            per_rank = spawn(method, c, d, world, args)
            row["seconds"] = max(r["seconds"] for r in per_rank)  # the slowest rank sets the pace
            row["peak_mb_per_rank"] = max(r["peak_mb"] for r in per_rank)
            row["w_r_mb"] = Shard.for_rank(c, world, 0).local_classes * d * 4 / 2**20
        rows.append(row)
    if train:
        per_rank = spawn("train(ours)", c, d, world, args, train)
        rows.append(
            {
                "C": c,
                "d": d,
                "world": world,
                "method": "train(ours)",
                "losses": per_rank[0]["losses"],
                "seconds": max(r["seconds"] for r in per_rank),
                "peak_mb_per_rank": max(r["peak_mb"] for r in per_rank),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=" ".join((__doc__ or "").strip().split("\n\n")[0].split())
    )
    parser.add_argument("--sizes", default="100000x512,1000000x512,10000000x128")
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--chunk", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--bf16", action="store_true", help="bf16 chunk GEMMs for ours and the bound"
    )
    parser.add_argument("--memory-gb", type=float, default=18.0)
    parser.add_argument(
        "--train-steps", type=int, default=3, help="real training steps at the largest C (0: none)"
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.worlds, args.train_steps = "20000x128", "2", 2
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    worlds = [int(w) for w in args.worlds.split(",")]
    largest = max(sizes)
    rows: list[dict[str, Any]] = []
    for c, d in sizes:
        for world in worlds:
            train = args.train_steps if (c, d) == largest and world == min(worlds) else 0
            print(f"running C={c} d={d} N={world} ...", file=sys.stderr, flush=True)
            rows += run_config(c, d, world, args, train)
    print_table(rows)
    print(
        json.dumps(
            {
                "bench": "sharded_loss",
                "global_batch": GLOBAL_BATCH,
                "chunk": args.chunk,
                "bf16": args.bf16,
                "rows": rows,
                "summary": summary(rows),
            }
        )
    )
    return 0


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, per (C, d, N): ours / bound, ours vs pfc@1.0, memory over W_r."""
    out = {}
    for r in rows:
        if r["method"] != "ours" or "seconds" not in r:
            continue
        key = f"C={r['C']},d={r['d']},N={r['world']}"
        same = {
            x["method"]: x
            for x in rows
            if (x["C"], x["d"], x["world"]) == (r["C"], r["d"], r["world"])
        }
        entry = {
            "ours_over_bound": round(r["seconds"] / same["bound"]["seconds"], 3)
            if "seconds" in same["bound"]
            else None,
            "loss_memory_over_w_r_mb": round(r["peak_mb_per_rank"] - r["w_r_mb"], 1),
        }
        for rate in ("1.0", "0.1"):
            ours = same["ours" if rate == "1.0" else "ours@0.1"]
            pfc = same[f"pfc@{rate}"]
            both = "seconds" in pfc and "seconds" in ours
            entry[f"pfc_over_ours@{rate}"] = (
                round(pfc["seconds"] / ours["seconds"], 3) if both else None
            )
        out[key] = entry
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| C | d | N | method | step s | peak MB/rank | W_r MB | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["method"] == "train(ours)":
            print(
                f"| {r['C']} | {r['d']} | {r['world']} | train(ours) | {r['seconds']:.2f} | {r['peak_mb_per_rank']:.0f} | | {len(r['losses'])} steps, losses {', '.join(f'{v:.2f}' for v in r['losses'])} |"
            )
        elif "seconds" in r:
            print(
                f"| {r['C']} | {r['d']} | {r['world']} | {r['method']} | {r['seconds']:.3f} | {r['peak_mb_per_rank']:.0f} | {r['w_r_mb']:.0f} | |"
            )
        else:
            print(
                f"| {r['C']} | {r['d']} | {r['world']} | {r['method']} | | | | skipped: {r['skipped']} |"
            )


if __name__ == "__main__":
    sys.exit(main())
