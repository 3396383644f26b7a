"""Metrics against scikit-learn's ROC and against hand-built cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from orchestrator.metrics import (
    best_threshold,
    equal_error_rate,
    gallery_probe_split,
    identification_rank_k,
    kfold_accuracy,
    roc_auc,
    roc_curve,
    tar_at_far,
    verification_metrics,
)


def random_scores(ties: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    same = rng.random(4000) < 0.4
    scores = rng.normal(size=same.size) + 1.2 * same
    if ties:
        scores = np.round(scores, 1)  # ~60 distinct values for 4000 pairs
    return scores, same


@pytest.mark.parametrize("ties", [False, True])
def test_roc_matches_sklearn(ties: bool) -> None:
    scores, same = random_scores(ties)
    ours = roc_curve(scores, same)
    fpr, tpr, thresholds = sk_roc_curve(same, scores, drop_intermediate=False)
    np.testing.assert_allclose(ours.fpr, fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(ours.tpr, tpr, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(ours.thresholds[1:], thresholds[1:])
    assert roc_auc(ours) == pytest.approx(roc_auc_score(same, scores), abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
def test_tar_at_far_matches_sklearn_curve(ties: bool) -> None:
    scores, same = random_scores(ties)
    fpr, tpr, _ = sk_roc_curve(same, scores, drop_intermediate=False)
    got = tar_at_far(roc_curve(scores, same), (1e-1, 1e-2, 1e-3, 1e-4))
    for far in (1e-1, 1e-2, 1e-3):
        assert got[f"1e-{round(-np.log10(far))}"] == pytest.approx(tpr[fpr <= far].max())
    # ~2400 negatives cannot measure a FAR of 1e-4: reported as unavailable, not as 0.
    assert got["1e-4"] is None


def test_hand_built_roc_eer_and_tar() -> None:
    # Positives 0.9, 0.8, 0.4; negatives 0.7, 0.3, 0.2, 0.1.
    scores = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2, 0.1])
    same = np.array([1, 1, 1, 0, 0, 0, 0], dtype=bool)
    roc = roc_curve(scores, same)
    np.testing.assert_allclose(roc.tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1, 1])
    np.testing.assert_allclose(roc.fpr, [0, 0, 0, 1 / 4, 1 / 4, 2 / 4, 3 / 4, 1])
    # AUC = P(pos > neg) = (4 + 4 + 3) / 12.
    assert roc_auc(roc) == pytest.approx(11 / 12)
    # FAR - FRR along the curve: ..., (fpr 1/4, tpr 2/3) -> -1/12, (1/4, 1) -> +1/4.
    # It changes sign between two points with FAR 1/4, so the EER is 1/4.
    assert equal_error_rate(roc) == pytest.approx(0.25)
    tar = tar_at_far(roc, (0.25, 1e-1))
    assert tar["0.25"] == pytest.approx(1.0)
    assert tar["1e-1"] is None  # 4 negatives cannot measure a FAR below 1/4


def test_eer_symmetric_case() -> None:
    # Scores where exactly one positive and one negative are swapped out of 4 each: EER 1/4.
    scores = np.array([8, 7, 6, 4, 5, 3, 2, 1], dtype=float)
    same = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    assert equal_error_rate(roc_curve(scores, same)) == pytest.approx(0.25)


def test_best_threshold_hand_case() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.35])
    same = np.array([0, 0, 0, 1, 1, 1], dtype=bool)
    threshold, acc = best_threshold(scores, same)
    assert acc == 1.0
    assert threshold == pytest.approx((0.3 + 0.35) / 2)


def test_kfold_accuracy_known_answer() -> None:
    # 10 folds of 4 pairs. Folds 0..8 separate perfectly at 0.5; fold 9 holds one positive
    # scored 0.2 (below every sensible threshold): it gets 3/4, every other fold 4/4.
    scores, same, folds = [], [], []
    for fold in range(10):
        scores += [0.9, 0.8, 0.1, 0.2 if fold != 9 else 0.05]
        same += [True, True, False, False]
        folds += [fold] * 4
    scores[-4] = 0.2  # fold 9's first positive
    result = kfold_accuracy(scores, same, folds)
    assert result.per_fold == pytest.approx((1.0,) * 9 + (0.75,))
    assert result.mean == pytest.approx(0.975)
    assert result.std == pytest.approx(np.std([1.0] * 9 + [0.75]))


def test_kfold_threshold_is_chosen_without_the_test_fold() -> None:
    # Fold 1's scores alone would pick a threshold that makes it perfect; the protocol must
    # use fold 0's threshold instead, so fold 1 scores 0.5.
    scores = [0.9, 0.1, 0.9, 0.1, 0.45, 0.40, 0.45, 0.40]
    same = [True, False, True, False, True, False, True, False]
    folds = [0, 0, 0, 0, 1, 1, 1, 1]
    result = kfold_accuracy(scores, same, folds)
    assert result.per_fold[1] == pytest.approx(0.5)
    assert result.per_fold[0] == pytest.approx(1.0)


def test_verification_rejects_one_class_input() -> None:
    with pytest.raises(ValueError, match="both positive and negative"):
        verification_metrics([0.1, 0.2], [True, True], folds=[0, 1])


def test_identification_hand_case() -> None:
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    gallery_labels = np.array([10, 20, 30])
    probes = np.array([[0.9, 0.1], [0.2, 0.9], [0.9, 0.3]])  # last one is truly identity 30
    probe_labels = np.array([10, 20, 30])
    got = identification_rank_k(
        gallery, gallery_labels, probes=probes, probe_labels=probe_labels, ks=(1, 2, 3)
    )
    assert got == {"rank1": pytest.approx(2 / 3), "rank2": pytest.approx(2 / 3), "rank3": 1.0}


def test_identification_constant_embedding_scores_chance_not_perfect() -> None:
    gallery = np.ones((5, 4))
    probes = np.ones((5, 4))
    labels = np.arange(5)
    assert (
        identification_rank_k(gallery, labels, probes=probes, probe_labels=labels, ks=(1,))["rank1"]
        == 0.0
    )


def test_gallery_probe_split() -> None:
    gallery, probe = gallery_probe_split([3, 3, 1, 1, 1, 2])
    assert gallery.tolist() == [0, 2, 5]
    assert probe.tolist() == [1, 3, 4]
