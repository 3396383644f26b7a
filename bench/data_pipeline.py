"""Images per second delivered into Ray Train workers from Parquet on object storage,
side by side in one run with the decode bound and a plain PyTorch DataLoader.

    python bench/data_pipeline.py                  # 6,000 faces, 2 passes each
    python bench/data_pipeline.py --images 2000 --actors 1

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
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.config import DataConfig, SyntheticConfig
from orchestrator.data import format as fmt
from orchestrator.data.prepare import write_synthetic
from orchestrator.data.ray_input import DecodePlan, training_dataset
from orchestrator.objectstore import EmbeddedObjectStore

BUCKET = "bench"
BATCH = 256


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
    """A Train worker that consumes its shard of each epoch and reports rows and seconds."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    for epoch in range(config["epochs"]):
        rows, start = 0, time.perf_counter()
        for batch in shard.iter_batches(batch_size=BATCH, batch_format="numpy"):
            rows += len(batch["label"])
        ray.train.report({"epoch": epoch, "rows": rows, "seconds": time.perf_counter() - start})


def ray_rates(uri: str, actors: int, epochs: int) -> list[float]:
    """Images/s delivered into 2 workers per epoch (sum of rows / slowest worker's time)."""
    import ray
    from ray.train.v2.api.config import RunConfig, ScalingConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    plan = DecodePlan(actors, 0.5)
    epochs_seen: dict[int, list[dict[str, float]]] = {}

    class Collect(ray.train.UserCallback):
        def after_report(
            self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
        ) -> None:
            for m in metrics:
                epochs_seen.setdefault(int(m["epoch"]), []).append(m)

    trainer = TorchTrainer(
        count_loop,
        train_loop_config={"epochs": epochs},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
        datasets={"train": training_dataset(DataConfig(train=uri), plan, seed=0)},
        run_config=RunConfig(
            name=f"bench-{time.time_ns()}",
            storage_path=tempfile.mkdtemp(prefix="bench-runs-"),
            callbacks=[Collect()],
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    trainer.fit()
    return [
        sum(m["rows"] for m in epochs_seen[e]) / max(m["seconds"] for m in epochs_seen[e])
        for e in sorted(epochs_seen)
    ]


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
            return torch.from_numpy(np.ascontiguousarray(pixels)), i

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
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--actors", type=int, default=2, help="decode actors / loader workers")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    identities = max(2, args.images // 20)
    with EmbeddedObjectStore.start(work / "store") as store:
        os.environ.update(store.endpoint.env())
        store.create_bucket(BUCKET)
        print(f"writing {identities * 20} faces to s3://{BUCKET}/faces ...", flush=True)
        synth = write_synthetic(
            SyntheticConfig(
                out=f"s3://{BUCKET}/faces",
                num_identities=identities,
                eval_identities=20,
                images_per_identity=20,
                shard_bytes=8 * 2**20,
            )
        )
        jpegs, folder = [], work / "files"
        for table in fmt.iter_shards(synth.train_uri, synth.train):
            for row in table.to_pylist():
                jpegs.append(row["image"])
                path = folder / f"{row['image_id']}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(row["image"])
        single = decode_rate(jpegs)
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address="local", log_to_driver=False, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_epochs = ray_rates(synth.train_uri, args.actors, args.epochs)
        ray.shutdown()
    loader_epochs = dataloader_rates(folder, args.actors, args.epochs)
    cores = os.cpu_count() or 1
    steady = float(np.mean(ray_epochs[1:] or ray_epochs))
    loader = float(np.mean(loader_epochs[1:] or loader_epochs))
    rows = [
        ("ray (s3) -> 2 Train workers", steady, ray_epochs),
        (f"bound: simplejpeg x {args.actors} actors", single * args.actors, []),
        (f"bound@cores: simplejpeg x {cores} cores", single * cores, []),
        (f"dataloader, Pillow, {args.actors} workers", loader, loader_epochs),
    ]
    print(f"\n{len(jpegs)} faces 112x112, {len(synth.train.files)} Parquet shards, {cores} cores")
    print(f"{'pipeline':42s} {'images/s':>10s}  per epoch")
    for name, rate, epochs in rows:
        print(f"{name:42s} {rate:10.0f}  {' '.join(f'{r:.0f}' for r in epochs)}")
    result = {
        "images": len(jpegs),
        "cores": cores,
        "decode_actors": args.actors,
        "ray_images_per_s": round(steady, 1),
        "ray_per_epoch": [round(r, 1) for r in ray_epochs],
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
