"""`python -m jobs.evaluate` on exported students: the report files and their contents."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.config import Arch
from orchestrator.evaluation import embed_images, embedding_metrics, load_eval_set
from orchestrator.formats.state import RunHistory, TrainingState
from orchestrator.formats.student import StudentExport, write_student_export
from orchestrator.models import build_backbone
from orchestrator.teacher.classifiers import load_teacher_backbone
from tests.conftest import REPO, TrainSetup

pytestmark = pytest.mark.e2e


def export(path: Path, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_backbone(Arch.TINY_MOBILEFACENET, 16)
    state = TrainingState(
        epoch=1,
        student=model.state_dict(),
        loss={},
        optimizer={},
        classifier=None,
        config={},
        history=RunHistory(epochs_done=(0, 1), train_seconds=12.5),
    )
    write_student_export(
        str(path),
        StudentExport.from_state(state, arch=Arch.TINY_MOBILEFACENET, emb_dim=16, image_size=112),
    )
    return model.eval()


def test_evaluate_job_writes_report_table_and_roc(train_setup: TrainSetup, tmp_path: Path) -> None:
    a = export(tmp_path / "a.pt", 1)
    export(tmp_path / "b.pt", 2)
    cfg = train_setup.base
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", "--config", "configs/demo.yaml",
         "--set", f"data.eval={cfg.data.eval}", "--set", f"teacher.backbone={cfg.teacher.backbone}",
         "--set", "teacher.emb_dim=16", "--set", "student.emb_dim=16",
         "--student", f"alpha={tmp_path / 'a.pt'}", "--student", f"beta={tmp_path / 'b.pt'}", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"dataset", "teacher", "students"}
    assert report["dataset"]["num_identities"] == 20 and report["dataset"]["num_pairs"] == 40
    assert set(report["students"]) == {"alpha", "beta"}
    alpha = report["students"]["alpha"]
    for key in ("acc_10fold", "tar_at_far", "auc", "cross_model", "params", "train_seconds"):
        assert key in alpha
    assert set(alpha["cross_model"]) >= {"acc_10fold", "tar_at_far"}
    assert alpha["train_seconds"] == 12.5 and alpha["epochs"] == 2
    assert set(report["teacher"]) >= {"acc_10fold", "tar_at_far", "auc"}
    # The numbers are the library's on the same embeddings (independently recomputed here).
    eval_set = load_eval_set(cfg.data.eval)
    own = embedding_metrics(eval_set, embed_images(a, eval_set.images))
    assert alpha["acc_10fold"] == pytest.approx(own["acc_10fold"])
    teacher_emb = embed_images(load_teacher_backbone(cfg.teacher.backbone), eval_set.images)
    cross = embedding_metrics(eval_set, embed_images(a, eval_set.images), gallery=teacher_emb)
    assert alpha["cross_model"]["auc"] == pytest.approx(cross["auc"])
    assert alpha["params"] == sum(p.numel() for p in a.parameters())
    table = (out / "report.md").read_text()
    assert "| alpha |" in table and "| teacher |" in table and "alpha |" in result.stdout
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.isfinite(report["teacher"]["auc"])


def test_evaluate_job_missing_student(train_setup: TrainSetup, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", "--config", "configs/demo.yaml", "--student", f"x={tmp_path / 'nope.pt'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "nope.pt does not exist" in result.stderr
