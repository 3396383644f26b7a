"""Training input through Ray Data: Parquet -> JPEG decode -> the Train workers."""

from __future__ import annotations

from typing import Any

import numpy as np

from orchestrator import storage
from orchestrator.data.images import decode_jpeg


def decode_batch(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """{"image": JPEG bytes (B,), "label": (B,)} -> {"image": (B, H, W, 3) uint8, "label"}."""
    images = np.stack([decode_jpeg(data, "training batch") for data in batch["image"]])
    return {"image": images, "label": np.asarray(batch["label"], dtype=np.int64)}


def training_dataset(uri: str) -> Any:
    """A Ray Dataset of decoded images and labels (split across workers by TorchTrainer)."""
    import ray.data

    path = uri if not storage.is_local(uri) else storage.filesystem(uri)[1]
    ds = ray.data.read_parquet(path, file_extensions=["parquet"]).select_columns(["image", "label"])
    return ds.map_batches(decode_batch, batch_size=256, batch_format="numpy")
