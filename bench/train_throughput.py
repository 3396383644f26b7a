"""Training images/s, side by side in one run: the same student, loss, global batch and
steps through four paths, for each method and classifier size.

    python bench/train_throughput.py                 # proxyless, scratch, l2, logit x C = 1k, 100k
    python bench/train_throughput.py --quick         # proxyless and l2 at C = 1k, fewer steps

Paths (rows of the table):

  a single    one process, a plain PyTorch loop over decoded tensors in memory (the model's
              bound on this machine at this thread count)
  b ddp       plain torch.distributed DDP over gloo, --workers processes, the same tensors
              (what a user would write by hand; each process has cores / workers threads)
  c ray-mem   our Ray Train worker loop (orchestrator.train.worker) with --workers workers,
              fed decoded images from an in-memory Ray Dataset (no Parquet, no JPEG)
  d ray-s3    our full path: Parquet of JPEG bytes on the embedded S3 server, the decode
              actor pool, Ray Train
  e ray-s3-w  the same with data.decode: worker: no pool, each Train worker decodes its own
              batches in data.decode_threads threads, one batch ahead of its step
  f ray-s3-u  (d) with data.ordered: false (rows to whichever worker asks first): the
              cost of the deterministic split is d/f
  g ray-s3-wu (e) with data.ordered: false: the cost there is e/g

  python bench/train_throughput.py --quick --paths d f e g   # the cost of data.ordered

CPU columns: the shares of the machine's CPU time during each Ray fit used by the Train
workers and by everything else (Ray's own processes, decode actors, the store server), read
from /proc: where (c) trails (b), this says how much of the gap is other processes' CPU.
Rates are images/s after warm-up: (a) and (b) time --steps steps after --warmup steps; (c)
and (d) report the steady rate of their last epoch (after its first step, so the epoch's
input start-up is left out; the start-up and the input-wait share are columns of their
own). The student is small_mobilefacenet (116M MACs), the teacher of the l2 / logit
baselines mobilefacenet (437M MACs, 3.8x). Prints a table and, as its last line, one JSON
object with every figure and the issue's targets judged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import benchlib  # first: it puts this checkout on sys.path
import numpy as np

STUDENT, TEACHER, EMB_DIM = "small_mobilefacenet", "mobilefacenet", 128


@dataclass(frozen=True)
class Case:
    method: str
    classes: int


@dataclass(frozen=True)
class Setup:
    batch: int
    steps: int
    warmup: int
    workers: int
    threads: int  # per process of (b), and per worker of (c) / (d)


# --- (a) and (b): plain PyTorch ---------------------------------------------------------------


def models(case: Case, weight: np.ndarray) -> tuple[Any, Any, Any]:
    """Student, loss module and teacher (None where the method has none), seeded."""
    import torch

    from orchestrator.config import Arch, LossConfig, Method
    from orchestrator.losses import build_loss
    from orchestrator.models import build_backbone

    method = Method(case.method)
    torch.manual_seed(0)
    student = build_backbone(Arch(STUDENT), EMB_DIM)
    loss = build_loss(
        LossConfig(method=method),
        num_classes=case.classes,
        emb_dim=EMB_DIM,
        teacher_classifier=torch.from_numpy(weight)
        if method.uses_teacher_classifier or method.inherits_classifier
        else None,
        normalized=True,
    )
    teacher = (
        build_backbone(Arch(TEACHER), EMB_DIM).eval() if method.needs_teacher_embeddings else None
    )
    return student, loss, teacher


class StudentAndLoss:
    """What DDP wraps in (b): the student and the loss's own parameters (a baseline's
    classifier), one module, so every gradient is averaged."""

    def __new__(cls, student: Any, loss: Any) -> Any:
        import torch

        class Combined(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.student, self.loss = student, loss

            def forward(self, images: Any, labels: Any, teacher_emb: Any) -> Any:
                return self.loss(self.student(images), labels, teacher_emb).loss

        return Combined()


def plain_rate(
    case: Case,
    setup: Setup,
    images: Any,
    labels: Any,
    weight: np.ndarray,
    *,
    rank: int = 0,
    world: int = 1,
) -> float:
    """Images/s of this process's plain loop (all processes' images when ``world`` > 1)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(setup.threads)
    student, loss, teacher = models(case, weight)
    module = StudentAndLoss(student, loss)
    if world > 1:
        module = torch.nn.parallel.DistributedDataParallel(module, broadcast_buffers=False)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    local = setup.batch // world
    x_all, y_all = images[rank::world], labels[rank::world]

    def step(i: int) -> None:
        lo = (i * local) % (len(x_all) - local + 1)
        x, y = x_all[lo : lo + local], y_all[lo : lo + local]
        with torch.no_grad():
            t = None if teacher is None else teacher(x)
        optimizer.zero_grad(set_to_none=True)
        module(x, y, t).backward()
        optimizer.step()

    for i in range(setup.warmup):
        step(i)
    if world > 1:
        dist.barrier()
    started = time.perf_counter()
    for i in range(setup.steps):
        step(setup.warmup + i)
    if world > 1:
        dist.barrier()
    return setup.steps * setup.batch / (time.perf_counter() - started)


def ddp_worker(rank: int, world: int, port: int, args: tuple[Any, ...], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}"
    )
    try:
        rate = plain_rate(*args, rank=rank, world=world)
        if rank == 0:
            Path(out).write_text(str(rate))
    finally:
        dist.destroy_process_group()


def ddp_rate(case: Case, setup: Setup, images: Any, labels: Any, weight: np.ndarray) -> float:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rate")
        mp.spawn(
            ddp_worker,
            args=(setup.workers, port, (case, setup, images, labels, weight), out),
            nprocs=setup.workers,
            join=True,
        )
        return float(Path(out).read_text())


# --- (c) and (d): our Ray Train loop ----------------------------------------------------------


@dataclass(frozen=True)
class Written:
    config: Any  # ExperimentConfig, data and classifier written for this classifier size
    images: np.ndarray  # (N, 112, 112, 3) uint8, the dataset's images decoded


def write_inputs(
    root: str, store_root: str, classes: int, setup: Setup, rng: np.random.Generator
) -> Written:
    """A dataset of batch x (steps + 1) images with labels in [0, classes) on the S3 store,
    the teacher checkpoint and a classifier of ``classes`` unit rows."""
    import torch

    from orchestrator.classifier import write_classifier
    from orchestrator.config import (
        Arch,
        ClassifierMode,
        DataConfig,
        ExperimentConfig,
        OptimConfig,
        RunConfig,
        ScalingConfig,
        ShardingConfig,
        StudentConfig,
        TeacherConfig,
    )
    from orchestrator.data import format as fmt
    from orchestrator.data.images import decode_jpeg, encode_jpeg
    from orchestrator.data.synthetic import render_image
    from orchestrator.models import build_backbone
    from orchestrator.teacher.checkpoint import TeacherCheckpoint, save_teacher

    count = setup.batch * (setup.steps + 1)
    labels = rng.integers(0, classes, size=count)
    data = f"{store_root}/data-{classes}"
    writer = fmt.DatasetWriter(data, 112, shard_bytes=2_000_000, source={"kind": "bench"})
    jpegs = []
    for i, label in enumerate(labels):
        jpeg = encode_jpeg(render_image(0, int(label) % 500, image=i, size=112))
        jpegs.append(jpeg)
        writer.add(jpeg, int(label), f"id{label:07d}", f"img{i:06d}")
    identities = [f"id{c:07d}" for c in range(classes)]
    meta = writer.publish(identities)
    weight = rng.normal(size=(classes, EMB_DIM))
    weight /= np.linalg.norm(weight, axis=1, keepdims=True)
    classifier = f"{root}/classifier-{classes}"
    write_classifier(
        classifier,
        weight,
        label_map_fingerprint=meta.label_map_fingerprint,
        source={"kind": "bench"},
    )
    teacher = f"{root}/teacher.pt"
    if not os.path.exists(teacher):
        torch.manual_seed(0)
        head = torch.zeros(1, EMB_DIM)
        save_teacher(
            teacher,
            TeacherCheckpoint(
                Arch(TEACHER),
                EMB_DIM,
                112,
                build_backbone(Arch(TEACHER), EMB_DIM).state_dict(),
                head,
                "none",
            ),
        )
    config = ExperimentConfig(
        name="bench",
        storage_path=f"{root}/runs",
        data=DataConfig(train=data, eval=""),
        student=StudentConfig(arch=Arch(STUDENT), emb_dim=EMB_DIM),
        teacher=TeacherConfig(
            arch=Arch(TEACHER), emb_dim=EMB_DIM, classifier=classifier, backbone=teacher
        ),
        optim=OptimConfig(lr=0.01, epochs=2, batch_size=setup.batch, warmup_epochs=0),
        # Ray's logical CPUs: the workers share what the decode pool (1 CPU) leaves.
        scaling=ScalingConfig(
            num_workers=setup.workers,
            cpus_per_worker=max(0.5, ((os.cpu_count() or 1) - 1) / setup.workers),
            resources_wait_s=0,
        ),
        sharding=ShardingConfig(mode=ClassifierMode.DENSE),
        run=RunConfig(
            eval_every_epochs=0,
            keep_best=False,
            log_every_s=600.0,
            shuffle_buffer=0,
            keep_checkpoints=1,
        ),
    )
    images = np.stack([decode_jpeg(j, "bench") for j in jpegs])
    return Written(config, images)


def ray_rates(
    written: Written,
    method: str,
    *,
    in_memory: bool,
    run: int,
    decode: str = "pool",
    ordered: bool = True,
) -> dict[str, float]:
    """Steady images/s of the last epoch, its input start-up and input-wait share."""
    import ray

    from orchestrator import classifier as clf
    from orchestrator.config import DecodeAt, LossConfig, Method
    from orchestrator.data import format as fmt
    from orchestrator.runs import absolute_paths, ensure_ray
    from orchestrator.train.checks import check_classifier
    from orchestrator.train.launch import student_spec
    from orchestrator.train.trainer import fit

    config = replace(
        written.config,
        loss=LossConfig(method=Method(method)),
        data=replace(written.config.data, decode=DecodeAt(decode), ordered=ordered),
    )
    config = absolute_paths(config)
    ensure_ray()
    meta = fmt.read_meta(config.data.train)
    uses_w = config.loss.method.inherits_classifier or config.loss.method.uses_teacher_classifier
    cmeta: clf.ClassifierMeta | None = check_classifier(config, meta) if uses_w else None
    where = "mem" if in_memory else "s3"
    name = f"bench-{run}-{method}-{meta.num_classes}-{where}-{decode}-{'o' if ordered else 'u'}"
    spec = student_spec(config, name, meta, cmeta)
    dataset = None
    if in_memory:
        rows = [
            {"image": image, "label": int(label), "image_id": f"img{i:06d}"}
            for i, (image, label) in enumerate(zip(written.images, labels_of(config), strict=True))
        ]
        dataset = ray.data.from_items(rows).materialize()
    started = time.monotonic()
    with benchlib.CpuSampler("RayTrainWorker") as cpu:
        outcome = fit(config, spec, name=name, dataset=dataset)
    wall = time.monotonic() - started
    m, used = outcome.metrics, cpu.split(leave_out={os.getpid()})
    cores = os.cpu_count() or 1
    return {
        "rate": float(m["steady_samples_per_s"]),
        "startup_s": float(m["input_startup_s"]),
        "input_wait": float(m["input_wait_share"]),
        # Shares of the machine's CPU time during the whole fit (start-up included).
        "workers_cpu": used["marked"] / (wall * cores),
        "other_cpu": used["other"] / (wall * cores),
    }


def labels_of(config: Any) -> np.ndarray:
    from orchestrator.data import format as fmt

    meta = fmt.read_meta(config.data.train)
    return np.concatenate(
        [
            np.asarray(t.column("label"))
            for t in fmt.iter_shards(config.data.train, meta, columns=["label"])
        ]
    )


# --- the run --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=" ".join((__doc__ or "").strip().split("\n\n")[0].split())
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--methods", nargs="+", default=["proxyless", "scratch", "l2", "logit"])
    parser.add_argument("--classes", nargs="+", type=int, default=[1000, 100_000])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--paths", nargs="+", default=["a", "b", "c", "d", "e", "f", "g"])
    args = parser.parse_args(argv)
    if args.quick:
        args.methods, args.classes, args.steps, args.warmup = ["proxyless", "l2"], [1000], 6, 2
    cores = os.cpu_count() or 1
    setup = Setup(args.batch, args.steps, args.warmup, args.workers, max(1, cores // args.workers))

    import torch

    from orchestrator.classifier import load_full, read_meta
    from orchestrator.data.images import to_model_input
    from orchestrator.objectstore import EmbeddedObjectStore

    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="throughput") as root:
        store = EmbeddedObjectStore.start(Path(root) / "store")
        try:
            store.create_bucket("bench")
            os.environ.update(store.endpoint.env())
            for classes in args.classes:
                print(
                    f"[bench] writing {setup.batch * (setup.steps + 1)} images, C = {classes} ...",
                    flush=True,
                )
                written = write_inputs(root, "s3://bench", classes, setup, rng)
                images = to_model_input(torch.from_numpy(written.images))
                labels = torch.from_numpy(labels_of(written.config))
                uri = written.config.teacher.classifier
                weight = np.asarray(load_full(uri, read_meta(uri)))
                for method in args.methods:
                    case = Case(method, classes)
                    row: dict[str, Any] = {"method": method, "classes": classes}
                    if "a" in args.paths:
                        single = replace(setup, threads=cores)
                        row["a"] = plain_rate(case, single, images, labels, weight)
                    if "b" in args.paths:
                        row["b"] = ddp_rate(case, setup, images, labels, weight)
                    for path, in_memory, decode, ordered in (
                        ("c", True, "pool", True),
                        ("d", False, "pool", True),
                        ("e", False, "worker", True),
                        ("f", False, "pool", False),
                        ("g", False, "worker", False),
                    ):
                        if path in args.paths:
                            got = ray_rates(
                                written,
                                method,
                                in_memory=in_memory,
                                run=len(results),
                                decode=decode,
                                ordered=ordered,
                            )
                            row[path] = got["rate"]
                            row[f"{path}_startup_s"] = got["startup_s"]
                            row[f"{path}_input_wait"] = got["input_wait"]
                            row[f"{path}_workers_cpu"] = got["workers_cpu"]
                            row[f"{path}_other_cpu"] = got["other_cpu"]
                    results.append(row)
                    print(
                        "[bench] "
                        + json.dumps(
                            {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
                        ),
                        flush=True,
                    )
        finally:
            store.stop()
    report(results, setup, cores)
    return 0


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def report(results: list[dict[str, Any]], setup: Setup, cores: int) -> None:
    head = (
        "| method | C | a single | b ddp | c ray-mem | d ray-s3 | e ray-s3-w | c/b | d/b | e/b "
        "| d start-up s | e start-up s | d input wait | e input wait | c CPU workers / other "
        "| d CPU workers / other | e CPU workers / other |"
    )
    print(
        f"\nimages/s, global batch {setup.batch}, {setup.workers} workers x {setup.threads} threads, {cores} cores\n"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))

    def cell(v: float | None, digits: int = 1) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    for r in results:
        print(
            f"| {r['method']} | {r['classes']} | {cell(r.get('a'))} | {cell(r.get('b'))} | {cell(r.get('c'))} | "
            f"{cell(r.get('d'))} | {cell(r.get('e'))} | {cell(ratio(r.get('c'), r.get('b')), 2)} | "
            f"{cell(ratio(r.get('d'), r.get('b')), 2)} | {cell(ratio(r.get('e'), r.get('b')), 2)} | "
            f"{cell(r.get('d_startup_s'))} | {cell(r.get('e_startup_s'))} | "
            f"{cell(r.get('d_input_wait'), 2)} | {cell(r.get('e_input_wait'), 2)} | "
            f"{cell(r.get('c_workers_cpu'), 2)} / {cell(r.get('c_other_cpu'), 2)} | "
            f"{cell(r.get('d_workers_cpu'), 2)} / {cell(r.get('d_other_cpu'), 2)} | "
            f"{cell(r.get('e_workers_cpu'), 2)} / {cell(r.get('e_other_cpu'), 2)} |"
        )
    if any("f" in r or "g" in r for r in results):
        print("\nthe cost of data.ordered (images/s, ordered / unordered):\n")
        print(
            "| method | C | d pool ordered | f pool unordered | d/f | e worker ordered | g worker unordered | e/g |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            print(
                f"| {r['method']} | {r['classes']} | {cell(r.get('d'))} | {cell(r.get('f'))} | "
                f"{cell(ratio(r.get('d'), r.get('f')), 2)} | {cell(r.get('e'))} | {cell(r.get('g'))} | "
                f"{cell(ratio(r.get('e'), r.get('g')), 2)} |"
            )
    by = {(r["method"], r["classes"]): r for r in results}
    targets: list[benchlib.Target] = []
    for r in results:
        key = f"{r['method']}@{r['classes']}"
        targets.append(benchlib.Target(f"c/b {key}", ratio(r.get("c"), r.get("b")), 0.95))
        targets.append(benchlib.Target(f"d/b {key}", ratio(r.get("d"), r.get("b")), 0.85))
        targets.append(benchlib.Target(f"e/b {key}", ratio(r.get("e"), r.get("b")), 0.85))
        if "f" in r:
            value = ratio(r.get("d"), r.get("f"))
            targets.append(benchlib.Target(f"ordered/unordered pool {key}", value, 0.9))
        if "g" in r:
            value = ratio(r.get("e"), r.get("g"))
            targets.append(benchlib.Target(f"ordered/unordered worker {key}", value, 0.9))
    for classes in sorted({r["classes"] for r in results}):
        p, l2, scratch = (by.get((m, classes)) for m in ("proxyless", "l2", "scratch"))
        for path in ("a", "b", "c", "d", "e"):
            if p and l2:
                value = ratio(p.get(path), l2.get(path))
                targets.append(benchlib.Target(f"proxyless/l2 {path}@{classes}", value, 1.3))
            if p and scratch:
                value = ratio(p.get(path), scratch.get(path))
                targets.append(benchlib.Target(f"proxyless/scratch {path}@{classes}", value, 1.0))
    judged = benchlib.judged(targets)
    print(
        json.dumps({"setup": setup.__dict__, "cores": cores, "results": results, "targets": judged})
    )


if __name__ == "__main__":
    sys.exit(main())
