"""Teachers: this project's teacher checkpoint, outside backbones, and the three ways to
build the inherited classifier (README "Formats"):

(a) from a teacher trained by this project: its trained margin-classifier head;
(b) from an insightface arcface_torch run: its per-rank Partial FC weights, concatenated in
    rank order after checking each against the shard formula;
(c) from any teacher backbone without its head: the normalised mean teacher embedding of
    each identity. This is an *approximation* of an inherited classifier (the class centre
    rather than the trained proxy), recorded as such in meta.json's source.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from orchestrator import classifier as clf
from orchestrator import storage
from orchestrator.config import FINAL_TEACHER, MultistepStage, TeacherConfig
from orchestrator.data import format as fmt
from orchestrator.data.images import decode_jpeg, to_model_input
from orchestrator.formats.loading import load_data
from orchestrator.progress import Progress
from orchestrator.shards import Shard
from orchestrator.teacher.checkpoint import load_teacher
from orchestrator.teacher.models import load_teacher_backbone

__all__ = [
    "classifier_from_arcface_torch",
    "classifier_from_checkpoint",
    "classifier_from_mean_embeddings",
    "load_teacher_backbone",
]


def _where(uri: str) -> str:
    """A stable name for the source: absolute for local paths, the URI otherwise."""
    return os.path.abspath(uri) if storage.is_local(uri) else uri


def classifier_from_checkpoint(
    checkpoint: str, out: str, *, dataset_fingerprint: str, dtype: str = "float16"
) -> clf.ClassifierMeta:
    """(a) The trained head of this project's teacher checkpoint."""
    teacher = load_teacher(checkpoint)
    if teacher.label_map_fingerprint != dataset_fingerprint:
        raise clf.ClassifierError(
            f"{checkpoint} was trained with label_map_fingerprint={teacher.label_map_fingerprint} "
            f"but the dataset has {dataset_fingerprint}"
        )
    source = {
        "kind": "teacher_checkpoint",
        "path": _where(checkpoint),
        "arch": teacher.arch.value,
    }
    return clf.write_classifier(
        out,
        teacher.classifier.float().numpy(),
        label_map_fingerprint=dataset_fingerprint,
        source=source,
        dtype=dtype,
    )


_ARCFACE_PATTERNS = (
    re.compile(r"^rank_(\d+)_softmax_weight\.pt$"),  # partial_fc v1: a bare tensor per rank
    re.compile(r"^softmax_fc_gpu_(\d+)\.pt$"),  # partial_fc v2: a state dict with "weight"
    re.compile(r"^checkpoint_gpu_(\d+)\.pt$"),  # v2 resume checkpoint: "state_dict_softmax_fc"
)


def find_arcface_shards(run_dir: str) -> list[str]:
    """The per-rank weight files of an arcface_torch run, in rank order (ranks 0..N-1)."""
    if not os.path.isdir(run_dir):
        raise clf.ClassifierError(
            f"{run_dir}: no such directory (expected arcface_torch's output directory, with "
            "its per-rank Partial FC weights)"
        )
    names = os.listdir(run_dir)
    for pattern in _ARCFACE_PATTERNS:
        found = {int(m.group(1)): n for n in names if (m := pattern.match(n))}
        if found:
            missing = sorted(set(range(max(found) + 1)) - set(found))
            if missing:
                raise clf.ClassifierError(
                    f"{run_dir}: Partial FC weights for ranks {missing} are missing"
                )
            return [os.path.join(run_dir, found[r]) for r in range(len(found))]
    raise clf.ClassifierError(
        f"{run_dir}: no arcface_torch Partial FC weights (rank_R_softmax_weight.pt, "
        "softmax_fc_gpu_R.pt or checkpoint_gpu_R.pt)"
    )


def _arcface_weight(path: str) -> torch.Tensor:
    data: Any = load_data(path, path, "a Partial FC weight file")
    if isinstance(data, dict) and "state_dict_softmax_fc" in data:
        data = data["state_dict_softmax_fc"]
    if isinstance(data, dict):
        data = data.get("weight")
    if not isinstance(data, torch.Tensor) or data.ndim != 2:
        raise clf.ClassifierError(f"{path}: expected a (C_rank, d) weight tensor")
    return data


def classifier_from_arcface_torch(
    run_dir: str,
    out: str,
    *,
    num_classes: int,
    dataset_fingerprint: str,
    dtype: str = "float16",
    emb_dim: int | None = None,
) -> clf.ClassifierMeta:
    """(b) Concatenate arcface_torch's per-rank Partial FC weights in rank order.

    arcface_torch gives rank r of N the rows [C//N*r + min(r, C%N), ... + C//N + (r < C%N));
    each file's row count is checked against that formula, so a run with a different world
    size or class count is refused instead of silently mis-assembled, and with ``emb_dim``
    the rows' width is checked before anything is written. One rank's weights are in memory
    at a time. A failure leaves ``out`` as it was (the chunks written so far are removed).
    """
    files = find_arcface_shards(run_dir)
    world_size = len(files)
    writer: clf.ClassifierWriter | None = None
    try:
        for rank, path in enumerate(files):
            weight = _arcface_weight(path)
            expected = Shard.for_rank(num_classes, world_size, rank).local_classes
            if weight.shape[0] != expected:
                raise clf.ClassifierError(
                    f"{path}: rank {rank} of {world_size} has {weight.shape[0]} rows, but "
                    f"num_classes={num_classes} gives that rank {expected}"
                )
            if emb_dim is not None and weight.shape[1] != emb_dim:
                raise clf.ClassifierError(
                    f"{path}: W has {weight.shape[1]}-d rows, the backbone gives {emb_dim}-d "
                    "embeddings"
                )
            if writer is None:
                source = {
                    "kind": "arcface_torch",
                    "path": os.path.abspath(run_dir),
                    "world_size": world_size,
                }
                writer = clf.ClassifierWriter(
                    out,
                    int(weight.shape[1]),
                    label_map_fingerprint=dataset_fingerprint,
                    source=source,
                    dtype=dtype,
                )
            writer.append(weight.float().numpy())
        assert writer is not None
        return writer.publish()
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise


def iter_dataset_batches(
    uri: str, meta: fmt.DatasetMeta, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images (B, H, W, 3) uint8, labels (B,)) over a dataset, in storage order."""
    for table in fmt.iter_shards(uri, meta, columns=["image", "label", "image_id"]):
        images = table.column("image").to_pylist()
        labels = np.asarray(table.column("label"))
        ids = table.column("image_id").to_pylist()
        for lo in range(0, len(images), batch_size):
            hi = min(lo + batch_size, len(images))
            decoded = np.stack(
                [decode_jpeg(images[i], f"{uri} image {ids[i]}") for i in range(lo, hi)]
            )
            yield decoded, labels[lo:hi]


@torch.no_grad()
def classifier_from_mean_embeddings(
    embed: Callable[[torch.Tensor], torch.Tensor],
    dataset_uri: str,
    *,
    out: str,
    batch_size: int = 64,
    dtype: str = "float16",
    teacher: dict[str, Any] | None = None,
) -> clf.ClassifierMeta:
    """(c) Row c = normalised mean of the teacher's normalised embeddings of identity c.

    An approximation of an inherited classifier: the class centre of the teacher's features
    instead of the proxy its margin loss learned. Holds a (C, d) float64 accumulator.
    """
    meta = fmt.read_meta(dataset_uri)
    sums: np.ndarray | None = None
    counts = np.zeros(meta.num_classes, dtype=np.int64)
    progress = Progress("mean embeddings", meta.num_images)
    for images, labels in iter_dataset_batches(dataset_uri, meta, batch_size):
        emb = torch.nn.functional.normalize(embed(to_model_input(images)).double(), dim=1).numpy()
        if sums is None:
            sums = np.zeros((meta.num_classes, emb.shape[1]), dtype=np.float64)
        np.add.at(sums, labels, emb)
        np.add.at(counts, labels, 1)
        progress.update(len(labels))
    progress.close()
    assert sums is not None
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise clf.ClassifierError(
            f"{dataset_uri}: labels {empty[:5].tolist()} have no images; no mean to take"
        )
    source = {"kind": "mean_teacher_embedding", "dataset": dataset_uri, "approximation": True}
    source.update(teacher or {})  # which teacher, its format and input convention
    return clf.write_classifier(
        out, sums, label_map_fingerprint=meta.label_map_fingerprint, source=source, dtype=dtype
    )


# --- multi-step distillation: the teacher's intermediate snapshots ----------------------


def snapshot_uri(backbone: str, epoch: int) -> str:
    """Where ``jobs.train_teacher`` keeps the teacher after its (1-based) ``epoch``:
    beside ``backbone``, ``teacher.pt`` -> ``teacher.epoch0003.pt``."""
    stem = backbone[:-3] if backbone.endswith(".pt") else backbone
    return f"{stem}.epoch{epoch:04d}.pt"


def stage_backbone(teacher: TeacherConfig, stage: MultistepStage) -> str:
    """The file a ``loss.multistep.schedule`` stage names: ``final`` is
    ``teacher.backbone``, ``epoch:N`` its snapshot of epoch N, anything else a path/URI."""
    if stage.teacher == FINAL_TEACHER:
        return teacher.backbone
    if stage.teacher_epoch is not None:
        return snapshot_uri(teacher.backbone, stage.teacher_epoch)
    return stage.teacher


def check_stage_files(teacher: TeacherConfig, stages: tuple[MultistepStage, ...]) -> list[str]:
    """Each stage's file, checked to exist, in schedule order; a missing snapshot names
    the setting that makes it."""
    uris = []
    for i, stage in enumerate(stages):
        uri = stage_backbone(teacher, stage)
        if not storage.exists(uri):
            hint = (
                f"; jobs.train_teacher keeps it with teacher.snapshot_epochs containing "
                f"{stage.teacher_epoch}"
                if stage.teacher_epoch is not None
                else ""
            )
            raise FileNotFoundError(
                f"loss.multistep.schedule[{i}] (from student epoch {stage.from_epoch}, teacher "
                f"{stage.teacher!r}): {uri} does not exist{hint}"
            )
        uris.append(uri)
    return uris
