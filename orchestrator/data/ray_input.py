"""Training input through Ray Data: Parquet (local or object storage) -> JPEG decode and
augmentation on an actor pool -> ``streaming_split`` into the Train workers.

Each epoch reads the shards in a new order (Ray's file shuffle, seeded from the config and
reseeded per execution, i.e. per epoch); rows are further mixed by each worker's local
shuffle buffer. ``TorchTrainer(datasets=...)`` splits every epoch into equal disjoint parts,
one per worker.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator import storage
from orchestrator.config import DataConfig, ScalingConfig
from orchestrator.data import format as fmt
from orchestrator.data.images import decode_jpeg

COLUMNS = ["image", "label", "image_id"]


def flip_and_crop(
    images: np.ndarray, rng: np.random.Generator, flip: bool, crop_pad: int, in_place: bool = False
) -> np.ndarray:
    """(B, H, W, 3) uint8 -> same shape: each image mirrored with p = 0.5 (``flip``) and
    shifted by up to ``crop_pad`` pixels each way (zero padding, then a random crop)."""
    out = images if in_place else images.copy()
    if flip:
        mirrored = rng.random(len(out)) < 0.5
        out[mirrored] = out[mirrored, :, ::-1]
    if crop_pad:
        height, width = out.shape[1:3]
        padded = np.pad(out, ((0, 0), (crop_pad, crop_pad), (crop_pad, crop_pad), (0, 0)))
        offsets = rng.integers(0, 2 * crop_pad + 1, size=(len(out), 2))
        for i, (top, left) in enumerate(offsets):
            out[i] = padded[i, top : top + height, left : left + width]
    return out


class DecodeAugment:
    """The actor of the decode pool: JPEG bytes -> uint8 pixels, optionally augmented.

    A JPEG that does not decode stops the run with the dataset and the image id.
    """

    def __init__(self, dataset: str, size: int, flip: bool, crop_pad: int, seed: int) -> None:
        self.dataset, self.size, self.flip, self.crop_pad = dataset, size, flip, crop_pad
        # Each actor draws its own augmentation stream.
        self.rng = np.random.default_rng([seed, os.getpid()])

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        count = len(batch["image"])
        images = np.empty((count, self.size, self.size, 3), dtype=np.uint8)  # (B, H, W, 3)
        for i, (data, image_id) in enumerate(zip(batch["image"], batch["image_id"], strict=True)):
            # Straight into the batch array: no per-image array and no stacking copy.
            decode_jpeg(data, f"dataset {self.dataset}, image_id {image_id}", out=images[i])
        if self.flip or self.crop_pad:
            images = flip_and_crop(images, self.rng, self.flip, self.crop_pad, in_place=True)
        return {
            "image": images,
            "label": np.asarray(batch["label"], dtype=np.int64),
            "image_id": np.asarray(batch["image_id"]),
        }


@dataclass(frozen=True)
class DecodePlan:
    actors: int
    cpus_per_actor: float

    @property
    def cpus(self) -> float:
        """What the pipeline reserves: the actors plus one slot for the Parquet reads."""
        return (self.actors + 1) * self.cpus_per_actor


def decode_plan(data: DataConfig, scaling: ScalingConfig, cluster_cpus: float) -> DecodePlan:
    """How many decode actors fit beside the Train workers without starving the reads.

    The workers take ``num_workers * cpus_per_worker``; of what is left, one
    ``decode_cpus`` slot stays free for the Parquet read tasks and the rest holds actors.
    """
    if data.decode_actors:
        return DecodePlan(data.decode_actors, data.decode_cpus)
    left = cluster_cpus - scaling.num_workers * scaling.cpus_per_worker
    actors = math.floor((left - data.decode_cpus) / data.decode_cpus + 1e-9)
    return DecodePlan(max(1, actors), data.decode_cpus)


def shard_uris(uri: str) -> list[str]:
    """The Parquet shards listed in ``dataset.json`` (nothing else under the prefix)."""
    meta = fmt.read_meta(uri)
    return [storage.join(uri, shard.name) for shard in meta.files]


def ray_path(uri: str) -> str:
    return uri if not storage.is_local(uri) else storage.filesystem(uri)[1]


def training_dataset(data: DataConfig, plan: DecodePlan, seed: int) -> Any:
    """A Ray Dataset of augmented images, labels and image ids, re-read every epoch."""
    import ray.data

    # Ray 2.60's DataSourceV2 Parquet path adds a ListFiles task that asks for a whole CPU
    # (not configurable): beside Train workers on a small node it never schedules and the
    # run hangs (measured on 2 cores). The V1 reader takes num_cpus as given.
    context = ray.data.DataContext.get_current()
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(
            [ray_path(u) for u in shard_uris(data.train)],
            shuffle=ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True),
            num_cpus=plan.cpus_per_actor,
        ).select_columns(COLUMNS)
    finally:
        context.use_datasource_v2 = previous
    return ds.map_batches(
        DecodeAugment,
        fn_constructor_kwargs={
            "dataset": data.train,
            "size": data.image_size,
            "flip": data.flip,
            "crop_pad": data.crop_pad,
            "seed": seed,
        },
        batch_size=data.decode_batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.cpus_per_actor,
    )
