"""The mean-embedding classifier built on a Ray cluster, for any number of identities.

Row c of W is the normalised mean of the teacher's normalised embeddings of identity c
(:func:`orchestrator.teacher.classifier_from_mean_embeddings` is the single-process form
and the reference). Here:

1. Ray Data reads the dataset's Parquet shards and an actor pool (:class:`EmbedAndSum`, a
   GPU each when the cluster has GPUs) decodes, embeds with the teacher in any format and
   sums each batch's normalised embeddings per label: (labels, float64 sums, counts).
2. The driver streams those partial sums, one batch at a time, to reducer actors
   (:class:`RangeSums`), each owning one identity range ``[start, start + size)``: no
   process holds more than its range (``size x d`` float64) and nobody holds all of W.
3. Each reducer normalises its rows and writes them as chunks of the classifier format
   (ranges are whole chunks, so chunk ``k`` of the published classifier is written by the
   reducer whose range holds its rows); the driver publishes ``meta.json`` last.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import ray

from orchestrator import classifier as clf
from orchestrator import storage
from orchestrator.config import TeacherConfig, to_dict
from orchestrator.data import format as fmt
from orchestrator.data.images import decode_jpeg, to_model_input
from orchestrator.data.ray_input import ray_path, shard_uris
from orchestrator.progress import Progress
from orchestrator.runs import ensure_ray
from orchestrator.teacher.models import load_teacher_backbone


@dataclass(frozen=True)
class MeanEmbeddingPlan:
    """``actors`` embedding actors of ``batch_size`` images; reducers of
    ``identities_per_range`` identities (0: one chunk's rows; rounded up to whole chunks)."""

    actors: int = 1
    batch_size: int = 64
    actor_cpus: float = 1.0  # CPU actors only; on a GPU cluster each actor takes one GPU
    identities_per_range: int = 0
    dtype: str = "float16"
    chunk_rows: int | None = None  # the classifier's chunk size (default: 64 MiB chunks)

    def __post_init__(self) -> None:
        if self.actors < 1 or self.batch_size < 1 or self.identities_per_range < 0:
            raise ValueError(
                f"actors and batch_size must be >= 1 and identities_per_range >= 0, found "
                f"{self.actors}, {self.batch_size}, {self.identities_per_range}"
            )


class EmbedAndSum:
    """A Ray Data actor: JPEG bytes -> teacher embeddings -> per-label sums of the batch."""

    def __init__(self, teacher: TeacherConfig, image_size: int, dataset: str) -> None:
        # torch: heavy (two seconds to import); Ray Data tasks import this module without it
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_teacher_backbone(teacher, image_size=image_size).to(self.device)
        self.dataset = dataset

    def __call__(self, batch: dict[str, Any]) -> dict[str, npt.NDArray[Any]]:
        # torch: heavy (two seconds to import); Ray Data tasks import this module without it
        import torch

        images = np.stack(
            [
                decode_jpeg(data, f"{self.dataset} image {image_id}")
                for data, image_id in zip(batch["image"], batch["image_id"], strict=True)
            ]
        )
        with torch.no_grad():
            emb = self.model(to_model_input(images).to(self.device))
            emb = torch.nn.functional.normalize(emb.double(), dim=1).cpu().numpy()
        labels, inverse = np.unique(np.asarray(batch["label"], dtype=np.int64), return_inverse=True)
        sums = np.zeros((labels.size, emb.shape[1]), dtype=np.float64)
        np.add.at(sums, inverse, emb)
        return {"label": labels, "sum": sums, "count": np.bincount(inverse).astype(np.int64)}


class RangeSums:
    """A reducer (a Ray actor): the sums and counts of identities ``[start, start + size)``."""

    def __init__(self, start: int, size: int, emb_dim: int) -> None:
        self.start, self.size = start, size
        self.sums = np.zeros((size, emb_dim), dtype=np.float64)  # (size, d)
        self.counts = np.zeros(size, dtype=np.int64)

    def add(
        self,
        labels: npt.NDArray[np.int64],
        sums: npt.NDArray[np.float64],
        counts: npt.NDArray[np.int64],
    ) -> int:
        local = labels - self.start
        np.add.at(self.sums, local, sums)
        np.add.at(self.counts, local, counts)
        return int(counts.sum())

    def write(
        self, out: str, *, prefix: str, chunk_rows: int, dtype: str
    ) -> tuple[list[clf.ChunkInfo], list[int]]:
        """(the chunks written, the labels of this range that had no image: then nothing
        is written)."""
        empty = (np.flatnonzero(self.counts == 0) + self.start).tolist()
        if empty:
            return [], empty
        chunks = []
        first_chunk = self.start // chunk_rows
        for k, lo in enumerate(range(0, self.size, chunk_rows)):
            rows = clf.normalized_rows(
                self.sums[lo : lo + chunk_rows],
                emb_dim=self.sums.shape[1],
                dtype=dtype,
                first=self.start + lo,
            )
            chunks.append(clf.write_chunk(out, clf.chunk_name(prefix, first_chunk + k), rows))
        return chunks, []


@dataclass(frozen=True)
class Ranges:
    """Identity ranges of whole chunks: range r is ``[r * size, min(C, (r + 1) * size))``."""

    num_classes: int
    size: int

    @staticmethod
    def of(num_classes: int, chunk_rows: int, wanted: int) -> Ranges:
        chunks = max(1, math.ceil((wanted or chunk_rows) / chunk_rows))
        return Ranges(num_classes, chunks * chunk_rows)

    @property
    def count(self) -> int:
        return math.ceil(self.num_classes / self.size)

    def bounds(self, r: int) -> tuple[int, int]:
        return r * self.size, min(self.num_classes, (r + 1) * self.size)


def _dataset(uri: str, meta: fmt.DatasetMeta, read_cpus: float) -> Any:
    # ray.data: heavy (about a second to import), imported where it is used
    import ray.data

    # The V1 Parquet reader takes num_cpus as given (see ray_input.training_dataset).
    context = ray.data.DataContext.get_current()
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(
            [ray_path(u) for u in shard_uris(uri, meta)], num_cpus=read_cpus
        ).select_columns(["image", "label", "image_id"])
    finally:
        context.use_datasource_v2 = previous


def build_on_ray(
    teacher: TeacherConfig,
    dataset_uri: str,
    *,
    out: str,
    image_size: int = 112,
    plan: MeanEmbeddingPlan | None = None,
) -> clf.ClassifierMeta:
    """Write the mean-embedding classifier of ``dataset_uri`` under ``out`` (any teacher
    format), on the Ray cluster of :func:`orchestrator.runs.ensure_ray`."""
    # ray.data: heavy (about a second to import), imported where it is used
    import ray.data

    plan = plan or MeanEmbeddingPlan()
    meta = fmt.read_meta(dataset_uri)
    if not storage.exists(teacher.backbone):  # before the cluster and the actors start
        raise FileNotFoundError(f"teacher.backbone {teacher.backbone} does not exist")
    ensure_ray()
    use_gpu = float(ray.cluster_resources().get("GPU", 0)) >= 1
    embedded = _dataset(dataset_uri, meta, read_cpus=min(plan.actor_cpus, 0.5)).map_batches(
        EmbedAndSum,
        fn_constructor_args=(teacher, image_size, dataset_uri),
        batch_size=plan.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else plan.actor_cpus,
    )
    made_out = not storage.exists(out)
    try:
        return _build(teacher, dataset_uri, meta, embedded, out=out, plan=plan, use_gpu=use_gpu)
    except BaseException:
        if made_out:
            storage.remove_empty_dir(out)  # a failed first build leaves no directory
        raise


@dataclass(frozen=True)
class Reduction:
    """The reducers of one build, started at the first batch (its width fixes the ranges)."""

    ranges: Ranges
    reducers: list[Any]
    emb_dim: int
    chunk_rows: int


def _build(
    teacher: TeacherConfig,
    dataset_uri: str,
    meta: fmt.DatasetMeta,
    embedded: Any,
    *,
    out: str,
    plan: MeanEmbeddingPlan,
    use_gpu: bool,
) -> clf.ClassifierMeta:
    prefix, previous = clf.new_generation(out)
    started = time.monotonic()
    reduction = _reduce(dataset_uri, meta, embedded, plan=plan, use_gpu=use_gpu)
    chunks = _write_ranges(reduction, dataset_uri, out=out, prefix=prefix, dtype=plan.dtype)
    result = clf.ClassifierMeta(
        num_classes=meta.num_classes,
        emb_dim=reduction.emb_dim,
        dtype=plan.dtype,
        normalized=True,
        chunk_rows=reduction.chunk_rows,
        chunks=tuple(chunks),  # reducers in range order, each its chunks in order
        label_map_fingerprint=meta.label_map_fingerprint,
        source={
            "kind": "mean_teacher_embedding",
            "dataset": dataset_uri,
            "approximation": True,
            **teacher_source(teacher),
            "builder": f"ray ({reduction.ranges.count} ranges of {reduction.ranges.size})",
        },
    )
    clf.publish(out, result, previous=previous)
    print(
        f"[mean embeddings] {meta.num_classes} x {result.emb_dim} -> {out} in "
        f"{time.monotonic() - started:.1f}s",
        flush=True,
    )
    return result


def _reduce(
    dataset_uri: str,
    meta: fmt.DatasetMeta,
    embedded: Any,
    *,
    plan: MeanEmbeddingPlan,
    use_gpu: bool,
) -> Reduction:
    """Every embedded batch's per-label sums sent to the reducer of its label range; every
    image of ``dataset.json`` accounted for."""
    progress = Progress("mean embeddings", meta.num_images)
    reduction: Reduction | None = None
    pending: list[Any] = []
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        labels, sums, counts = batch["label"], batch["sum"], batch["count"]
        if labels.size and (labels.min() < 0 or labels.max() >= meta.num_classes):
            raise clf.ClassifierError(
                f"{dataset_uri}: label {int(labels.max())} outside [0, {meta.num_classes}) "
                "(dataset.json's num_classes)"
            )
        if reduction is None:
            reduction = _start_reduction(meta, sums.shape[1], plan=plan, use_gpu=use_gpu)
        ranges, reducers = reduction.ranges, reduction.reducers
        which = labels // ranges.size
        for r in np.unique(which):
            mask = which == r
            pending.append(reducers[int(r)].add.remote(labels[mask], sums[mask], counts[mask]))
        if len(pending) > 4 * len(reducers):  # bound what waits in the reducers' queues
            done, pending = ray.wait(pending, num_returns=len(pending) - 2 * len(reducers))
            progress.update(sum(ray.get(done)))
    progress.update(sum(ray.get(pending)))
    progress.close()
    if reduction is None:
        raise clf.ClassifierError(f"{dataset_uri}: no images; no mean to take")
    if progress.done != meta.num_images:
        raise clf.ClassifierError(
            f"{dataset_uri}: embedded {progress.done} images, dataset.json lists {meta.num_images}"
        )
    return reduction


def _start_reduction(
    meta: fmt.DatasetMeta, emb_dim: int, *, plan: MeanEmbeddingPlan, use_gpu: bool
) -> Reduction:
    chunk_rows = plan.chunk_rows or clf.default_chunk_rows(emb_dim, plan.dtype)
    ranges = Ranges.of(meta.num_classes, chunk_rows, plan.identities_per_range)
    print(
        f"[mean embeddings] {meta.num_classes} identities in {ranges.count} range(s) of "
        f"{ranges.size}; {plan.actors} {'GPU' if use_gpu else 'CPU'} actor(s)",
        flush=True,
    )
    return Reduction(ranges, _start_reducers(ranges, emb_dim), emb_dim, chunk_rows)


def _write_ranges(
    reduction: Reduction, dataset_uri: str, *, out: str, prefix: str, dtype: str
) -> list[clf.ChunkInfo]:
    """Each reducer writes its range's normalised means as chunks under ``out``; a label
    with no image removes them all and is an error."""
    written = ray.get(
        [
            reducer.write.remote(out, prefix=prefix, chunk_rows=reduction.chunk_rows, dtype=dtype)
            for reducer in reduction.reducers
        ]
    )
    chunks = [c for chunk_list, _ in written for c in chunk_list]
    empty = sorted(label for _, labels in written for label in labels)
    if empty:
        for chunk in chunks:  # never published: remove what this attempt wrote
            storage.delete(storage.join(out, chunk.file))
        raise clf.ClassifierError(
            f"{dataset_uri}: labels {empty[:5]} ({len(empty)} in all) have no images; no mean to take"
        )
    return chunks


def _start_reducers(ranges: Ranges, emb_dim: int) -> list[Any]:

    actor = ray.remote(RangeSums)
    out = []
    for r in range(ranges.count):
        start, end = ranges.bounds(r)
        held = (end - start) * (emb_dim + 1) * 8
        # Memory as a resource spreads big ranges over nodes; no CPU (the reducers idle).
        out.append(actor.options(num_cpus=0, memory=held).remote(start, end - start, emb_dim))
    return out


def teacher_source(teacher: TeacherConfig) -> dict[str, Any]:
    """What a classifier built from ``teacher``'s embeddings records of it in meta.json:
    the file, its format and the input convention the images were embedded with."""
    return {
        "teacher": teacher.backbone,
        "teacher_format": teacher.format.value,
        "teacher_input": to_dict(teacher.input),
    }
