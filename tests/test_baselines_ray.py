"""The multistep baseline through Ray Train: a teacher that keeps an intermediate snapshot,
and a student that distils from it, then from the final teacher. (cckd trains through Ray
in tests/test_compare.py's grid.)"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from orchestrator.config import Method, MultistepConfig, MultistepStage, OptimConfig
from orchestrator.teacher.checkpoint import load_teacher
from orchestrator.teacher.classifiers import snapshot_uri
from orchestrator.train.launch import distill
from orchestrator.train.teacher_job import train_teacher
from tests.conftest import TrainSetup

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


def test_multistep_distils_from_the_teachers_snapshot_then_the_final_teacher(
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
    train_teacher(config, "ms-teacher")
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
