"""Outside teachers on the real local Ray cluster: the Ray mean-embedding builder against the
single-process one, an ONNX teacher in training, and jobs.import_teacher."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from jobs import build_classifier, evaluate, import_teacher
from orchestrator import classifier as clf
from orchestrator import cli
from orchestrator.config import (
    Arch,
    Method,
    TeacherConfig,
    TeacherFormat,
    TeacherInputConfig,
    from_dict,
)
from orchestrator.data import format as fmt
from orchestrator.export import to_onnx
from orchestrator.formats.loading import ArtifactError
from orchestrator.runs import student_uri
from orchestrator.teacher.classifiers import classifier_from_mean_embeddings
from orchestrator.teacher.mean_embedding import MeanEmbeddingPlan, build_on_ray
from orchestrator.teacher.models import load_teacher_backbone
from orchestrator.train.launch import distill
from tests.conftest import TrainSetup, assert_baseline_trained
from tests.test_teacher_formats import IRESNET18, Normalizing, as_float32, insightface_iresnet

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def onnx_teacher(train_setup: TrainSetup, tmp_path_factory: pytest.TempPathFactory) -> str:
    """train_setup's teacher as an MXNet-style ONNX graph (0..255 in, normalising inside)."""
    model = load_teacher_backbone(train_setup.base.teacher.backbone)
    path = tmp_path_factory.mktemp("onnx") / "teacher.onnx"
    path.write_bytes(to_onnx(Normalizing(model), 112))
    return str(path)


def test_the_ray_mean_embedding_builder_equals_the_single_process_one(
    train_setup: TrainSetup, onnx_teacher: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    dataset = train_setup.base.data.train
    meta = fmt.read_meta(dataset)
    assert meta.num_classes == 6
    teacher = TeacherConfig(backbone=onnx_teacher, emb_dim=16)
    # Two embedding actors; identity ranges of 2 (chunks of 2 rows): three reducers.
    plan = MeanEmbeddingPlan(
        actors=2,
        actor_cpus=0.5,
        batch_size=4,
        identities_per_range=2,
        chunk_rows=2,
        dtype="float32",
    )
    built = build_on_ray(teacher, dataset, out=str(tmp_path / "ray"), plan=plan)
    assert "6 identities in 3 range(s) of 2; 2 CPU actor(s)" in capfd.readouterr().out
    assert [c.rows for c in built.chunks] == [2, 2, 2]
    reference = classifier_from_mean_embeddings(
        load_teacher_backbone(teacher),
        dataset,
        out=str(tmp_path / "one"),
        batch_size=5,
        dtype="float32",
    )
    got = clf.load_full(str(tmp_path / "ray"), clf.read_meta(str(tmp_path / "ray")))
    want = clf.load_full(str(tmp_path / "one"), reference)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert built.label_map_fingerprint == meta.label_map_fingerprint
    assert built.source["approximation"] is True and built.source["teacher"] == onnx_teacher
    # Rebuilt over itself with another range size: the new classifier replaces the old.
    again = build_on_ray(
        teacher, dataset, out=str(tmp_path / "ray"), plan=replace(plan, identities_per_range=4)
    )
    assert [c.rows for c in again.chunks] == [2, 2, 2]
    assert sorted(p.name for p in (tmp_path / "ray").iterdir() if p.suffix == ".bin") == sorted(
        c.file for c in again.chunks
    )
    np.testing.assert_allclose(clf.load_full(str(tmp_path / "ray"), again), want, atol=1e-5)


def test_an_onnx_teacher_trains_l2_and_its_centroids_train_proxyless(
    train_setup: TrainSetup, onnx_teacher: str, tmp_path: Path
) -> None:
    base = train_setup.base
    centroids = str(tmp_path / "centroids")
    code = build_classifier.main(
        [
            "mean-embedding",
            "--teacher",
            onnx_teacher,
            "--dataset",
            base.data.train,
            "--out",
            centroids,
            "--actor-cpus",
            "0.5",
            "--set",
            "teacher.format=onnx",
        ]
    )
    assert code == 0
    cmeta = clf.read_meta(centroids)
    assert (cmeta.num_classes, cmeta.emb_dim) == (6, 16)
    one_epoch = replace(base.optim, epochs=1)
    onnx = replace(base.teacher, backbone=onnx_teacher, format=TeacherFormat.ONNX)

    l2_config = replace(
        base,
        name="onnx-l2",
        teacher=onnx,
        loss=replace(base.loss, method=Method.L2),
        optim=one_epoch,
    )
    l2 = distill(l2_config)
    assert l2.state.history.epochs_done == (0,) and l2.state.history.world_sizes == (2,)
    assert_baseline_trained(l2_config, l2, train_setup.classifier_weight.shape)

    # Evaluation and cross-model evaluation with the ONNX teacher: the numbers of the
    # PyTorch checkpoint it was exported from.
    reports = {}
    for label, teacher_set in [
        ("onnx", [f"teacher.backbone={onnx_teacher}", "teacher.format=onnx"]),
        ("checkpoint", [f"teacher.backbone={base.teacher.backbone}"]),
    ]:
        out = tmp_path / f"report-{label}"
        sets = [
            f"data.eval={base.data.eval}",
            "teacher.emb_dim=16",
            "student.emb_dim=16",
            *teacher_set,
        ]
        args = [a for s in sets for a in ("--set", s)]
        student = f"l2={student_uri(base, 'onnx-l2')}"
        assert evaluate.main([*args, "--student", student, "--out", str(out)]) == 0
        reports[label] = json.loads((out / "report.json").read_text())
    onnx_report, reference = reports["onnx"], reports["checkpoint"]
    # The ONNX graph and the checkpoint agree to ~1e-6 per embedding; one swapped pair of
    # scores would move an AUC over these 40 pairs by 1/400, so 1e-3 means "equal".
    assert onnx_report["teacher"]["auc"] == pytest.approx(reference["teacher"]["auc"], abs=1e-3)
    cross = onnx_report["students"]["l2"]["cross_model"]["auc"]
    assert cross == pytest.approx(reference["students"]["l2"]["cross_model"]["auc"], abs=1e-3)

    proxyless = distill(
        replace(
            base, name="centroids", teacher=replace(onnx, classifier=centroids), optim=one_epoch
        )
    )
    assert proxyless.state.classifier is not None
    assert proxyless.state.classifier.checksum == clf.checksum(cmeta)  # trained against it


def test_a_teacher_that_does_not_fit_fails_before_any_worker_starts(
    train_setup: TrainSetup, onnx_teacher: str
) -> None:
    base = train_setup.base
    wrong_size = replace(
        base.teacher, backbone=onnx_teacher, input=TeacherInputConfig(size=(96, 96))
    )
    config = replace(
        base, name="bad-teacher", teacher=wrong_size, loss=replace(base.loss, method=Method.L2)
    )
    with pytest.raises(
        ArtifactError, match=r"takes 112x112 inputs, teacher.input.size is \[96, 96\]"
    ):
        distill(config)
    wrong_width = replace(base.teacher, backbone=onnx_teacher)
    config = replace(
        base,
        name="bad-width",
        teacher=replace(wrong_width, emb_dim=32),
        student=replace(base.student, emb_dim=32),
        loss=replace(base.loss, method=Method.L2),
    )
    with pytest.raises(
        ArtifactError, match=r"gives 16-d embeddings on 112x112 inputs, teacher\.emb_dim is 32"
    ):
        distill(config)
    for name in ("bad-teacher", "bad-width"):
        assert not (Path(base.storage_path) / name).exists(), "no run was started"


def test_import_teacher_writes_a_directory_the_configs_point_to(
    train_setup: TrainSetup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An insightface iresnet18 backbone and its Partial FC shards from a 2-GPU run."""
    weights = insightface_iresnet(IRESNET18, 16, seed=3)
    backbone = tmp_path / "model.pt"
    torch.save(as_float32(weights.state), backbone)
    run = tmp_path / "arcface_run"
    run.mkdir()
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 16)).astype(np.float32)
    torch.save({"weight": torch.from_numpy(w[:3].copy())}, run / "softmax_fc_gpu_0.pt")
    torch.save({"weight": torch.from_numpy(w[3:].copy())}, run / "softmax_fc_gpu_1.pt")
    out = tmp_path / "teachers" / "r18"
    code = import_teacher.main(
        [
            "--backbone", str(backbone), "--arch", "iresnet18", "--emb-dim", "16",
            "--partial-fc", str(run), "--dataset", train_setup.base.data.train,
            "--dtype", "float32", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    assert "teacher iresnet18 (insightface, 16-d)" in capsys.readouterr().out
    card = json.loads((out / "model_card.json").read_text())
    sources = {Path(s["path"]).name: s["sha256"] for s in card["sources"]}
    for name, path in [
        ("model.pt", backbone),
        ("softmax_fc_gpu_0.pt", run / "softmax_fc_gpu_0.pt"),
        ("softmax_fc_gpu_1.pt", run / "softmax_fc_gpu_1.pt"),
    ]:
        assert sources[name] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (card["format"], card["arch"], card["emb_dim"]) == ("insightface", "iresnet18", 16)
    assert card["input"]["teacher_side"]["size"] == [112, 112]
    assert (out / "backbone.pt").read_bytes() == backbone.read_bytes()
    # teacher.yaml is a config section: loaded, it gives the same embeddings as the file.
    section = yaml.safe_load((out / "teacher.yaml").read_text())["teacher"]
    teacher = from_dict(TeacherConfig, section, "teacher.yaml")
    assert teacher.format is TeacherFormat.INSIGHTFACE and teacher.arch is Arch.IRESNET18
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    direct = TeacherConfig(arch=Arch.IRESNET18, emb_dim=16, backbone=str(backbone))
    torch.testing.assert_close(load_teacher_backbone(teacher)(x), load_teacher_backbone(direct)(x))
    # The shards, concatenated in rank order, are the classifier (rows normalised).
    got = clf.load_full(teacher.classifier, clf.read_meta(teacher.classifier))
    np.testing.assert_allclose(got, w / np.linalg.norm(w, axis=1, keepdims=True), atol=1e-6)

    # A re-import with a Partial FC of another width (8-d over the 16-d backbone) is
    # refused before anything is written: the imported directory stays byte-identical.
    before = {str(p): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    narrow = tmp_path / "narrow_run"
    narrow.mkdir()
    for rank in (0, 1):
        torch.save({"weight": torch.randn(3, 8)}, narrow / f"softmax_fc_gpu_{rank}.pt")
    argv = [
        "--backbone", str(backbone), "--arch", "iresnet18", "--emb-dim", "16",
        "--partial-fc", str(narrow), "--dataset", train_setup.base.data.train,
        "--dtype", "float32", "--out", str(out),
    ]  # fmt: skip
    capsys.readouterr()
    assert cli.run(import_teacher.main, argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "W has 8-d rows, the backbone gives 16-d embeddings" in error[0]
    assert {str(p): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before

    # A file that does not fit leaves no directory behind.
    with pytest.raises(ArtifactError, match=r"1 missing: fc\.bias"):
        broken = as_float32(weights.state)
        broken.pop("fc.bias")
        torch.save(broken, tmp_path / "broken.pt")
        import_teacher.main(
            [
                "--backbone",
                str(tmp_path / "broken.pt"),
                "--arch",
                "iresnet18",
                "--emb-dim",
                "16",
                "--out",
                str(tmp_path / "no"),
            ]
        )
    assert not (tmp_path / "no").exists()
