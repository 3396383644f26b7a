"""The teacher job and the multistep baseline through Ray Train: a teacher that exports its
backbone and classifier and keeps an intermediate snapshot, and a student that distils from
the snapshot, then from the final teacher. (cckd trains through Ray in tests/test_compare.py's
grid.)"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator import classifier as clf
from orchestrator.config import Method, MultistepConfig, MultistepStage, OptimConfig
from orchestrator.data import format as fmt
from orchestrator.teacher.checkpoint import load_teacher
from orchestrator.teacher.classifiers import snapshot_uri
from orchestrator.train.launch import distill
from orchestrator.train.teacher_job import train_teacher
from tests.conftest import TrainSetup

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


def test_a_teacher_exports_its_classifier_and_multistep_distils_from_its_snapshot_then_it(
    train_setup: TrainSetup, tmp_path: Path
) -> None:
    base = train_setup.base
    teacher_cfg = replace(
        base.teacher,
        backbone=str(tmp_path / "teacher.pt"),
        classifier=str(tmp_path / "classifier"),
        snapshot_epochs=(1,),
    )
    config = replace(
        base,
        name="ms",
        storage_path=str(tmp_path / "runs"),
        teacher=teacher_cfg,
        teacher_optim=OptimConfig(lr=0.05, epochs=2, batch_size=8),
    )
    outcome = train_teacher(config, "ms-teacher")
    # The exported classifier is the trained head, L2-normalised row by row (stored as fp16).
    meta = fmt.read_meta(config.data.train)
    cmeta = clf.read_meta(teacher_cfg.classifier)
    clf.validate(
        cmeta,
        "exported",
        num_classes=meta.num_classes,
        emb_dim=16,
        label_map_fingerprint=meta.label_map_fingerprint,
    )
    head = outcome.state.loss["classifier.weight"].numpy()
    expected = head / np.linalg.norm(head, axis=1, keepdims=True)
    np.testing.assert_allclose(clf.load_full(teacher_cfg.classifier, cmeta), expected, atol=2e-3)
    snapshot = snapshot_uri(teacher_cfg.backbone, 1)
    kept, final = load_teacher(snapshot), load_teacher(teacher_cfg.backbone)
    # The snapshot is the teacher after its first epoch: a real checkpoint, not the final.
    assert kept.arch == final.arch and kept.label_map_fingerprint == final.label_map_fingerprint
    differs = [
        not torch.equal(kept.backbone[k], final.backbone[k])
        for k in final.backbone
        if final.backbone[k].is_floating_point()
    ]
    assert any(differs)

    student = replace(
        config,
        loss=replace(
            config.loss,
            method=Method.MULTISTEP,
            multistep=MultistepConfig(
                schedule=(MultistepStage(0, "epoch:1"), MultistepStage(1, "final"))
            ),
        ),
        optim=replace(config.optim, epochs=2),
    )
    outcome = distill(student, "ms-student")
    assert outcome.state.history.epochs_done == (0, 1)
    assert list(outcome.state.history.teachers) == [snapshot, teacher_cfg.backbone]
    assert "scratch.classifier.weight" in outcome.state.loss  # its own margin classifier
