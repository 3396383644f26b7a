"""Evaluate embeddings on a held-out set: verification pairs, identification, cross-model.

Cross-model mode measures what ProxylessKD promises: a gallery embedded by the teacher
searched with probes embedded by the student (and verification pairs whose first image is
embedded by the teacher, second by the student).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from orchestrator.data import format as fmt
from orchestrator.data.images import decode_jpeg, to_model_input
from orchestrator.metrics import (
    gallery_probe_split,
    identification_rank_k,
    pair_scores,
    verification_metrics,
)
from orchestrator.progress import Progress


@dataclass(frozen=True)
class EvalSet:
    images: npt.NDArray[np.uint8]  # (N, H, W, 3)
    labels: npt.NDArray[np.int64]  # (N,)
    index_a: npt.NDArray[np.int64]  # (P,) pair rows into images
    index_b: npt.NDArray[np.int64]
    same: npt.NDArray[np.bool_]
    fold: npt.NDArray[np.int64]
    num_classes: int


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
    batch_size: int = 128,
    flip: bool = False,
    label: str = "embed",
) -> npt.NDArray[np.float32]:
    """(N, H, W, 3) uint8 -> (N, d) float32 embeddings, model in eval mode.

    With ``flip``, each embedding is the sum of the image's and its mirror's (flip test).
    """
    was_training = model.training
    model.eval()
    out = []
    progress = Progress(label, len(images), every_s=10.0)
    try:
        for lo in range(0, len(images), batch_size):
            x = to_model_input(images[lo : lo + batch_size])
            emb = model(x)
            if flip:
                emb = emb + model(torch.flip(x, dims=[3]))
            out.append(emb.float().numpy())
            progress.update(x.shape[0])
    finally:
        model.train(was_training)
    return np.concatenate(out)


def embedding_metrics(
    eval_set: EvalSet, probe: np.ndarray, gallery: np.ndarray | None = None
) -> dict[str, Any]:
    """Verification on the pairs and rank-1/5 identification.

    ``probe`` embeds every image; ``gallery`` (default: the same) embeds the first image of
    each pair and the identification gallery. Passing the teacher's embeddings as gallery and
    the student's as probe gives the cross-model numbers.
    """
    gallery = probe if gallery is None else gallery
    scores = pair_scores(gallery[eval_set.index_a], probe[eval_set.index_b])
    verification = verification_metrics(scores, eval_set.same, eval_set.fold)
    g_idx, p_idx = gallery_probe_split(eval_set.labels)
    ident = identification_rank_k(
        gallery[g_idx], eval_set.labels[g_idx], probe[p_idx], eval_set.labels[p_idx]
    )
    return {**asdict(verification), **ident}


def evaluate_model(
    model: nn.Module,
    eval_set: EvalSet,
    teacher_embeddings: np.ndarray | None = None,
    flip: bool = False,
) -> dict[str, Any]:
    """Metrics of ``model``; with the teacher's embeddings also its ``cross_model`` block."""
    emb = embed_images(model, eval_set.images, flip=flip)
    report = embedding_metrics(eval_set, emb)
    if teacher_embeddings is not None:
        report["cross_model"] = embedding_metrics(eval_set, emb, gallery=teacher_embeddings)
    return report
