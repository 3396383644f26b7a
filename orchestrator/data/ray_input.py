"""Training input through Ray Data: Parquet (local or object storage) -> JPEG decode on an
actor pool -> ``streaming_split`` into the Train workers, which augment. With
``data.decode: worker`` the JPEG bytes go to the workers as they are and each decodes and
augments them in threads of its own (:func:`decoded_ahead`), one batch ahead of its step.

Each epoch reads the shards in a new order (Ray's file shuffle, seeded from the config and
reseeded per execution, i.e. per epoch); with ``data.ordered`` the split of the rows over
the workers is a function of the data (Ray Data's preserve_order); rows are further mixed
by each worker's local shuffle buffer, seeded from (seed, epoch, rank); augmentation is
drawn per image from (seed, epoch, image id). ``TorchTrainer(datasets=...)`` splits every
epoch into equal disjoint parts, one per worker.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator import storage
from orchestrator.config import DataConfig, DecodeAt, ScalingConfig
from orchestrator.data import format as fmt
from orchestrator.data.consumed import drop_consumed
from orchestrator.data.images import decode_jpeg

COLUMNS = ["image", "label", "image_id"]


def shift_into(out: np.ndarray, image: np.ndarray, dy: int, dx: int) -> None:
    """``out[y, x] = image[y + dy, x + dx]``, zero where that falls outside ``image``: the
    crop at offset (dy, dx) of the image zero-padded on every side. 2-D arrays (rows of
    pixels' bytes: pass ``dx`` times the channels)."""
    height, width = image.shape
    if dy or dx:
        out.fill(0)
    out[max(0, -dy) : height - max(0, dy), max(0, -dx) : width - max(0, dx)] = image[
        max(0, dy) : height + min(0, dy), max(0, dx) : width + min(0, dx)
    ]


@dataclass(frozen=True)
class AugmentDraws:
    """The random part of augmenting a batch: which images are mirrored, and the (dy, dx)
    crop offset of each."""

    mirrored: np.ndarray  # (B,) bool
    shifts: np.ndarray  # (B, 2) int64, each in [-crop_pad, crop_pad]


def augment_draws(
    image_ids: Sequence[Any], *, key: Sequence[int], flip: bool, crop_pad: int
) -> AugmentDraws:
    """Each image's draws as a pure function of ``key`` (the run's seed and the epoch) and
    its image id: the same image in the same epoch of the same run is augmented the same
    way whichever worker, decode actor or batch it lands in, and differently in another
    epoch. Bits of a keyed 64-bit BLAKE2b digest of the id: bit 0 the mirror (p = 0.5), two
    16-bit fields the offsets (modulo ``2 * crop_pad + 1``: a bias below 1e-3 for pads up
    to 32)."""
    secret = hashlib.blake2b(b"/".join(b"%d" % k for k in key), digest_size=32).digest()
    count = len(image_ids)
    words = np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(
                    i if isinstance(i, bytes) else str(i).encode(), digest_size=8, key=secret
                ).digest(),
                "little",
            )
            for i in image_ids
        ),
        dtype=np.uint64,
        count=count,
    )
    mirrored = (words & np.uint64(1)).astype(bool) if flip else np.zeros(count, dtype=bool)
    span = np.uint64(2 * crop_pad + 1)
    dy = ((words >> np.uint64(8)) & np.uint64(0xFFFF)) % span
    dx = ((words >> np.uint64(24)) & np.uint64(0xFFFF)) % span
    shifts = np.stack([dy, dx], axis=1).astype(np.int64) - crop_pad
    return AugmentDraws(mirrored, shifts)


def decode_augmented(
    jpegs: Sequence[bytes],
    image_ids: Sequence[Any],
    *,
    size: int,
    draws: AugmentDraws,
    dataset: str,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """JPEG bytes -> (B, size, size, 3) uint8: image i mirrored when ``draws.mirrored[i]``
    and shifted by ``draws.shifts[i]`` with zero fill (a crop of the zero-padded image).

    A mirrored image is decoded with its channels reversed (BGR); reversing the bytes of each
    of its rows then gives the mirror in RGB. That is one contiguous byte reversal instead
    of a strided 3-byte pixel copy: the mirror adds ~10-15% to the decode instead of ~75%
    (measured on 112x112 faces, 256 per batch). Unaugmented images are decoded straight
    into the batch (``out`` when given: a (B, size, size, 3) uint8 array to fill).
    """
    count = len(jpegs)
    if out is None:
        out = np.empty((count, size, size, 3), dtype=np.uint8)  # (B, H, W, 3)
    scratch = np.empty((size, size, 3), dtype=np.uint8)
    for i, (data, image_id) in enumerate(zip(jpegs, image_ids, strict=True)):
        where = f"dataset {dataset}, image_id {image_id}"
        mirrored = bool(draws.mirrored[i])
        dy, dx = int(draws.shifts[i, 0]), int(draws.shifts[i, 1])
        if not mirrored and not (dy or dx):
            decode_jpeg(data, where, out=out[i])
            continue
        decode_jpeg(data, where, out=scratch, colorspace="BGR" if mirrored else "RGB")
        rows = scratch.reshape(size, size * 3)  # (H, W*3): the bytes of each row
        shift_into(out[i].reshape(size, size * 3), rows[:, ::-1] if mirrored else rows, dy, 3 * dx)
    return out


def augment_decoded(images: np.ndarray, draws: AugmentDraws) -> np.ndarray:
    """Decoded (B, H, W, 3) uint8 images, augmented in place by ``draws``: the same pixels
    :func:`decode_augmented` makes from their JPEGs (the decode pool decodes, the worker
    augments: only the worker knows the epoch its draws depend on)."""
    _, height, width, channels = images.shape
    scratch = np.empty((height, width, channels), dtype=np.uint8)
    for i in range(len(images)):
        mirrored = bool(draws.mirrored[i])
        dy, dx = int(draws.shifts[i, 0]), int(draws.shifts[i, 1])
        if not mirrored and not (dy or dx):
            continue
        scratch[:] = images[i, :, ::-1] if mirrored else images[i]
        rows = scratch.reshape(height, width * channels)
        shift_into(images[i].reshape(height, width * channels), rows, dy, channels * dx)
    return images


class Decode:
    """The actor of the decode pool: JPEG bytes -> uint8 pixels (no randomness: the
    workers augment, :func:`augment_decoded`).

    A JPEG that does not decode stops the run with the dataset and the image id.
    """

    def __init__(self, dataset: str, size: int) -> None:
        self.dataset, self.size = dataset, size

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        count = len(batch["image"])
        plain = AugmentDraws(np.zeros(count, dtype=bool), np.zeros((count, 2), dtype=np.int64))
        images = decode_augmented(
            batch["image"], batch["image_id"], size=self.size, draws=plain, dataset=self.dataset
        )
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


def configured_plan(data: DataConfig) -> DecodePlan:
    """The pipeline as ``data`` states it: ``decode_actors`` as given, none when the
    workers decode (what the read tasks reserve remains)."""
    actors = 0 if data.decode is DecodeAt.WORKER else data.decode_actors
    return DecodePlan(actors, data.decode_cpus)


def decode_plan(data: DataConfig, scaling: ScalingConfig, cluster_cpus: float) -> DecodePlan:
    """How many decode actors fit beside the Train workers without starving the reads.

    The workers take ``max_workers * cpus_per_worker``; of what is left, one
    ``decode_cpus`` slot stays free for the Parquet read tasks and the rest holds actors.
    """
    if data.decode_actors or data.decode is DecodeAt.WORKER:
        return configured_plan(data)
    left = cluster_cpus - scaling.max_workers * scaling.cpus_per_worker
    actors = math.floor((left - data.decode_cpus) / data.decode_cpus + 1e-9)
    return DecodePlan(max(1, actors), data.decode_cpus)


READ_BLOCK_BATCHES = 8  # decode batches per read block


def shard_uris(uri: str, meta: fmt.DatasetMeta | None = None) -> list[str]:
    """The Parquet shards listed in ``dataset.json`` (nothing else under the prefix)."""
    meta = meta or fmt.read_meta(uri)
    return [storage.join(uri, shard.name) for shard in meta.files]


def read_blocks(meta: fmt.DatasetMeta, decode_batch: int) -> int:
    """How many blocks the read makes: about ``READ_BLOCK_BATCHES`` decode batches each,
    and never fewer than the shards.

    Ray's default splits the read into at least 200 blocks whatever the data; here that made
    blocks smaller than a decode batch (234 rows for 30k faces), so every batch was glued
    from two blocks and the per-block overhead halved the throughput (measured, read +
    decode consumed by the driver, two decode actors: ~8k vs ~14k images/s). Blocks sized
    by rows keep that overhead per thousands of images and still give every decode actor
    work on big shards.
    """
    return max(len(meta.files), math.ceil(meta.num_images / (decode_batch * READ_BLOCK_BATCHES)))


def epoch_batches(
    shard: Any, batch_size: int, shuffle_buffer: int, *, shuffle_seed: int | None = None
) -> Iterator[dict[str, Any]]:
    """One epoch of a Train worker's dataset shard: numpy batches of ``batch_size`` rows (the
    last one may be short), mixed by a local buffer of ``shuffle_buffer`` rows (0: off)
    seeded with ``shuffle_seed`` (see :func:`shuffle_seed`)."""
    return iter(
        shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            drop_last=False,
            local_shuffle_buffer_size=shuffle_buffer or None,
            local_shuffle_seed=shuffle_seed if shuffle_buffer else None,
        )
    )


def shuffle_seed(seed: int, *, epoch: int, rank: int) -> int:
    """The local shuffle buffer's seed for one rank in one epoch: a 32-bit digest of the
    run's seed, the epoch and the rank (numpy's legacy seeding that Ray uses takes 32 bits)."""
    key = b"shuffle/%d/%d/%d" % (seed, epoch, rank)
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


class TimedBatches:
    """``batches``, with the time spent waiting for each one (inside ``next``) added up in
    ``waited``: the part of an epoch a worker is input-bound. With ``max_rows_per_s``, the
    rate is also held at or below that (``data.throttle_images_per_s``: a slow store or
    decode, simulated; the hold counts as waiting, as a slow input would)."""

    def __init__(self, batches: Iterable[dict[str, Any]], *, max_rows_per_s: float = 0.0) -> None:
        self.batches = batches
        self.max_rows_per_s = max_rows_per_s
        self.waited = 0.0  # in all, the first batch included
        self.first_wait = 0.0  # the first batch: the pipeline's start-up for this epoch
        self.rows = 0
        self.count = 0  # batches handed out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        it = iter(self.batches)
        first_at = 0.0  # the throttle's clock starts when the first batch arrives
        while True:
            asked = time.monotonic()
            try:
                batch = next(it)
            except StopIteration:
                self.waited += time.monotonic() - asked
                return
            rows = len(next(iter(batch.values())))
            if self.count == 0:
                first_at = time.monotonic()
            elif self.max_rows_per_s > 0:
                hold = first_at + self.rows / self.max_rows_per_s - time.monotonic()
                if hold > 0:
                    time.sleep(hold)
            self.rows += rows
            self.count += 1
            self.waited += time.monotonic() - asked
            if self.count == 1:
                self.first_wait = self.waited
            yield batch


def decoded_ahead(
    batches: Iterable[dict[str, Any]], data: DataConfig, *, key: Sequence[int]
) -> Iterator[dict[str, Any]]:
    """``data.decode: worker``: batches of JPEG bytes -> batches of decoded, augmented
    pixels, in order. Each batch is split over ``data.decode_threads`` threads (simplejpeg
    releases the GIL) and decoded while the caller trains on the batch before it.

    Augmentation draws come from ``key`` (the run's seed and the epoch) and each image's
    id (:func:`augment_draws`): the same input and settings give the same images. A JPEG
    that does not decode raises here, naming the dataset and image id.
    """
    size, threads = data.image_size, data.decode_threads

    def decode(batch: dict[str, Any]) -> tuple[dict[str, Any], list[Future[Any]]]:
        jpegs, ids = batch["image"], batch["image_id"]
        draws = augment_draws(ids, key=key, flip=data.flip, crop_pad=data.crop_pad)
        images = np.empty((len(jpegs), size, size, 3), dtype=np.uint8)
        bounds = np.linspace(0, len(jpegs), min(threads, len(jpegs)) + 1).astype(int)
        futures = [
            pool.submit(
                decode_augmented,
                jpegs[lo:hi],
                ids[lo:hi],
                size=size,
                draws=AugmentDraws(draws.mirrored[lo:hi], draws.shifts[lo:hi]),
                dataset=data.train,
                out=images[lo:hi],
            )
            for lo, hi in itertools.pairwise(bounds)
        ]
        out = {
            "image": images,
            "label": np.asarray(batch["label"], dtype=np.int64),
            "image_id": np.asarray(ids),
        }
        return out, futures

    def finished(pending: tuple[dict[str, Any], list[Future[Any]]]) -> dict[str, Any]:
        out, futures = pending
        for future in futures:
            future.result()  # re-raises a decode error as itself
        return out

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        ahead: tuple[dict[str, Any], list[Future[Any]]] | None = None
        for batch in batches:
            submitted = decode(batch)
            if ahead is not None:
                yield finished(ahead)
            ahead = submitted
        if ahead is not None:
            yield finished(ahead)


def ray_path(uri: str) -> str:
    return uri if not storage.is_local(uri) else storage.filesystem(uri)[1]


def training_dataset(
    data: DataConfig, plan: DecodePlan, seed: int, *, skip_dir: str | None = None
) -> Any:
    """A Ray Dataset of augmented images, labels and image ids, re-read every epoch (of JPEG
    bytes, labels and image ids with ``data.decode: worker``). With ``skip_dir``, the rows
    its skip file names are dropped as they are read (:mod:`orchestrator.data.consumed`)."""
    # ray.data: heavy (about a second to import), imported where it is used
    import ray.data

    # Ray 2.60's DataSourceV2 Parquet path adds a ListFiles task that asks for a whole CPU
    # (not configurable): beside Train workers on a small node it never schedules and the
    # run hangs (measured on 2 cores). The V1 reader takes num_cpus as given.
    meta = fmt.read_meta(data.train)
    context = ray.data.DataContext.get_current()
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(
            [ray_path(u) for u in shard_uris(data.train, meta)],
            shuffle=ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True),
            num_cpus=plan.cpus_per_actor,
            override_num_blocks=read_blocks(meta, data.decode_batch),
        ).select_columns(COLUMNS)
    finally:
        context.use_datasource_v2 = previous
    if skip_dir is not None:
        ds = ds.map_batches(
            functools.partial(drop_consumed, directory=skip_dir),
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=plan.cpus_per_actor,
        )
    if data.decode is DecodeAt.WORKER:
        return ds  # the workers decode (decoded_ahead)
    return ds.map_batches(
        Decode,
        fn_constructor_kwargs={"dataset": data.train, "size": data.image_size},
        batch_size=data.decode_batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.cpus_per_actor,
    )
