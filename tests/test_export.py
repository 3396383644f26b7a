"""jobs.export: TorchScript and ONNX (dynamic batch) against PyTorch through onnxruntime,
and the model card's provenance."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import export as export_job
from orchestrator.config import Arch, DataConfig, ExperimentConfig, to_dict
from orchestrator.data.prepare import SyntheticDatasets
from orchestrator.export import MAX_ABS_DIFF, to_onnx
from orchestrator.formats.loading import ClassifierRef
from orchestrator.formats.state import RunHistory, TrainingState
from orchestrator.formats.student import StudentExport, write_student_export
from orchestrator.models import build_backbone

onnxruntime = pytest.importorskip("onnxruntime")


def write_student(
    path: Path, data: SyntheticDatasets, *, running_var: tuple[float, float] = (0.5, 1.5)
) -> torch.nn.Module:
    torch.manual_seed(3)
    model = build_backbone(Arch.TINY_MOBILEFACENET, 16, input_size=112)
    # Non-trivial BatchNorm statistics, so an export that dropped them would show.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(*running_var)
    config = ExperimentConfig(data=DataConfig(train=data.train_uri, eval=data.eval_uri))
    state = TrainingState(
        epoch=1,
        student=model.state_dict(),
        loss={},
        optimizer={},
        classifier=ClassifierRef("s3://bucket/classifier", "sha256:abc"),
        config=to_dict(config),
        history=RunHistory(epochs_done=(0, 1)),
    )
    write_student_export(
        str(path),
        StudentExport.from_state(state, arch=Arch.TINY_MOBILEFACENET, emb_dim=16, image_size=112),
    )
    return model.eval()


def test_export_matches_pytorch_and_writes_a_card(
    tmp_path: Path, tiny_synthetic: SyntheticDatasets
) -> None:
    student = tmp_path / "student.pt"
    model = write_student(student, tiny_synthetic)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"students": {"kd": {"acc_10fold": 0.9, "auc": 0.95}}}))
    out = tmp_path / "export"
    code = export_job.main(["--student", str(student), "--out", str(out), "--report", str(report)])
    assert code == 0
    # Independently of the job's own check: run both files on a batch size not used there.
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        want = model(x).numpy()
        scripted = torch.jit.load(str(out / "student.torchscript.pt"))(x).numpy()
    session = onnxruntime.InferenceSession(
        str(out / "student.onnx"), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {"image": x.numpy()})[0]
    assert got.shape == (3, 16)
    assert np.abs(got - want).max() <= MAX_ABS_DIFF
    assert np.abs(scripted - want).max() <= MAX_ABS_DIFF
    card = json.loads((out / "model_card.json").read_text())
    assert (
        card["training_data"]["label_map_fingerprint"] == tiny_synthetic.train.label_map_fingerprint
    )
    assert card["teacher_classifier"]["checksum"] == "sha256:abc"
    assert card["metrics"] == {"acc_10fold": 0.9, "auc": 0.95}
    assert {c["batch"] for c in card["parity"]["checks"]} == {1, 5}
    assert "Model card" in (out / "model_card.md").read_text()


def test_a_broken_export_is_caught(tmp_path: Path, tiny_synthetic: SyntheticDatasets) -> None:
    from orchestrator.export import ExportError, check_parity, to_torchscript

    model = write_student(tmp_path / "student.pt", tiny_synthetic)
    other = build_backbone(Arch.TINY_MOBILEFACENET, 16, input_size=112).eval()  # other weights
    with pytest.raises(ExportError, match="differs from PyTorch"):
        check_parity(
            model, torchscript=to_torchscript(model, 112), onnx=to_onnx(other, 112), image_size=112
        )
    assert io.BytesIO(to_onnx(model, 112)).getbuffer().nbytes > 0


def test_a_student_whose_embeddings_are_not_finite_is_not_exported(
    tmp_path: Path, tiny_synthetic: SyntheticDatasets, capsys: pytest.CaptureFixture[str]
) -> None:
    """BatchNorm running variances of -1 (what an overflowed run can leave): NaN
    embeddings in eval mode. The export refuses it with one line and writes nothing."""
    from orchestrator import cli

    write_student(tmp_path / "student.pt", tiny_synthetic, running_var=(-1.0, -1.0))
    out = tmp_path / "export"
    code = cli.run(export_job.main, ["--student", str(tmp_path / "student.pt"), "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "embeddings are not finite for 16 of 16 probe images" in lines[0]
    assert not out.exists()
