"""Images per second delivered into Ray Train workers from Parquet on object storage,
side by side in one run with the decode bound and a plain PyTorch DataLoader.

    python bench/data_pipeline.py                  # 30,000 rows per epoch, 3 epochs
    python bench/data_pipeline.py --images 5000 --actors 1

Rows of the table:

  ray (s3)     our pipeline: Parquet on the embedded S3 server (SeaweedFS on loopback) ->
               Ray Data read -> simplejpeg decode + flip on an actor pool -> streaming_split
               into 2 TorchTrainer workers that only count rows (no model)
  bound        one process decoding the same JPEG bytes with simplejpeg (from memory), times
               the decode actors (each actor is one process: one core at most)
  bound@cores  the same times all the machine's cores (the stricter bound)
  dataloader   torch DataLoader, JPEG files on local disk, Pillow decode + flip,
               num_workers = the decode actors

Each pipeline makes --epochs passes; the first pass (start-up: actors, connections) is
reported but the rate is the mean of the later passes. Prints a table and, as its last
line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.config import DataConfig
from orchestrator.data import format as fmt
from orchestrator.data.images import encode_jpeg
from orchestrator.data.ray_input import DecodePlan, training_dataset
from orchestrator.data.synthetic import iter_identity_images
from orchestrator.objectstore import EmbeddedObjectStore

BUCKET = "bench"
BATCH = 256


def distinct_faces(count: int) -> list[bytes]:
    """``count`` synthetic 112x112 faces (20 per identity) as JPEG, quality 90."""
    faces = []
    for identity in range((count + 19) // 20):
        for face in iter_identity_images(0, identity, 20, 112):
            faces.append(encode_jpeg(face, 90))
    return faces[:count]


def write_rows(uri: str, jpegs: list[bytes], rows: int) -> fmt.DatasetMeta:
    """A dataset of ``rows`` images cycling through ``jpegs`` (decode cost is per row)."""
    writer = fmt.DatasetWriter(uri, 112, 8 * 2**20, {"kind": "bench"})
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


def count_loop(config: dict[str, Any]) -> None:
    """A Train worker that consumes its shard of each epoch; appends rows and seconds per
    epoch to a file of its own (same machine as the driver)."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(config["epochs"]):
        rows, start, first = 0, time.perf_counter(), 0.0
        for batch in shard.iter_batches(batch_size=BATCH, batch_format="numpy"):
            rows += len(batch["label"])
            first = first or time.perf_counter()
        seconds = time.perf_counter() - start
        record = {"epoch": epoch, "rows": rows, "seconds": seconds, "first": first - start}
        with open(Path(config["out"]) / f"rank-{rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        ray.train.report({"epoch": epoch})


def ray_rates(uri: str, actors: int, epochs: int) -> list[EpochRate]:
    """Images/s delivered into 2 workers per epoch (sum of rows / slowest worker's time)."""
    from ray.train.v2.api.config import RunConfig, ScalingConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    out = Path(tempfile.mkdtemp(prefix="bench-runs-"))
    trainer = TorchTrainer(
        count_loop,
        train_loop_config={"epochs": epochs, "out": str(out)},
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
            sum(r["rows"] for r in per_epoch[e]) / max(r["seconds"] for r in per_epoch[e]),
            max(r["first"] for r in per_epoch[e]),
        )
        for e in sorted(per_epoch)
    ]


@dataclass(frozen=True)
class EpochRate:
    images_per_s: float  # rows of the epoch / wall time of the slowest worker
    startup_s: float  # until the first batch reached the slowest worker


def dataloader_rates(folder: Path, workers: int, epochs: int) -> list[float]:
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
    rates = []
    for _ in range(epochs):
        rows, start = 0, time.perf_counter()
        for images, _ in loader:
            rows += len(images)
        rates.append(rows / (time.perf_counter() - start))
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=30000, help="rows per epoch")
    parser.add_argument("--distinct", type=int, default=1000, help="distinct faces among them")
    parser.add_argument("--actors", type=int, default=2, help="decode actors / loader workers")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    with EmbeddedObjectStore.start(work / "store") as store:
        os.environ.update(store.endpoint.env())
        store.create_bucket(BUCKET)
        jpegs = distinct_faces(args.distinct)
        uri = f"s3://{BUCKET}/faces"
        print(f"writing {args.images} rows ({len(jpegs)} distinct faces) to {uri} ...", flush=True)
        meta = write_rows(uri, jpegs, args.images)
        folder = work / "files"
        folder.mkdir()
        for i in range(args.images):
            (folder / f"{i:07d}.jpg").write_bytes(jpegs[i % len(jpegs)])
        single = decode_rate(jpegs)
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address="local", log_to_driver=False, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_epochs = ray_rates(uri, args.actors, args.epochs)
        ray.shutdown()
    loader_epochs = dataloader_rates(folder, args.actors, args.epochs)
    cores = os.cpu_count() or 1
    later = ray_epochs[1:] or ray_epochs
    steady = float(np.mean([e.images_per_s for e in later]))
    startup = float(np.mean([e.startup_s for e in later]))
    loader = float(np.mean(loader_epochs[1:] or loader_epochs))
    rows = [
        ("ray (s3) -> 2 Train workers", steady, [e.images_per_s for e in ray_epochs]),
        (f"bound: simplejpeg x {args.actors} actors", single * args.actors, []),
        (f"bound@cores: simplejpeg x {cores} cores", single * cores, []),
        (f"dataloader, Pillow, {args.actors} workers", loader, loader_epochs),
    ]
    print(
        f"\n{args.images} faces 112x112 per epoch, {len(meta.files)} Parquet shards, {cores} cores"
    )
    print(f"{'pipeline':42s} {'images/s':>10s}  per epoch")
    for name, rate, epochs in rows:
        print(f"{name:42s} {rate:10.0f}  {' '.join(f'{r:.0f}' for r in epochs)}")
    print(f"ray start-up per epoch (first batch in the slowest worker): {startup:.2f}s")
    result = {
        "images_per_epoch": args.images,
        "cores": cores,
        "decode_actors": args.actors,
        "ray_images_per_s": round(steady, 1),
        "ray_per_epoch": [round(e.images_per_s, 1) for e in ray_epochs],
        "ray_startup_s": round(startup, 2),
        "simplejpeg_single_process": round(single, 1),
        "bound_actors": round(single * args.actors, 1),
        "bound_cores": round(single * cores, 1),
        "fraction_of_bound_actors": round(steady / (single * args.actors), 3),
        "fraction_of_bound_cores": round(steady / (single * cores), 3),
        "dataloader_pillow_images_per_s": round(loader, 1),
        "ray_over_dataloader": round(steady / loader, 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
