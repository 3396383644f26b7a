"""The standard benchmarks: insightface ``.bin`` sets read safely and scored by the 10-fold
protocol, IJB alignment, template pooling and TAR@FAR, each against an independent
computation written here; then ``jobs.evaluate --benchmark --ijb`` through the CLI."""

from __future__ import annotations

import itertools
import json
import math
import os
import pickle
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import simplejpeg
import torch
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from jobs import evaluate as evaluate_job
from orchestrator import cli
from orchestrator.benchmarks.ijb import (
    ARCFACE_TEMPLATE,
    align_face,
    ijb_metrics,
    similarity_transform,
    template_features,
    template_pair_scores,
    warp_affine,
)
from orchestrator.benchmarks.suite import bin_from_eval_set, load_bin_benchmark
from orchestrator.benchmarks.verification_bin import (
    BenchmarkError,
    file_order_folds,
    read_bin,
    write_bin,
)
from orchestrator.config import Arch
from orchestrator.data.images import encode_jpeg
from orchestrator.data.prepare import SyntheticDatasets
from orchestrator.data.synthetic import render_image
from orchestrator.evaluation import (
    Flip,
    embed_images,
    load_eval_set,
    pair_decisions,
    pair_verification,
)
from orchestrator.formats.student import StudentExport, write_student_export
from orchestrator.models import build_backbone
from tests.conftest import TrainSetup

# --- .bin: reading without running anything --------------------------------------------------


def small_jpegs(count: int) -> list[bytes]:
    return [encode_jpeg(render_image(3, i % 5, image=i, size=112)) for i in range(count)]


def test_bin_layouts_insightface_writes_all_read_the_same(tmp_path: Path) -> None:
    """Protocol 4 with bytes (ours), protocol 2 (bytes as ``_codecs.encode``), images as
    1-D uint8 arrays and issame as a bool array: one content."""
    images, same = small_jpegs(20), [i % 2 == 0 for i in range(10)]
    write_bin(str(tmp_path / "ours.bin"), images, same)
    variants = {
        "protocol2.bin": pickle.dumps((images, same), protocol=2),
        "arrays.bin": pickle.dumps(
            ([np.frombuffer(b, dtype=np.uint8) for b in images], np.array(same)), protocol=2
        ),
    }
    for name, data in variants.items():
        (tmp_path / name).write_bytes(data)
    for name in ("ours.bin", *variants):
        vb = read_bin(str(tmp_path / name))
        assert vb.images == tuple(images) and vb.issame.tolist() == same, name
        assert vb.name == name.removesuffix(".bin")


class RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


class Evaluates:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (eval, ("1 + 1",))


def test_a_bin_whose_pickle_calls_a_function_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payloads = {
        "system.bin": ([RunsCommand(f"touch {marker}")], [True]),
        "eval.bin": ([b"x", Evaluates()], [True]),
        "objects.bin": ([b"x", b"y"], np.array([RunsCommand(f"touch {marker}")], dtype=object)),
    }
    for name, payload in payloads.items():
        path = tmp_path / name
        path.write_bytes(pickle.dumps(payload, protocol=2))
        with pytest.raises(BenchmarkError, match=rf"{name}: refusing to load it") as caught:
            read_bin(str(path))
        assert "asks for" in str(caught.value), caught.value
    assert not marker.exists(), "a .bin ran code"
    (tmp_path / "short.bin").write_bytes(pickle.dumps(([b"x"] * 3, [True, False])))
    with pytest.raises(
        BenchmarkError, match=r"expected 2 images per pair \(4 for 2 pairs\), found 3"
    ):
        read_bin(str(tmp_path / "short.bin"))


# --- .bin: the 10-fold protocol against a computation written out here ------------------------


def independent_10fold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """Contiguous folds in file order (sizes as scikit-learn's KFold), for each the
    threshold with the best accuracy on the other nine among: below all, each midpoint
    of consecutive distinct scores, above all (the first best); its test accuracy."""
    n = len(scores)
    sizes = [n // 10 + (1 if k < n % 10 else 0) for k in range(10)]
    starts = np.cumsum([0, *sizes])
    accuracies = []
    for k in range(10):
        test = np.zeros(n, dtype=bool)
        test[starts[k] : starts[k + 1]] = True
        train_s, train_y = scores[~test], same[~test]
        distinct = sorted(set(train_s.tolist()))
        candidates = [distinct[0] - 1.0]
        candidates += [(a + b) / 2 for a, b in itertools.pairwise(distinct)]
        candidates.append(distinct[-1] + 1.0)
        best, best_correct = candidates[0], -1
        for t in candidates:
            correct = sum(int((s >= t) == y) for s, y in zip(train_s, train_y, strict=True))
            if correct > best_correct:
                best, best_correct = t, correct
        accuracies.append(float(np.mean((scores[test] >= best) == same[test])))
    return float(np.mean(accuracies)), float(np.std(accuracies))


def forward_with_mirror(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        return (model(x) + model(torch.flip(x, dims=[3]))).double().numpy()


def test_bin_accuracy_equals_an_independent_computation_and_parquet_decisions(
    tiny_synthetic: SyntheticDatasets, tmp_path: Path
) -> None:
    vb = bin_from_eval_set(tiny_synthetic.eval_uri)
    uri = str(tmp_path / "synthetic_eval.bin")
    write_bin(uri, list(vb.images), vb.issame)
    torch.manual_seed(3)
    model = build_backbone(Arch.TINY_MOBILEFACENET, 16).eval()
    bench = load_bin_benchmark(uri)
    emb = embed_images(model, bench.images, flip=Flip.SUM)
    reported = pair_verification(bench.pairs, emb)
    # Independently: decode the file's JPEGs, embed image + mirror, cosine of each pair.
    raw = np.stack([simplejpeg.decode_jpeg(b, colorspace="RGB") for b in read_bin(uri).images])
    feats = forward_with_mirror(model, raw)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    scores = np.sum(feats[0::2] * feats[1::2], axis=1)
    mean, std = independent_10fold(scores, vb.issame)
    assert reported["acc_10fold"] == pytest.approx(mean, abs=1e-12)
    assert reported["acc_10fold_std"] == pytest.approx(std, abs=1e-12)
    assert reported["num_pairs"] == vb.num_pairs == 40
    # The same pairs through our Parquet evaluation: the same decision for every pair.
    eval_set = load_eval_set(tiny_synthetic.eval_uri)
    parquet = pair_decisions(eval_set.pairs, embed_images(model, eval_set.images, flip=Flip.SUM))
    order = np.argsort(eval_set.fold, kind="stable")  # the .bin's pair order
    np.testing.assert_array_equal(pair_decisions(bench.pairs, emb), parquet[order])
    np.testing.assert_array_equal(bench.pairs.fold, eval_set.fold[order])


def test_file_order_folds_match_kfold_sizes() -> None:
    folds = file_order_folds(23)
    assert np.bincount(folds).tolist() == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.all(np.diff(folds) >= 0)


# --- IJB: alignment, pooling, ROC ----------------------------------------------------------


def similarity(scale: float, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    a = math.radians(degrees)
    rotation = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return np.hstack([rotation, np.array(shift)[:, None]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_alignment_recovers_a_face_warped_with_known_landmarks() -> None:
    """An aligned face warped by a known similarity into a larger crop, its five points
    moved with it: alignment finds the inverse transform and gives the face back."""
    face = render_image(1, 2, image=0, size=112)
    warp = similarity(1.3, 17.0, (30.0, 12.0))
    crop = warp_affine(face, warp, (180, 170))
    landmarks = apply(warp, ARCFACE_TEMPLATE)
    found = similarity_transform(landmarks, ARCFACE_TEMPLATE)
    inverse = np.linalg.inv(np.vstack([warp, [0, 0, 1]]))[:2]
    np.testing.assert_allclose(found, inverse, atol=1e-9)
    recovered = align_face(crop, landmarks).astype(np.float64)
    inner = (slice(16, 96), slice(16, 96))  # away from the borders the warp cut
    error = np.abs(recovered[inner] - face[inner].astype(np.float64)).mean()
    assert error < 6.0, error  # two bilinear resamplings of a sharp synthetic face
    # And not by accident: an unaligned crop is far from the face.
    assert np.abs(crop[:112, :112][inner] - face[inner].astype(np.float64)).mean() > 4 * error


def loops_template_features(
    features: np.ndarray, templates: np.ndarray, media: np.ndarray, scores: np.ndarray
) -> dict[int, np.ndarray]:
    by_template: dict[int, dict[int, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    for f, t, m, s in zip(features, templates, media, scores, strict=True):
        by_template[int(t)][int(m)].append(f / np.linalg.norm(f) * s)
    out = {}
    for t, medias in by_template.items():
        total = sum(np.mean(faces, axis=0) for faces in medias.values())
        out[t] = total / np.linalg.norm(total)
    return out


def independent_tar(scores: np.ndarray, same: np.ndarray, far: float) -> float | None:
    fpr, tpr, _ = sk_roc_curve(same, scores, drop_intermediate=False)
    if (~same).sum() * far < 1:
        return None
    return float(tpr[fpr <= far + 1e-12].max())


def test_template_pooling_and_tar_against_loops_and_sklearn() -> None:
    rng = np.random.default_rng(0)
    n, d = 300, 8
    templates = rng.integers(100, 160, size=n)
    media = rng.integers(0, 4, size=n)
    identity = templates % 15  # templates of one identity share a direction
    centres = rng.normal(size=(15, d))
    features = centres[identity] + 0.8 * rng.normal(size=(n, d))
    scores = rng.uniform(0.5, 1.0, size=n)
    ids, pooled = template_features(features, templates, media, scores=scores)
    expected = loops_template_features(features, templates, media, scores)
    assert ids.tolist() == sorted(expected)
    for row, t in enumerate(ids):
        np.testing.assert_allclose(pooled[row], expected[int(t)], atol=1e-12)
    a, b = np.triu_indices(len(ids), k=1)
    pair_a, pair_b = ids[a], ids[b]
    same = (pair_a % 15) == (pair_b % 15)
    chunked = template_pair_scores(ids, pooled, pooled, pair_a, pair_b, chunk=97)
    direct = [
        float(expected[int(x)] @ expected[int(y)]) for x, y in zip(pair_a, pair_b, strict=True)
    ]
    np.testing.assert_allclose(chunked, direct, atol=1e-12)
    metrics = ijb_metrics(chunked, same)
    for key, value in metrics["tar_at_far"].items():
        assert value == independent_tar(np.array(direct), same, float(key)), key


# --- through the CLI: jobs.evaluate --benchmark --ijb ---------------------------------------


def write_ijb_tree(root: Path, *, identities: int = 10, seed: int = 7) -> None:
    """IJB-C's layout: 2 templates per identity, 2-3 media per template, 1-3 faces per
    media, each face a synthetic aligned face warped into a loose crop by a random
    similarity; its five points moved with it; a detector score."""
    rng = np.random.default_rng(seed)
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    faces, points, templates = [], [], []
    counter = 0
    for person in range(identities):
        for t in range(2):
            template = 1000 + 2 * person + t
            templates.append((template, person))
            for m in range(int(rng.integers(2, 4))):
                media = 50_000 + 10 * template + m
                for _ in range(int(rng.integers(1, 4))):
                    counter += 1
                    name = f"{counter}.jpg"
                    face = render_image(seed, person, image=counter, size=112)
                    warp = similarity(
                        float(rng.uniform(0.9, 1.4)),
                        float(rng.uniform(-20, 20)),
                        (float(rng.uniform(5, 30)), float(rng.uniform(5, 30))),
                    )
                    crop = warp_affine(face, warp, (170, 170))
                    (root / "loose_crop" / name).write_bytes(encode_jpeg(crop, quality=95))
                    marks = apply(warp, ARCFACE_TEMPLATE).ravel()
                    faces.append(f"{name} {template} {media}")
                    score = float(rng.uniform(0.6, 1.0))
                    points.append(" ".join([name, *(f"{v:.4f}" for v in marks), f"{score:.4f}"]))
    pairs = [
        f"{a} {b} {int(pa == pb)}"
        for i, (a, pa) in enumerate(templates)
        for b, pb in templates[i + 1 :]
    ]
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(faces) + "\n")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(points) + "\n")
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")


def independent_ijb(
    root: Path, model: torch.nn.Module, gallery: torch.nn.Module | None = None
) -> dict[str, Any]:
    """TAR@FAR and AUC of IJB-C in ``root``: faces aligned (our aligner, tested above), image and
    mirror features concatenated, normalised, times the detector score, media means summed
    per template, cosine of each pair (first template from ``gallery``), sklearn's ROC."""
    faces = [
        line.split() for line in (root / "meta" / "ijbc_face_tid_mid.txt").read_text().splitlines()
    ]
    points = {
        row[0]: row[1:]
        for row in (
            line.split()
            for line in (root / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines()
        )
    }

    def features(net: torch.nn.Module) -> dict[int, np.ndarray]:
        aligned = np.stack(
            [
                align_face(
                    simplejpeg.decode_jpeg(
                        (root / "loose_crop" / name).read_bytes(), colorspace="RGB"
                    ),
                    np.array(points[name][:10], dtype=np.float64).reshape(5, 2),
                )
                for name, _, _ in faces
            ]
        )
        x = torch.from_numpy(aligned).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            f = torch.cat([net(x), net(torch.flip(x, dims=[3]))], dim=1).double().numpy()
        scores = np.array([float(points[name][10]) for name, _, _ in faces])
        t = np.array([int(row[1]) for row in faces])
        m = np.array([int(row[2]) for row in faces])
        return loops_template_features(f, t, m, scores)

    probe = features(model)
    first = probe if gallery is None else features(gallery)
    rows = [
        line.split()
        for line in (root / "meta" / "ijbc_template_pair_label.txt").read_text().splitlines()
    ]
    scores = np.array([float(first[int(a)] @ probe[int(b)]) for a, b, _ in rows])
    same = np.array([r[2] == "1" for r in rows])
    tar = {f"1e-{k}": independent_tar(scores, same, 10.0**-k) for k in range(6, 0, -1)}
    return {"tar_at_far": tar, "auc": float(roc_auc_score(same, scores))}


def test_evaluate_benchmarks_through_the_cli(
    train_setup: TrainSetup,
    tiny_synthetic: SyntheticDatasets,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    ray_cluster: None,
) -> None:
    from orchestrator.teacher.classifiers import load_teacher_backbone

    vb = bin_from_eval_set(tiny_synthetic.eval_uri)
    bin_uri = str(tmp_path / "agedb_30.bin")
    write_bin(bin_uri, list(vb.images), vb.issame)
    write_ijb_tree(tmp_path / "IJBC")
    torch.manual_seed(11)
    student = build_backbone(Arch.TINY_MOBILEFACENET, 16).eval()
    student_uri = str(tmp_path / "student.pt")
    write_student_export(
        student_uri,
        StudentExport(Arch.TINY_MOBILEFACENET, 16, 112, student.state_dict(), None, {}, (0,), 1.0),
    )
    config = tmp_path / "config.yaml"
    base = train_setup.base
    config.write_text(
        f"teacher: {{arch: {base.teacher.arch.value}, emb_dim: 16, backbone: {base.teacher.backbone}}}\n"
        "student: {arch: tiny_mobilefacenet, emb_dim: 16}\n"
    )
    out = tmp_path / "report"
    argv = [
        "--config", str(config), "--student", f"mbf={student_uri}", "--no-eval",
        "--benchmark", bin_uri, "--ijb", str(tmp_path / "IJBC"), "--ijb-set", "IJBC",
        "--out", str(out),
    ]  # fmt: skip
    assert cli.run(evaluate_job.main, argv) == 0, capsys.readouterr().err[-3000:]
    report = json.loads((out / "report.json").read_text())["benchmarks"]
    assert set(report) == {"agedb_30", "IJBC"}
    agedb = report["agedb_30"]
    assert set(agedb["students"]) == {"mbf"} and set(agedb["cross_model"]) == {"mbf"}
    teacher = load_teacher_backbone(base.teacher.backbone)
    ijb = report["IJBC"]
    assert ijb["num_templates"] == 20 and ijb["num_pairs"] == 190
    for got, expected in [
        (ijb["students"]["mbf"], independent_ijb(tmp_path / "IJBC", student)),
        (ijb["teacher"], independent_ijb(tmp_path / "IJBC", teacher)),
        (ijb["cross_model"]["mbf"], independent_ijb(tmp_path / "IJBC", student, gallery=teacher)),
    ]:
        assert got["tar_at_far"] == pytest.approx(expected["tar_at_far"])
        assert got["auc"] == pytest.approx(expected["auc"], abs=1e-9)
    text = (out / "report.md").read_text()
    assert "# Standard benchmarks (flip test: " in text and "| mbf cross |" in text
    assert "agedb_30 sum" in text, "each .bin set's flip test is stated in the title"
    assert "IJBC TAR@1e-4" in text and "agedb_30" in text
    assert (out / "roc.png").stat().st_size > 1000


def test_prepare_dataset_freezes_an_eval_set_as_a_bin(
    tiny_synthetic: SyntheticDatasets, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobs import prepare_dataset

    out = tmp_path / "frozen.bin"
    argv = ["--eval-set", tiny_synthetic.eval_uri, "--out", str(out)]
    assert cli.run(prepare_dataset.main, argv) == 0
    assert "40 pairs (20 same)" in capsys.readouterr().out
    written, expected = read_bin(str(out)), bin_from_eval_set(tiny_synthetic.eval_uri)
    assert written.images == expected.images
    assert written.issame.tolist() == expected.issame.tolist()
    assert (
        cli.run(prepare_dataset.main, ["--eval-set", tiny_synthetic.eval_uri, "--out", "x.pt"]) == 2
    )
