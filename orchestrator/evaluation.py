"""Evaluate embeddings on a held-out set: verification pairs, identification, cross-model.

Cross-model mode measures what ProxylessKD promises: a gallery embedded by the teacher
searched with probes embedded by the student (and verification pairs whose first image is
embedded by the teacher, second by the student).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from orchestrator.data import format as fmt
from orchestrator.data.images import decode_jpeg, to_model_input
from orchestrator.formats.student import load_student
from orchestrator.metrics import (
    gallery_probe_split,
    identification_rank_k,
    kfold_accuracy,
    pair_scores,
    roc_curve,
    verification_metrics,
)
from orchestrator.models import profile_model
from orchestrator.progress import Progress


class Flip(enum.StrEnum):
    """Flip test: each image's embedding from the image and its mirror, summed (the
    .bin protocol's usual choice) or concatenated (twice the width), before L2
    normalisation; or the image alone."""

    NONE = "none"
    SUM = "sum"
    CONCAT = "concat"

    @classmethod
    def of(cls, value: Flip | bool) -> Flip:
        if isinstance(value, Flip):
            return value
        return cls.SUM if value else cls.NONE


@dataclass(frozen=True)
class Pairs:
    """Verification pairs over an embedded image array: rows ``index_a[i]``, ``index_b[i]``."""

    index_a: npt.NDArray[np.int64]
    index_b: npt.NDArray[np.int64]
    same: npt.NDArray[np.bool_]
    fold: npt.NDArray[np.int64]


@dataclass(frozen=True)
class EvalSet:
    images: npt.NDArray[np.uint8]  # (N, H, W, 3)
    labels: npt.NDArray[np.int64]  # (N,)
    index_a: npt.NDArray[np.int64]  # (P,) pair rows into images
    index_b: npt.NDArray[np.int64]
    same: npt.NDArray[np.bool_]
    fold: npt.NDArray[np.int64]
    num_classes: int

    @property
    def pairs(self) -> Pairs:
        return Pairs(self.index_a, self.index_b, self.same, self.fold)


def load_eval_set(uri: str) -> EvalSet:
    """A held-out dataset with pairs, decoded into memory (evaluation sets are small)."""
    meta = fmt.read_meta(uri)
    images, labels, ids = [], [], []
    for table in fmt.iter_shards(uri, meta):
        row_ids = table.column("image_id").to_pylist()
        for image_id, data in zip(row_ids, table.column("image").to_pylist(), strict=True):
            images.append(decode_jpeg(data, f"{uri} image {image_id}"))
        labels.append(np.asarray(table.column("label")))
        ids += row_ids
    pairs = fmt.read_pairs(uri, meta)
    same = pairs.column("same").to_pylist()
    if not any(same) or all(same):
        raise fmt.DatasetError(
            f"{uri}: pairs.parquet holds {sum(same)} same-identity and {len(same) - sum(same)} "
            "different-identity pairs; verification needs both"
        )
    where = {image_id: i for i, image_id in enumerate(ids)}

    def rows(column: str) -> npt.NDArray[np.int64]:
        names = pairs.column(column).to_pylist()
        missing = [n for n in names if n not in where]
        if missing:
            raise fmt.DatasetError(
                f"{uri}: pairs name image ids not in the dataset, e.g. {missing[:3]}"
            )
        return np.array([where[n] for n in names], dtype=np.int64)

    return EvalSet(
        images=np.stack(images),
        labels=np.concatenate(labels).astype(np.int64),
        index_a=rows("image_id_a"),
        index_b=rows("image_id_b"),
        same=np.asarray(pairs.column("same"), dtype=bool),
        fold=np.asarray(pairs.column("fold"), dtype=np.int64),
        num_classes=meta.num_classes,
    )


@torch.no_grad()
def embed_images(
    model: nn.Module,
    images: npt.NDArray[np.uint8],
    *,
    batch_size: int = 128,
    flip: Flip | bool = Flip.NONE,
    label: str = "embed",
) -> npt.NDArray[np.float32]:
    """(N, H, W, 3) uint8 -> (N, d) float32 embeddings, model in eval mode, on the device
    of the model's parameters (the batches go there, the embeddings come back to the host).

    ``flip`` (:class:`Flip`; True is ``sum``): each embedding from the image and its mirror,
    summed, or concatenated to (N, 2d).
    """
    flip = Flip.of(flip)
    was_training = model.training
    model.eval()
    # The model's device; a module without weights (an ONNX teacher) takes CPU input.
    held = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = held.device if held is not None else torch.device("cpu")
    out = []
    progress = Progress(label, len(images), every_s=10.0)
    try:
        for lo in range(0, len(images), batch_size):
            x = to_model_input(images[lo : lo + batch_size]).to(device)
            emb = model(x)
            if flip is Flip.SUM:
                emb = emb + model(torch.flip(x, dims=[3]))
            elif flip is Flip.CONCAT:
                emb = torch.cat([emb, model(torch.flip(x, dims=[3]))], dim=1)
            out.append(emb.float().cpu().numpy())
            progress.update(x.shape[0])
    finally:
        model.train(was_training)
    embeddings = np.concatenate(out)
    check_finite_embeddings(embeddings, label)
    return embeddings


class NonFiniteEmbeddingsError(ValueError):
    """A model gave NaN or infinite embeddings: nothing can be scored with them."""


def check_finite_embeddings(embeddings: npt.NDArray[np.float32], label: str) -> None:
    """Refuse (N, d) embeddings with a NaN or infinite entry, naming how many rows and which."""
    bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if bad.size == 0:
        return
    raise NonFiniteEmbeddingsError(
        f"{label}: the model gave NaN or infinite embeddings for {bad.size} of "
        f"{len(embeddings)} images (rows {bad[:5].tolist()}{'...' if bad.size > 5 else ''}) "
        "in eval mode; a student trained for a handful of steps can do this, its "
        "BatchNorm running statistics not yet settled; train longer, or check the weights"
    )


def embedding_metrics(
    eval_set: EvalSet, probe: np.ndarray, gallery: np.ndarray | None = None
) -> dict[str, Any]:
    """Verification on the pairs and rank-1/5 identification.

    ``probe`` embeds every image; ``gallery`` (default: the same) embeds the first image of
    each pair and the identification gallery. Passing the teacher's embeddings as gallery and
    the student's as probe gives the cross-model numbers.
    """
    gallery = probe if gallery is None else gallery
    verification = pair_verification(eval_set.pairs, probe, gallery)
    g_idx, p_idx = gallery_probe_split(eval_set.labels)
    ident = identification_rank_k(
        gallery[g_idx],
        eval_set.labels[g_idx],
        probes=probe[p_idx],
        probe_labels=eval_set.labels[p_idx],
    )
    return {**verification, **ident}


def pair_verification(
    pairs: Pairs, probe: np.ndarray, gallery: np.ndarray | None = None
) -> dict[str, Any]:
    """10-fold accuracy, TAR@FAR, AUC, EER of the cosine scores of ``pairs``: the first
    image of each pair from ``gallery`` (default ``probe``), the second from ``probe``."""
    gallery = probe if gallery is None else gallery
    scores = pair_scores(gallery[pairs.index_a], probe[pairs.index_b])
    return asdict(verification_metrics(scores, pairs.same, folds=pairs.fold))


def pair_decisions(
    pairs: Pairs, probe: np.ndarray, gallery: np.ndarray | None = None
) -> npt.NDArray[np.bool_]:
    """Each pair accepted or not by its fold's threshold (chosen on the other folds): what
    the 10-fold accuracy counts."""
    gallery = probe if gallery is None else gallery
    scores = pair_scores(gallery[pairs.index_a], probe[pairs.index_b])
    kfold = kfold_accuracy(scores, pairs.same, pairs.fold)
    folds = np.unique(pairs.fold)
    thresholds = np.asarray(kfold.thresholds)[np.searchsorted(folds, pairs.fold)]
    return np.asarray(scores >= thresholds)


def evaluate_model(
    model: nn.Module,
    eval_set: EvalSet,
    *,
    teacher_embeddings: np.ndarray | None = None,
    flip: bool = False,
) -> dict[str, Any]:
    """Metrics of ``model``; with the teacher's embeddings also its ``cross_model`` block."""
    emb = embed_images(model, eval_set.images, flip=flip)
    report = embedding_metrics(eval_set, emb)
    if teacher_embeddings is not None:
        report["cross_model"] = embedding_metrics(eval_set, emb, gallery=teacher_embeddings)
    return report


@dataclass(frozen=True)
class EvaluationReport:
    report: dict[str, Any]  # the report.json content
    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # label -> (fpr, tpr)


def evaluate_students(
    eval_uri: str,
    teacher: nn.Module | None,
    students: dict[str, str],
    flip: Flip | bool = Flip.NONE,
) -> EvaluationReport:
    """The teacher, each student, and each student's cross-model numbers on one eval set."""
    eval_set = load_eval_set(eval_uri)
    report: dict[str, Any] = {
        "dataset": {
            "eval": eval_uri,
            "num_identities": eval_set.num_classes,
            "num_images": int(eval_set.labels.size),
            "num_pairs": int(eval_set.same.size),
            "flip_test": Flip.of(flip).value,
        },
        "teacher": None,
        "students": {},
    }
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def curve(label: str, gallery: np.ndarray, probe: np.ndarray) -> None:
        roc = roc_curve(
            pair_scores(gallery[eval_set.index_a], probe[eval_set.index_b]), eval_set.same
        )
        curves[label] = (roc.fpr, roc.tpr)

    teacher_emb = None
    if teacher is not None:
        teacher_emb = embed_images(teacher, eval_set.images, flip=flip, label="embed teacher")
        report["teacher"] = {
            **embedding_metrics(eval_set, teacher_emb),
            "params": profile_model(teacher).params,
        }
        curve("teacher", teacher_emb, teacher_emb)
    for name, uri in students.items():
        model, export = load_student(uri)
        emb = embed_images(model, eval_set.images, flip=flip, label=f"embed {name}")
        entry: dict[str, Any] = embedding_metrics(eval_set, emb)
        entry["cross_model"] = None
        if teacher_emb is not None and teacher_emb.shape[1] == emb.shape[1]:
            entry["cross_model"] = embedding_metrics(eval_set, emb, gallery=teacher_emb)
            curve(f"{name} cross (teacher gallery)", teacher_emb, emb)
        entry.update(
            params=profile_model(model).params,
            train_seconds=export.train_seconds,
            epochs=len(export.epochs_done),
            # Per trained epoch: images/s and the share of the time waiting for input.
            throughput=[
                {"samples_per_s": round(rate, 1), "input_wait_share": round(wait, 3)}
                for rate, wait in export.throughput
            ],
            checkpoint=uri,
        )
        report["students"][name] = entry
        curve(name, emb, emb)
    return EvaluationReport(report, curves)
