from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.config import Arch
from orchestrator.data.images import to_model_input
from orchestrator.data.prepare import SyntheticDatasets
from orchestrator.evaluation import (
    NonFiniteEmbeddingsError,
    embed_images,
    embedding_metrics,
    evaluate_model,
    load_eval_set,
)
from orchestrator.metric_names import Metric
from orchestrator.metrics import pair_scores, verification_metrics
from orchestrator.models import build_backbone


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(Arch.TINY_IRESNET, 16)


def test_eval_set_pairs_index_the_right_images(tiny_synthetic: SyntheticDatasets) -> None:
    eval_set = load_eval_set(tiny_synthetic.eval_uri)
    assert eval_set.images.shape == (60, 112, 112, 3)
    same_label = eval_set.labels[eval_set.index_a] == eval_set.labels[eval_set.index_b]
    assert np.array_equal(same_label, eval_set.same)


def test_flip_test_sums_both_views(
    model: torch.nn.Module, tiny_synthetic: SyntheticDatasets
) -> None:
    images = load_eval_set(tiny_synthetic.eval_uri).images[:5]
    model.eval()
    with torch.no_grad():
        x = to_model_input(images)
        expected = (model(x) + model(torch.flip(x, dims=[3]))).numpy()
    np.testing.assert_allclose(
        embed_images(model, images, batch_size=2, flip=True), expected, rtol=1e-5, atol=1e-5
    )


def test_metrics_and_cross_model(model: torch.nn.Module, tiny_synthetic: SyntheticDatasets) -> None:
    eval_set = load_eval_set(tiny_synthetic.eval_uri)
    emb = embed_images(model, eval_set.images)
    report = evaluate_model(model, eval_set, teacher_embeddings=emb)
    scores = pair_scores(emb[eval_set.index_a], emb[eval_set.index_b])
    direct = verification_metrics(scores, eval_set.same, folds=eval_set.fold)
    assert report["acc_10fold"] == pytest.approx(direct.acc_10fold)
    assert report["auc"] == pytest.approx(direct.auc)
    assert set(report["tar_at_far"]) == {"1e-1", "1e-2", "1e-3", "1e-4"}
    # 20 negative pairs can support FAR 1e-1 but not 1e-2.
    assert report["tar_at_far"]["1e-1"] is not None and report["tar_at_far"]["1e-2"] is None
    # A "teacher" identical to the student: cross-model equals the student's own numbers.
    assert report["cross_model"]["acc_10fold"] == pytest.approx(report["acc_10fold"])
    assert report["cross_model"]["rank1"] == pytest.approx(report["rank1"])
    # An unrelated teacher space: cross-model collapses towards chance.
    rng = np.random.default_rng(0)
    unrelated = embedding_metrics(eval_set, emb, gallery=rng.normal(size=emb.shape))
    assert unrelated["auc"] < report["auc"]


class RowBlowsUp(torch.nn.Module):
    """A 4-d embedding of each image, with row ``row`` of every batch made infinite: an
    undertrained student's eval-mode overflow, on demand."""

    def __init__(self, row: int) -> None:
        super().__init__()
        self.row = row
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.flatten(1)[:, :4] * self.scale
        if self.row < len(out):
            out[self.row] = float("inf")
        return out


def test_non_finite_embeddings_are_refused_naming_the_rows(
    tiny_synthetic: SyntheticDatasets,
) -> None:
    images = load_eval_set(tiny_synthetic.eval_uri).images[:6]
    with pytest.raises(
        NonFiniteEmbeddingsError, match=r"val lfw: .* for 2 of 6 images \(rows \[1, 4\]\)"
    ):
        embed_images(RowBlowsUp(row=1), images, batch_size=3, label="val lfw")
    assert embed_images(RowBlowsUp(row=99), images, batch_size=3).shape == (6, 4)


def test_validation_without_finite_embeddings_is_recorded_as_failed_and_keeps_going(
    tiny_synthetic: SyntheticDatasets, model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    """The worker's validation: a student whose embeddings overflow is recorded as failed
    (val_nonfinite, every metric at -1) with a warning, and the epoch's checkpoint is saved
    after it; a sound one gets its metrics."""
    from orchestrator.config import DataConfig, ExperimentConfig
    from orchestrator.train.validation import Validator

    config = ExperimentConfig(data=DataConfig(train="unused", eval=tiny_synthetic.eval_uri))
    validator = Validator(tiny_synthetic.eval_uri, config, tag="[run]")

    failed = validator.metrics(RowBlowsUp(row=0))
    assert failed["val_nonfinite"] == 1.0
    assert {k: v for k, v in failed.items() if k != "val_nonfinite"} == {
        m.validation_key: -1.0 for m in Metric
    }, "every metric below any measurable value: ranked last"
    assert "[run] WARNING: validation failed this epoch" in capsys.readouterr().out
    sound = validator.metrics(model)
    assert 0.0 <= sound["val_acc_10fold"] <= 1.0 and "val_rank1" in sound
    assert sound["val_nonfinite"] == 0.0
