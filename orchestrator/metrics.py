"""Face verification and identification metrics (numpy, single process).

Scores are similarities: higher means "same identity". A pair is accepted when its score is
at or above the threshold (verification) -- the convention of scikit-learn's ``roc_curve``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

DEFAULT_FARS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4)


@dataclass(frozen=True)
class RocCurve:
    """fpr[i], tpr[i]: rates when accepting scores >= thresholds[i]; starts at (0, 0)."""

    fpr: FloatArray
    tpr: FloatArray
    thresholds: FloatArray
    num_positive: int
    num_negative: int


@dataclass(frozen=True)
class KFoldAccuracy:
    mean: float
    std: float
    per_fold: tuple[float, ...]
    thresholds: tuple[float, ...]  # chosen on the other folds, applied to this one


@dataclass(frozen=True)
class VerificationMetrics:
    acc_10fold: float
    acc_10fold_std: float
    tar_at_far: dict[str, float | None]  # None: too few negative pairs for that FAR
    auc: float
    eer: float
    num_pairs: int


def _check_pairs(scores: npt.ArrayLike, same: npt.ArrayLike) -> tuple[FloatArray, BoolArray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(same).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores has {s.size} entries but same has {y.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError(
            f"need both positive and negative pairs, found {int(y.sum())} positive and "
            f"{int((~y).sum())} negative"
        )
    return s, y


def roc_curve(scores: npt.ArrayLike, same: npt.ArrayLike) -> RocCurve:
    """ROC with one point per distinct score (tied scores move together)."""
    s, y = _check_pairs(scores, same)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    # The last index of each run of equal scores: accepting >= that score takes the whole run.
    run_ends = np.flatnonzero(np.diff(s) != 0)
    run_ends = np.append(run_ends, s.size - 1)
    true_pos = np.cumsum(y)[run_ends]
    false_pos = (run_ends + 1) - true_pos
    num_pos, num_neg = int(y.sum()), int((~y).sum())
    return RocCurve(
        fpr=np.concatenate([[0.0], false_pos / num_neg]),
        tpr=np.concatenate([[0.0], true_pos / num_pos]),
        thresholds=np.concatenate([[np.inf], s[run_ends]]),
        num_positive=num_pos,
        num_negative=num_neg,
    )


def roc_auc(roc: RocCurve) -> float:
    """Area under the ROC by the trapezoid rule."""
    return float(np.trapezoid(roc.tpr, roc.fpr))


def equal_error_rate(roc: RocCurve) -> float:
    """The rate where FAR equals FRR (1 - TAR), linearly interpolated between ROC points."""
    frr = 1.0 - roc.tpr
    diff = roc.fpr - frr  # rises from -1 to +1 along the curve
    i = int(np.flatnonzero(diff >= 0)[0])
    if i == 0 or diff[i] == 0:
        return float(roc.fpr[i])
    # Interpolate between point i-1 (diff < 0) and i (diff > 0).
    w = -diff[i - 1] / (diff[i] - diff[i - 1])
    return float(roc.fpr[i - 1] + w * (roc.fpr[i] - roc.fpr[i - 1]))


def far_key(far: float) -> str:
    """1e-3 -> '1e-3' (the key used in reports); other values as written, 0.25 -> '0.25'."""
    exponent = -math.log10(far)
    if far < 1 and abs(exponent - round(exponent)) < 1e-9:
        return f"1e-{round(exponent)}"
    return repr(far)


def tar_at_far(roc: RocCurve, fars: tuple[float, ...] = DEFAULT_FARS) -> dict[str, float | None]:
    """Best TAR with FAR <= far; None where num_negative * far < 1 cannot measure that FAR."""
    out: dict[str, float | None] = {}
    for far in fars:
        if roc.num_negative * far < 1:
            out[far_key(far)] = None
        else:
            out[far_key(far)] = float(roc.tpr[roc.fpr <= far + 1e-12].max())
    return out


def best_threshold(scores: FloatArray, same: BoolArray) -> tuple[float, float]:
    """The threshold maximising accuracy of ``score >= t`` on these pairs, and that accuracy.

    Candidates are midpoints between consecutive distinct scores plus one below all and one
    above all; the smallest best candidate wins ties, so the choice is deterministic.
    """
    distinct = np.unique(scores)
    candidates = np.concatenate(
        [[distinct[0] - 1.0], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1] + 1.0]]
    )
    order = np.argsort(scores, kind="mergesort")
    s, y = scores[order], same[order]
    # For each candidate t: #pairs below t (rejected), of which positives are errors.
    below = np.searchsorted(s, candidates, side="left")
    pos_below = np.concatenate([[0], np.cumsum(y)])[below]
    neg_below = below - pos_below
    pos_total = int(y.sum())
    correct = (pos_total - pos_below) + neg_below
    best = int(np.argmax(correct))
    return float(candidates[best]), float(correct[best] / s.size)


def kfold_accuracy(
    scores: npt.ArrayLike, same: npt.ArrayLike, folds: npt.ArrayLike
) -> KFoldAccuracy:
    """LFW protocol: for each fold, pick the threshold on the other folds, test on this one."""
    s, y = _check_pairs(scores, same)
    f = np.asarray(folds).ravel()
    if f.shape != s.shape:
        raise ValueError(f"folds has {f.size} entries but scores has {s.size}")
    accuracies, thresholds = [], []
    for fold in np.unique(f):
        test = f == fold
        threshold, _ = best_threshold(s[~test], y[~test])
        accuracies.append(float(np.mean((s[test] >= threshold) == y[test])))
        thresholds.append(threshold)
    if len(accuracies) < 2:
        raise ValueError(f"k-fold accuracy needs at least 2 folds, found {len(accuracies)}")
    return KFoldAccuracy(
        mean=float(np.mean(accuracies)),
        std=float(np.std(accuracies)),
        per_fold=tuple(accuracies),
        thresholds=tuple(thresholds),
    )


def verification_metrics(
    scores: npt.ArrayLike,
    same: npt.ArrayLike,
    *,
    folds: npt.ArrayLike,
    fars: tuple[float, ...] = DEFAULT_FARS,
) -> VerificationMetrics:
    roc = roc_curve(scores, same)
    kfold = kfold_accuracy(scores, same, folds)
    return VerificationMetrics(
        acc_10fold=kfold.mean,
        acc_10fold_std=kfold.std,
        tar_at_far=tar_at_far(roc, fars),
        auc=roc_auc(roc),
        eer=equal_error_rate(roc),
        num_pairs=roc.num_positive + roc.num_negative,
    )


def pair_scores(emb_a: npt.ArrayLike, emb_b: npt.ArrayLike) -> FloatArray:
    """Cosine similarity of row i of emb_a with row i of emb_b."""
    a = _normalise(np.asarray(emb_a, dtype=np.float64))
    b = _normalise(np.asarray(emb_b, dtype=np.float64))
    return np.sum(a * b, axis=1)


def _normalise(x: FloatArray) -> FloatArray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def gallery_probe_split(labels: npt.ArrayLike) -> tuple[IntArray, IntArray]:
    """Indices of the gallery (first image of each identity) and of the probes (the rest)."""
    y = np.asarray(labels).ravel()
    _, first = np.unique(y, return_index=True)
    gallery = np.sort(first).astype(np.int64)
    probe = np.setdiff1d(np.arange(y.size), gallery).astype(np.int64)
    return gallery, probe


def identification_rank_k(
    gallery: npt.ArrayLike,
    gallery_labels: npt.ArrayLike,
    *,
    probes: npt.ArrayLike,
    probe_labels: npt.ArrayLike,
    ks: tuple[int, ...] = (1, 5),
) -> dict[str, float]:
    """Closed-set identification: fraction of probes whose identity is among the k gallery
    entries most similar to them. Gallery and probes may come from different models
    (cross-model: a teacher-embedded gallery searched with student-embedded probes).

    Ties in similarity count against the probe (rank = 1 + number of entries scoring >=
    the true one, other than itself), so a constant embedding never scores well.
    """
    g = _normalise(np.asarray(gallery, dtype=np.float64))
    p = _normalise(np.asarray(probes, dtype=np.float64))
    g_labels = np.asarray(gallery_labels).ravel()
    p_labels = np.asarray(probe_labels).ravel()
    if np.unique(g_labels).size != g_labels.size:
        raise ValueError("gallery must hold one entry per identity")
    where = {int(label): i for i, label in enumerate(g_labels)}
    missing = [int(label) for label in p_labels if int(label) not in where]
    if missing:
        raise ValueError(f"probe identities {missing[:5]} have no gallery entry")
    sims = p @ g.T  # (P, G)
    true_col = np.array([where[int(label)] for label in p_labels])
    true_sim = sims[np.arange(p_labels.size), true_col]
    rank = (sims >= true_sim[:, None]).sum(axis=1)  # 1 = best
    return {f"rank{k}": float(np.mean(rank <= k)) for k in ks}
