"""IJB-B / IJB-C 1:1 verification from the official directory layout.

``<root>/meta/`` holds, for set ``IJBC`` (``ijbb_`` for ``IJBB``), three whitespace-separated
text files:

- ``ijbc_face_tid_mid.txt``: ``image template_id media_id``, one face per line;
- ``ijbc_template_pair_label.txt``: ``template_a template_b label`` (1 = same person);
- ``ijbc_name_5pts_score.txt``: ``image x1 y1 ... x5 y5 detector_score`` (the five points in
  the order left eye, right eye, nose, left mouth corner, right mouth corner);

and ``<root>/loose_crop/<image>`` the face crops. The protocol:

1. each face aligned by the similarity transform (least squares over the five points,
   rotation + uniform scale + shift) onto the 112x112 ArcFace template;
2. the image and its mirror embedded (:class:`orchestrator.evaluation.Flip`: concatenated
   by default, or summed), the face's feature L2-normalised and, optionally, multiplied by its
   detector score;
3. media pooling (the mean of a template's faces from one media: one video's frames count
   once) then template pooling (the sum over its media), L2-normalised;
4. the cosine score of every template pair (vectorised, in chunks: bounded memory for
   IJB-C's ~15.7M pairs), the ROC, and TAR at FAR 1e-6 ... 1e-1.

Embedding runs as Ray Data batch inference: an actor pool that aligns and embeds, on GPUs
when the cluster has them. Cross-model: the first template of every pair from the
teacher's features, the second from the student's.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from orchestrator import storage
from orchestrator.benchmarks.verification_bin import BenchmarkError
from orchestrator.config import TeacherConfig
from orchestrator.data.images import decode_image
from orchestrator.evaluation import Flip, embed_images
from orchestrator.formats.student import load_student
from orchestrator.metric_names import IJB_FAR_KEYS
from orchestrator.metrics import roc_auc, roc_curve, tar_at_far
from orchestrator.runs import ensure_ray
from orchestrator.teacher.models import load_teacher_backbone

# Where the five points of an aligned 112x112 face sit (ArcFace's template: eyes, nose tip,
# mouth corners), in pixels.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ALIGNED_SIZE = 112
IJB_FARS: tuple[float, ...] = tuple(float(key) for key in IJB_FAR_KEYS)


class IjbSet(enum.StrEnum):  # the values of orchestrator.config.IJB_SETS
    IJBB = "IJBB"
    IJBC = "IJBC"

    @property
    def prefix(self) -> str:
        return self.value.lower()


# --- the directory layout -----------------------------------------------------------------


@dataclass(frozen=True)
class IjbMeta:
    root: str
    set: IjbSet
    images: tuple[str, ...]  # (N,) names under loose_crop/
    templates: npt.NDArray[np.int64]  # (N,) template of each face
    media: npt.NDArray[np.int64]  # (N,)
    landmarks: npt.NDArray[np.float64]  # (N, 5, 2)
    scores: npt.NDArray[np.float64]  # (N,) detector scores
    pair_a: npt.NDArray[np.int64]  # (P,) template ids
    pair_b: npt.NDArray[np.int64]
    same: npt.NDArray[np.bool_]  # (P,)

    def image_uri(self, name: str) -> str:
        return storage.join(self.root, "loose_crop", name)


def meta_file(root: str, ijb: IjbSet, stem: str) -> str:
    uri = storage.join(root, "meta", f"{ijb.prefix}_{stem}.txt")
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"IJB {ijb.value} under {root}: expected {uri} (the official meta/ layout)"
        )
    return uri


def _rows(uri: str, columns: int) -> list[list[str]]:
    rows = [line.split() for line in storage.read_text(uri).splitlines() if line.strip()]
    for number, row in enumerate(rows, start=1):
        if len(row) != columns:
            raise BenchmarkError(
                f"{uri} line {number}: expected {columns} columns, found {len(row)}"
            )
    return rows


def read_ijb_meta(root: str, ijb: IjbSet) -> IjbMeta:
    faces_uri = meta_file(root, ijb, "face_tid_mid")
    faces = _rows(faces_uri, 3)
    crops = storage.join(root, "loose_crop")
    for row in faces:  # every image name stays under loose_crop/, checked before any read
        storage.child(crops, row[0], source=faces_uri)
    points = _rows(meta_file(root, ijb, "name_5pts_score"), 12)
    pairs = _rows(meta_file(root, ijb, "template_pair_label"), 3)
    by_name = {row[0]: row[1:] for row in points}
    missing = [row[0] for row in faces if row[0] not in by_name]
    if missing:
        raise BenchmarkError(
            f"{root}: {len(missing)} faces of face_tid_mid have no landmarks in "
            f"name_5pts_score, e.g. {missing[:3]}"
        )
    try:
        marks = np.array([by_name[row[0]] for row in faces], dtype=np.float64)
        meta = IjbMeta(
            root=root,
            set=ijb,
            images=tuple(row[0] for row in faces),
            templates=np.array([row[1] for row in faces], dtype=np.int64),
            media=np.array([row[2] for row in faces], dtype=np.int64),
            landmarks=marks[:, :10].reshape(-1, 5, 2),
            scores=marks[:, 10],
            pair_a=np.array([row[0] for row in pairs], dtype=np.int64),
            pair_b=np.array([row[1] for row in pairs], dtype=np.int64),
            same=np.array([row[2] for row in pairs], dtype=np.int64) == 1,
        )
    except ValueError as err:
        raise BenchmarkError(f"{root}: a meta file holds a non-number ({err})") from None
    unknown = np.setdiff1d(np.concatenate([meta.pair_a, meta.pair_b]), meta.templates)
    if unknown.size:
        raise BenchmarkError(
            f"{root}: template pairs name {unknown.size} templates with no faces, "
            f"e.g. {unknown[:3].tolist()}"
        )
    check_ijb_content(meta, crops)
    return meta


def check_ijb_content(meta: IjbMeta, crops: str) -> None:
    """Every landmark and score a number, every face's image present under ``crops``
    (one listing): refused before any face is embedded, naming the faces."""
    values = np.concatenate([meta.landmarks.reshape(len(meta.images), -1), meta.scores[:, None]], 1)
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if bad.size:
        names = [meta.images[i] for i in bad[:3]]
        raise BenchmarkError(
            f"{meta.root}: {bad.size} faces have a NaN or infinite landmark or score in "
            f"name_5pts_score, e.g. {names}; expected finite pixel coordinates"
        )
    present = storage.file_names(crops)
    missing = [name for name in meta.images if name not in present]
    if missing:
        raise BenchmarkError(
            f"{crops}: {len(missing)} of the {len(meta.images)} faces listed in face_tid_mid "
            f"have no image, e.g. {missing[:3]}"
        )


# --- alignment ------------------------------------------------------------------------------


def similarity_transform(src: npt.ArrayLike, dst: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The (2, 3) matrix ``M`` of rotation, uniform scale and shift minimising
    ``sum |M [src_i, 1] - dst_i|^2`` (Umeyama's closed form, no reflection)."""
    s, d = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    mean_s, mean_d = s.mean(axis=0), d.mean(axis=0)
    cs, cd = s - mean_s, d - mean_d
    covariance = cd.T @ cs / len(s)
    u, sigma, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    scale = float((sigma * sign).sum() / cs.var(axis=0).sum())
    shift = mean_d - scale * rotation @ mean_s
    return np.hstack([scale * rotation, shift[:, None]])


def warp_affine(
    image: npt.NDArray[np.uint8], matrix: npt.ArrayLike, size: tuple[int, int]
) -> npt.NDArray[np.uint8]:
    """``out[y, x] = image`` at ``M^-1 (x, y)`` (bilinear, black outside): ``matrix`` maps
    input pixel coordinates to output ones. ``size`` is (width, height)."""
    m = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(m)[:2].ravel()
    warped = Image.fromarray(image).transform(
        size, Image.Transform.AFFINE, data=tuple(inverse), resample=Image.Resampling.BILINEAR
    )
    return np.asarray(warped)


def align_face(image: npt.NDArray[np.uint8], landmarks: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """A face crop with its five points -> the 112x112 ArcFace-aligned face."""
    matrix = similarity_transform(landmarks, ARCFACE_TEMPLATE)
    return warp_affine(image, matrix, (ALIGNED_SIZE, ALIGNED_SIZE))


# --- pooling and scoring ----------------------------------------------------------------------


def _unit(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def template_features(
    features: npt.ArrayLike,
    templates: npt.ArrayLike,
    media: npt.ArrayLike,
    *,
    scores: npt.ArrayLike | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Face features (N, d) -> (template ids (T,), unit template features (T, d)).

    Each face's feature is L2-normalised (times its detector score when ``scores`` is
    given); a template's feature is the sum over its media of the mean of that media's
    faces, L2-normalised."""
    f = _unit(np.asarray(features, dtype=np.float64))
    if scores is not None:
        f = f * np.asarray(scores, dtype=np.float64)[:, None]
    t, m = np.asarray(templates, dtype=np.int64), np.asarray(media, dtype=np.int64)
    # One group per (template, media): the media means.
    groups, group_of = np.unique(np.stack([t, m], axis=1), axis=0, return_inverse=True)
    group_of = group_of.ravel()
    sums = np.zeros((len(groups), f.shape[1]))
    np.add.at(sums, group_of, f)
    means = sums / np.bincount(group_of, minlength=len(groups))[:, None]
    ids, template_of = np.unique(groups[:, 0], return_inverse=True)
    pooled = np.zeros((len(ids), f.shape[1]))
    np.add.at(pooled, template_of.ravel(), means)
    return ids, _unit(pooled)


def template_pair_scores(
    ids: npt.NDArray[np.int64],
    features_a: npt.NDArray[np.float64],
    features_b: npt.NDArray[np.float64],
    pair_a: npt.NDArray[np.int64],
    pair_b: npt.NDArray[np.int64],
    *,
    chunk: int = 100_000,
) -> npt.NDArray[np.float64]:
    """Cosine of ``features_a[pair_a[i]]`` and ``features_b[pair_b[i]]`` (unit rows of
    template ids ``ids``), ``chunk`` pairs at a time: memory is O(chunk x d), not O(P x d)."""
    rows_a, rows_b = np.searchsorted(ids, pair_a), np.searchsorted(ids, pair_b)
    out = np.empty(len(pair_a), dtype=np.float64)
    for lo in range(0, len(pair_a), chunk):
        hi = lo + chunk
        out[lo:hi] = np.einsum("ij,ij->i", features_a[rows_a[lo:hi]], features_b[rows_b[lo:hi]])
    return out


def ijb_metrics(scores: npt.ArrayLike, same: npt.ArrayLike) -> dict[str, Any]:
    roc = roc_curve(scores, same)
    return {
        "tar_at_far": tar_at_far(roc, IJB_FARS),
        "auc": roc_auc(roc),
        "num_pairs": roc.num_positive + roc.num_negative,
        "num_positive": roc.num_positive,
    }


# --- embedding on the cluster (Ray Data) ------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A model an actor loads itself (read as data only): a ``student.pt`` or a teacher
    (``teacher`` says its format and input convention; unset: detected, ours)."""

    kind: str  # "student" | "teacher"
    uri: str
    teacher: TeacherConfig | None = None


class AlignAndEmbed:
    """A Ray Data actor: read each face crop, align it, embed it (image + mirror)."""

    def __init__(self, source: ModelSource, flip: str, root: str) -> None:
        # torch: heavy (two seconds to import); Ray Data tasks import this module without it
        import torch

        model = (
            load_student(source.uri)[0]
            if source.kind == "student"
            else load_teacher_backbone(source.teacher or source.uri)
        )
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.flip = Flip(flip)
        self.root = root

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:

        faces = np.stack(
            [
                align_face(decode_image(storage.read_bytes(uri), uri), marks.reshape(5, 2))
                for uri, marks in zip(batch["uri"], batch["landmarks"], strict=True)
            ]
        )
        features = embed_images(self.model, faces, batch_size=len(faces), flip=self.flip)
        return {"row": batch["row"], "feature": features.astype(np.float32)}


def embed_faces(
    meta: IjbMeta,
    source: ModelSource,
    *,
    flip: Flip,
    batch_size: int = 64,
    actors: int = 1,
) -> npt.NDArray[np.float32]:
    """(N, d) features of every face of ``meta``, in face order, from an actor pool of
    ``actors`` (a GPU each when the cluster has GPUs)."""
    # ray.data: heavy (about a second to import), imported where it is used
    import ray.data

    ensure_ray()
    use_gpu = float(ray.cluster_resources().get("GPU", 0)) >= 1
    items = [
        {"row": i, "uri": meta.image_uri(name), "landmarks": meta.landmarks[i].ravel()}
        for i, name in enumerate(meta.images)
    ]
    started = time.monotonic()
    ds = ray.data.from_items(items).map_batches(
        AlignAndEmbed,
        fn_constructor_args=(source, flip.value, meta.root),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else 0.5,
    )
    out: npt.NDArray[np.float32] | None = None
    done = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if out is None:
            out = np.zeros((len(items), batch["feature"].shape[1]), dtype=np.float32)
        out[batch["row"]] = batch["feature"]
        done += len(batch["row"])
    if out is None or done != len(items):
        raise RuntimeError(f"IJB embedding returned {done} of {len(items)} faces")
    print(
        f"[bench] {meta.set.value} {source.kind} {source.uri}: {done} faces embedded in "
        f"{time.monotonic() - started:.1f}s ({'GPU' if use_gpu else 'CPU'} actors x {actors})",
        flush=True,
    )
    return out


@dataclass(frozen=True)
class IjbOptions:
    flip: Flip = Flip.CONCAT
    detector_score: bool = True
    batch_size: int = 64
    actors: int = 1
    chunk_pairs: int = 100_000


def ijb_report(
    meta: IjbMeta,
    *,
    teacher: ModelSource | None,
    students: dict[str, ModelSource],
    options: IjbOptions,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Each model's TAR@FAR on ``meta``'s template pairs, and each student cross-model;
    with the ROC curves (label -> (fpr, tpr)) for the plot."""
    weights = meta.scores if options.detector_score else None

    def pooled(source: ModelSource) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        features = embed_faces(
            meta, source, flip=options.flip, batch_size=options.batch_size, actors=options.actors
        )
        return template_features(features, meta.templates, meta.media, scores=weights)

    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def score(label: str, a: Any, b: Any) -> dict[str, Any]:
        ids, fa = a
        _, fb = b
        s = template_pair_scores(ids, fa, fb, meta.pair_a, meta.pair_b, chunk=options.chunk_pairs)
        roc = roc_curve(s, meta.same)
        curves[f"{meta.set.value} {label}"] = (roc.fpr, roc.tpr)
        return ijb_metrics(s, meta.same)

    out: dict[str, Any] = {
        "kind": "ijb",
        "root": meta.root,
        "num_faces": len(meta.images),
        "num_templates": int(np.unique(meta.templates).size),
        "num_pairs": int(meta.same.size),
        "flip": options.flip.value,
        "detector_score": options.detector_score,
        "teacher": None,
        "students": {},
        "cross_model": {},
    }
    teacher_t = pooled(teacher) if teacher is not None else None
    if teacher_t is not None:
        out["teacher"] = score("teacher", teacher_t, teacher_t)
    for name, source in students.items():
        student_t = pooled(source)
        out["students"][name] = score(name, student_t, student_t)
        if teacher_t is not None and teacher_t[1].shape[1] == student_t[1].shape[1]:
            out["cross_model"][name] = score(f"{name} cross", teacher_t, student_t)
    return out, curves
