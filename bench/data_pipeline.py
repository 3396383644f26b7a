"""Images per second delivered into Ray Train workers from Parquet on object storage,
side by side in one run with the decode bound and a plain PyTorch DataLoader.

    python bench/data_pipeline.py                  # 100,000 rows per epoch, 3 epochs
    python bench/data_pipeline.py --images 20000 --actors 1

Rows of the table:

  ray (s3)      our pipeline: Parquet on the embedded S3 server (SeaweedFS on loopback) ->
                Ray Data read -> simplejpeg decode + flip on an actor pool -> streaming_split
                into 2 TorchTrainer workers that iterate exactly as training does
                (orchestrator.data.ray_input.epoch_batches, the default shuffle buffer) and
                only count rows (no model)
  dataloader    torch DataLoader, JPEG files on local disk, Pillow decode + flip,
                num_workers = the decode actors
  bound         one process decoding the same JPEG bytes with simplejpeg (from memory), times
                the machine's cores (the bound the targets refer to)
  N at once     the same decode in one process per core, all at once: what the cores give
                together here (a shared VM gives less than N x one)

Rates: "epoch" is the whole epoch including its start-up (Ray Data starts a new decode
actor pool and read for every epoch); "start-up" is the time to the first batch in the
slowest worker; "steady" counts the rows after each worker's first batch over the time
after it. Steady overstates on short epochs (what was decoded before the first batch counts
as delivered after it: with 4,000 rows it once came out above the bound), so the targets in the
JSON are judged on the whole-epoch rates. Both pipelines make --epochs passes; the first (process
start, connections, page cache) is shown but the reported figures are means of the later
passes. Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import benchlib  # first: it puts this checkout on sys.path
import numpy as np

from orchestrator.config import DataConfig
from orchestrator.data import format as fmt
from orchestrator.data.ray_input import DecodePlan, epoch_batches, training_dataset
from orchestrator.objectstore import EmbeddedObjectStore

BUCKET = "bench"
BATCH = 256


def write_rows(uri: str, jpegs: list[bytes], rows: int) -> fmt.DatasetMeta:
    """A dataset of ``rows`` images cycling through ``jpegs`` (decode cost is per row)."""
    writer = fmt.DatasetWriter(uri, 112, shard_bytes=8 * 2**20, source={"kind": "bench"})
    for i in range(rows):
        writer.add(jpegs[i % len(jpegs)], i % 100, f"id{i % 100}", f"{i:07d}")
    return writer.publish([f"id{k}" for k in range(100)])


def decode_rate(jpegs: list[bytes], seconds: float = 3.0) -> float:
    """Single-process simplejpeg decode rate (images/s) over ``jpegs``, from memory."""
    import simplejpeg

    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for data in jpegs[:500]:
            simplejpeg.decode_jpeg(data, colorspace="RGB")
        done += min(500, len(jpegs))
    return done / (time.perf_counter() - start)


def parallel_decode_rate(jpegs: list[bytes], processes: int) -> float:
    """The summed rate of ``processes`` single-process decoders running at the same time."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(processes) as pool:
        return sum(pool.map(decode_rate, [jpegs] * processes))


@dataclass(frozen=True)
class EpochRate:
    images_per_s: float  # rows of the epoch / wall time, start-up included
    steady_per_s: float  # rows after the first batch / time after it
    startup_s: float  # until the first batch (in the slowest worker)


@dataclass(frozen=True)
class EpochCount:
    rows: int
    after_first: int  # rows after the first batch
    seconds: float  # the whole pass
    first: float  # seconds until the first batch

    @property
    def rate(self) -> EpochRate:
        return EpochRate(
            self.rows / self.seconds, self.after_first / (self.seconds - self.first), self.first
        )


def count_epoch(batches: Iterable[Any], rows_of: Callable[[Any], int]) -> EpochCount:
    """Consume one pass of ``batches``, counting rows and timing the first batch."""
    rows, after_first, start, first = 0, 0, time.perf_counter(), 0.0
    for batch in batches:
        rows += rows_of(batch)
        if first:
            after_first += rows_of(batch)
        first = first or time.perf_counter()
    return EpochCount(rows, after_first, time.perf_counter() - start, first - start)


def count_loop(config: dict[str, Any]) -> None:
    """A Train worker that consumes its shard of each epoch as training does; appends rows
    and times per epoch to a file of its own (same machine as the driver)."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(config["epochs"]):
        batches = epoch_batches(shard, BATCH, config["shuffle_buffer"])
        record = {"epoch": epoch, **asdict(count_epoch(batches, lambda b: len(b["label"])))}
        with open(Path(config["out"]) / f"rank-{rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        ray.train.report({"epoch": epoch})


def ray_rates(uri: str, actors: int, epochs: int) -> list[EpochRate]:
    """Per epoch, into 2 workers: sums of rows over the slowest worker's times."""
    from ray.train.v2.api.config import RunConfig, ScalingConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    from orchestrator.config import RunConfig as OurRunConfig

    out = Path(tempfile.mkdtemp(prefix="bench-runs-"))
    trainer = TorchTrainer(
        count_loop,
        train_loop_config={
            "epochs": epochs,
            "out": str(out),
            "shuffle_buffer": OurRunConfig().shuffle_buffer,
        },
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
        datasets={"train": training_dataset(DataConfig(train=uri), DecodePlan(actors, 0.5), 0)},
        run_config=RunConfig(
            name="bench",
            storage_path=str(out),
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    per_epoch: dict[int, list[dict[str, float]]] = {}
    for path in out.glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            per_epoch.setdefault(int(record["epoch"]), []).append(record)
    return [
        EpochRate(
            sum(r["rows"] for r in records) / max(r["seconds"] for r in records),
            sum(r["after_first"] for r in records)
            / max(r["seconds"] - r["first"] for r in records),
            max(r["first"] for r in records),
        )
        for records in (per_epoch[e] for e in sorted(per_epoch))
    ]


def dataloader_rates(folder: Path, workers: int, epochs: int) -> list[EpochRate]:
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    files = sorted(folder.rglob("*.jpg"))

    class Files(Dataset[tuple[torch.Tensor, int]]):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            with Image.open(files[i]) as img:
                pixels = np.asarray(img.convert("RGB"))
            if np.random.random() < 0.5:
                pixels = pixels[:, ::-1]
            return torch.from_numpy(pixels.copy()), i

    loader = DataLoader(
        Files(), batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=True
    )
    return [count_epoch(loader, lambda b: len(b[0])).rate for _ in range(epochs)]


def mean_later(rates: list[EpochRate]) -> EpochRate:
    """The mean of the passes after the first (the first alone if there is one)."""
    later = rates[1:] or rates
    return EpochRate(
        float(np.mean([r.images_per_s for r in later])),
        float(np.mean([r.steady_per_s for r in later])),
        float(np.mean([r.startup_s for r in later])),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=" ".join((__doc__ or "").strip().split("\n\n")[0].split())
    )
    parser.add_argument("--images", type=int, default=100000, help="rows per epoch")
    parser.add_argument("--distinct", type=int, default=1000, help="distinct faces among them")
    parser.add_argument("--actors", type=int, default=2, help="decode actors / loader workers")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    import ray

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    with EmbeddedObjectStore.start(work / "store") as store:
        os.environ.update(store.endpoint.env())
        store.create_bucket(BUCKET)
        jpegs = benchlib.synthetic_faces(args.distinct)
        uri = f"s3://{BUCKET}/faces"
        print(f"writing {args.images} rows ({len(jpegs)} distinct faces) to {uri} ...", flush=True)
        meta = write_rows(uri, jpegs, args.images)
        folder = work / "files"
        folder.mkdir()
        for i in range(args.images):
            (folder / f"{i:07d}.jpg").write_bytes(jpegs[i % len(jpegs)])
        single = decode_rate(jpegs)
        together = parallel_decode_rate(jpegs, cores)
        print(f"ray pipeline, {args.epochs} epochs ...", flush=True)
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address="local", log_to_driver=False, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_epochs = ray_rates(uri, args.actors, args.epochs)
        ray.shutdown()
    print(f"dataloader, {args.epochs} epochs ...", flush=True)
    loader_epochs = dataloader_rates(folder, args.actors, args.epochs)
    ours, loader = mean_later(ray_epochs), mean_later(loader_epochs)
    bound = single * cores
    print(
        f"\n{args.images} faces 112x112 per epoch, {len(meta.files)} Parquet shards, "
        f"{cores} cores, {args.actors} decode actors / loader workers"
    )
    print(f"{'pipeline':40s} {'steady/s':>9s} {'epoch/s':>8s} {'start-up':>8s}  epoch/s by pass")
    for name, rate, passes in (
        ("ray (s3) -> 2 Train workers", ours, ray_epochs),
        (f"dataloader, Pillow, {args.actors} workers", loader, loader_epochs),
    ):
        by_pass = " ".join(f"{p.images_per_s:.0f}" for p in passes)
        print(
            f"{name:40s} {rate.steady_per_s:9.0f} {rate.images_per_s:8.0f} "
            f"{rate.startup_s:7.2f}s  {by_pass}"
        )
    print(f"{f'bound: simplejpeg x {cores} cores':40s} {bound:9.0f}")
    print(f"{f'simplejpeg, {cores} processes at once':40s} {together:9.0f}")
    print(
        f"ray whole epochs = {ours.images_per_s / bound:.2f} of the bound, "
        f"{ours.images_per_s / loader.images_per_s:.2f}x the dataloader; steady = "
        f"{ours.steady_per_s / bound:.2f} of the bound "
        f"({ours.steady_per_s / together:.2f} of {cores} decoders at once), "
        f"{ours.steady_per_s / loader.steady_per_s:.2f}x the dataloader"
    )
    result = {
        "images_per_epoch": args.images,
        "cores": cores,
        "decode_actors": args.actors,
        "ray_steady_images_per_s": round(ours.steady_per_s, 1),
        "ray_epoch_images_per_s": round(ours.images_per_s, 1),
        "ray_startup_s": round(ours.startup_s, 2),
        "ray_epoch_by_pass": [round(p.images_per_s, 1) for p in ray_epochs],
        "simplejpeg_single_process": round(single, 1),
        "bound": round(bound, 1),
        "simplejpeg_all_cores_at_once": round(together, 1),
        "dataloader_steady_images_per_s": round(loader.steady_per_s, 1),
        "dataloader_epoch_images_per_s": round(loader.images_per_s, 1),
        "fraction_of_bound": round(ours.steady_per_s / bound, 3),
        "fraction_of_cores_at_once": round(ours.steady_per_s / together, 3),
        "ray_over_dataloader": round(ours.steady_per_s / loader.steady_per_s, 3),
        "fraction_of_bound_epoch": round(ours.images_per_s / bound, 3),
        "ray_over_dataloader_epoch": round(ours.images_per_s / loader.images_per_s, 3),
        "targets": benchlib.judged(
            [
                benchlib.Target("epoch rate / decode bound", ours.images_per_s / bound, 0.7),
                benchlib.Target(
                    "epoch rate / DataLoader", ours.images_per_s / loader.images_per_s, 1.0
                ),
            ]
        ),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
