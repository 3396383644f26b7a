"""The ``data`` and ``storage`` sections: where the faces come from and how they are read."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from orchestrator.typed_yaml import (
    require,
)


class DecodeAt(enum.StrEnum):
    """Where the training JPEGs are decoded and augmented."""

    POOL = "pool"  # a Ray Data actor pool beside the Train workers (cores of its own)
    WORKER = "worker"  # threads inside each Train worker, overlapped with its step


class OnCorrupt(enum.StrEnum):
    """What ``jobs.prepare_dataset --on-corrupt`` does with an undecodable input image.
    (Training input has no such option: a dataset holds only images that decoded at
    import, so a corrupt one in training means the storage changed, and stops the run.)"""

    ERROR = "error"  # stop at the first undecodable image, naming it
    SKIP = "skip"  # leave it out, count it, and report the count


@dataclass(frozen=True)
class DataConfig:
    """Where the faces come from.

    ``train`` and ``eval`` are dataset directories or object-store prefixes in the format of
    README "Formats"; ``eval`` holds held-out identities and its ``pairs.parquet``.
    """

    train: str = "runs/data/synthetic/train"
    eval: str = "runs/data/synthetic/eval"
    image_size: int = 112
    # Training augmentation (evaluation never augments), drawn per image from the run's
    # seed, the epoch and the image id: one seed, the same augmented images.
    flip: bool = True  # random horizontal flip, p = 0.5
    crop_pad: int = 0  # random crop: pad by this many pixels, crop back (0: off, aligned faces)
    # Hand the epoch's rows to the workers in a fixed order (Ray Data's preserve_order), so
    # that for one seed and one world size each rank trains on the same batches in every
    # run (README "Reproducibility"). false: rows go to whichever worker asks first.
    ordered: bool = True
    # Where JPEGs are decoded and augmented: "pool", an actor pool of the Ray Data pipeline
    # (below), or "worker", data.decode_threads threads in every Train worker that decode
    # the next batch while the current one trains (for nodes with no cores to spare).
    decode: DecodeAt = DecodeAt.POOL
    decode_threads: int = 2
    # The decode + augment actor pool of the Ray Data pipeline. 0 actors: as many as the
    # CPUs left by the Train workers allow (one slot kept for the Parquet reads).
    decode_actors: int = 0
    decode_cpus: float = 0.5  # CPUs reserved per decode actor and per read task
    decode_batch: int = 256  # images per decode call
    # Where the names in run.val_targets resolve: <val_dir>/<name>.bin (insightface's sets).
    val_dir: str = ""
    # Hold the training input at or below this many images/s over all workers (0: off):
    # a slow store simulated, to see what input-bound training looks like.
    throttle_images_per_s: float = 0.0

    def __post_init__(self) -> None:
        require(self.crop_pad >= 0, "crop_pad", f"must be >= 0, found {self.crop_pad}")
        require(self.decode_actors >= 0, "decode_actors", "must be >= 0 (0: derived)")
        require(self.decode_cpus > 0, "decode_cpus", f"must be > 0, found {self.decode_cpus}")
        require(self.decode_batch >= 1, "decode_batch", "must be >= 1")
        require(
            self.decode_threads >= 1,
            "decode_threads",
            f"must be >= 1, found {self.decode_threads}",
        )
        require(self.throttle_images_per_s >= 0, "throttle_images_per_s", "must be >= 0 (0: off)")
        require(
            self.image_size >= 16 and self.image_size % 16 == 0,
            "image_size",
            f"must be a positive multiple of 16 (the backbones halve it four times), found {self.image_size}",
        )


@dataclass(frozen=True)
class StorageConfig:
    """Object storage for every s3:// URI of the run (data, classifier, checkpoints,
    reports): endpoint and region when not on AWS; empty, the ``AWS_*`` environment
    decides. Keys are never read from a config: use AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY or an instance role / service account."""

    endpoint_url: str = ""
    region: str = ""
