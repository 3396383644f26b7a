"""The teacher classifier format and its three builders."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from orchestrator import classifier as clf
from orchestrator.config import Arch, to_dict
from orchestrator.data import format as fmt
from orchestrator.data.prepare import SyntheticDatasets
from orchestrator.shards import Shard
from orchestrator.teacher.checkpoint import TeacherCheckpoint, save_teacher
from orchestrator.teacher.classifiers import (
    classifier_from_arcface_torch,
    classifier_from_checkpoint,
    classifier_from_mean_embeddings,
    iter_dataset_batches,
    load_teacher_backbone,
)

FP = "sha256:" + "ab" * 32


def normalised(w: np.ndarray) -> np.ndarray:
    return w / np.linalg.norm(w, axis=1, keepdims=True)


@pytest.mark.parametrize(
    ("num_classes", "world_size"), [(10, 1), (10, 3), (7, 4), (3, 5), (1000, 7)]
)
def test_shard_range_formula(num_classes: int, world_size: int) -> None:
    shards = [Shard.for_rank(num_classes, world_size, r) for r in range(world_size)]
    ranges = [(s.class_start, s.local_classes) for s in shards]
    assert sum(size for _, size in ranges) == num_classes
    assert ranges[0][0] == 0
    for (start, size), (next_start, _) in itertools.pairwise(ranges):
        assert start + size == next_start
    sizes = [size for _, size in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    for r, (start, size) in enumerate(ranges):  # DESIGN.md section 3, literally
        assert size == num_classes // world_size + (r < num_classes % world_size)
        assert start == (num_classes // world_size) * r + min(r, num_classes % world_size)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_in_chunks(tmp_path: Path, dtype: str) -> None:
    w = np.random.default_rng(0).normal(size=(50, 6))
    meta = clf.write_classifier(
        str(tmp_path / "w"),
        w,
        label_map_fingerprint=FP,
        source={"kind": "test"},
        dtype=dtype,
        chunk_rows=7,
    )
    assert len(meta.chunks) == 8 and meta.chunks[-1].rows == 1
    loaded = clf.read_meta(str(tmp_path / "w"))
    assert loaded == meta
    tol = 1e-7 if dtype == "float32" else 1e-3
    for start, size in [(0, 50), (3, 5), (6, 2), (14, 21), (49, 1), (10, 0)]:
        rows = clf.read_rows(str(tmp_path / "w"), loaded, start=start, size=size)
        np.testing.assert_allclose(rows, normalised(w)[start : start + size], atol=tol)


def test_a_rank_reads_only_overlapping_chunks(tmp_path: Path) -> None:
    w = np.random.default_rng(1).normal(size=(20, 4))
    uri = str(tmp_path / "w")
    meta = clf.write_classifier(
        uri, w, label_map_fingerprint=FP, source={}, dtype="float32", chunk_rows=5
    )
    # Corrupt chunk 3 (rows 15..19): ranks whose rows avoid it never notice...
    (tmp_path / "w" / "rows-00003.bin").write_bytes(b"\x00" * 80)
    np.testing.assert_allclose(
        clf.read_shard(uri, meta, world_size=2, rank=0), normalised(w)[:10], atol=1e-7
    )
    # ...and the rank that needs it gets a checksum error naming the file.
    with pytest.raises(clf.ClassifierError, match=r"rows-00003\.bin: sha256 does not match"):
        clf.read_shard(uri, meta, world_size=2, rank=1)


def test_meta_is_published_last(tmp_path: Path) -> None:
    uri = str(tmp_path / "w")
    writer = clf.ClassifierWriter(
        uri, 4, label_map_fingerprint=FP, source={}, dtype="float32", chunk_rows=2
    )
    writer.append(np.ones((5, 4)))
    assert list((tmp_path / "w").glob("rows-*.bin")), "chunks are already out..."
    with pytest.raises(clf.ClassifierError, match=r"meta\.json not found.*still being written"):
        clf.read_meta(uri)  # ...but the classifier is not loadable until publish()
    writer.publish()
    assert clf.read_meta(uri).num_classes == 5


def test_rows_that_cannot_be_normalised_are_refused(tmp_path: Path) -> None:
    w = np.ones((4, 3))
    w[2] = 0
    with pytest.raises(clf.ClassifierError, match="row 2 is zero or not finite"):
        clf.write_classifier(str(tmp_path / "w"), w, label_map_fingerprint=FP, source={})


def test_validation_names_both_values(tmp_path: Path) -> None:
    meta = clf.write_classifier(
        str(tmp_path / "w"), np.ones((5, 4)), label_map_fingerprint=FP, source={}
    )
    clf.validate(meta, "W", num_classes=5, emb_dim=4, label_map_fingerprint=FP)
    with pytest.raises(
        clf.ClassifierError, match=r"W has num_classes=5 but the dataset has num_classes=6"
    ):
        clf.validate(meta, "W", num_classes=6, emb_dim=4, label_map_fingerprint=FP)
    with pytest.raises(clf.ClassifierError, match="W has emb_dim=4 but the student has emb_dim=8"):
        clf.validate(meta, "W", num_classes=5, emb_dim=8, label_map_fingerprint=FP)
    with pytest.raises(
        clf.ClassifierError, match=rf"label_map_fingerprint={FP} but the dataset has sha256:00"
    ):
        clf.validate(meta, "W", num_classes=5, emb_dim=4, label_map_fingerprint="sha256:00")


def test_load_full_refuses_large_w(tmp_path: Path) -> None:
    meta = clf.write_classifier(
        str(tmp_path / "w"), np.ones((100, 8)), label_map_fingerprint=FP, source={}
    )
    with pytest.raises(clf.ClassifierError, match=r"above the dense limit.*use the sharded loss"):
        clf.load_full(str(tmp_path / "w"), meta, limit_bytes=1000)
    assert clf.load_full(str(tmp_path / "w"), meta).shape == (100, 8)


def test_malformed_meta(tmp_path: Path) -> None:
    clf.write_classifier(str(tmp_path / "w"), np.ones((5, 4)), label_map_fingerprint=FP, source={})
    data = json.loads((tmp_path / "w" / "meta.json").read_text())
    data["num_classes"] = 6
    (tmp_path / "w" / "meta.json").write_text(json.dumps(data))
    with pytest.raises(clf.ClassifierError, match="chunks hold 5 rows, num_classes is 6"):
        clf.read_meta(str(tmp_path / "w"))


def test_builder_from_teacher_checkpoint(tmp_path: Path) -> None:
    head = torch.randn(9, 16)
    backbone = {k: v.clone() for k, v in _tiny_teacher().state_dict().items()}
    path = str(tmp_path / "teacher.pt")
    save_teacher(path, TeacherCheckpoint(Arch.TINY_IRESNET, 16, 112, backbone, head, FP))
    meta = classifier_from_checkpoint(
        path, str(tmp_path / "w"), dataset_fingerprint=FP, dtype="float32"
    )
    assert meta.source["kind"] == "teacher_checkpoint"
    np.testing.assert_allclose(
        clf.load_full(str(tmp_path / "w"), meta), normalised(head.numpy()), atol=1e-6
    )
    with pytest.raises(clf.ClassifierError, match="trained with label_map_fingerprint"):
        classifier_from_checkpoint(path, str(tmp_path / "w2"), dataset_fingerprint="sha256:other")
    # The backbone loads back into an equal model.
    loaded = load_teacher_backbone(path)
    x = torch.randn(2, 3, 112, 112)
    torch.testing.assert_close(loaded(x), _tiny_teacher().eval()(x))


def _tiny_teacher() -> torch.nn.Module:
    from orchestrator.models import build_backbone

    torch.manual_seed(123)
    return build_backbone(Arch.TINY_IRESNET, 16)


@pytest.mark.parametrize("layout", ["v1_tensor", "v2_state_dict", "v2_checkpoint"])
def test_builder_from_arcface_torch(tmp_path: Path, layout: str) -> None:
    num_classes, world_size, d = 23, 3, 8
    w = torch.randn(num_classes, d)
    run = tmp_path / "run"
    run.mkdir()
    for rank in range(world_size):
        shard = Shard.for_rank(num_classes, world_size, rank)
        start, size = shard.class_start, shard.local_classes
        part = w[start : start + size].clone()
        if layout == "v1_tensor":
            torch.save(part, run / f"rank_{rank}_softmax_weight.pt")
        elif layout == "v2_state_dict":
            torch.save({"weight": part}, run / f"softmax_fc_gpu_{rank}.pt")
        else:
            torch.save(
                {"state_dict_softmax_fc": {"weight": part}, "epoch": 3},
                run / f"checkpoint_gpu_{rank}.pt",
            )
    meta = classifier_from_arcface_torch(
        str(run),
        str(tmp_path / "w"),
        num_classes=num_classes,
        dataset_fingerprint=FP,
        dtype="float32",
    )
    assert meta.source["world_size"] == 3
    np.testing.assert_allclose(
        clf.load_full(str(tmp_path / "w"), meta), normalised(w.numpy()), atol=1e-6
    )


def test_arcface_torch_shard_size_mismatch_and_missing_rank(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for rank, rows in enumerate([8, 8, 7]):  # 23 classes over 3 ranks
        torch.save(torch.randn(rows, 4), run / f"rank_{rank}_softmax_weight.pt")
    with pytest.raises(
        clf.ClassifierError,
        match=r"rank_2_softmax_weight.pt: rank 2 of 3 has 7 rows, but num_classes=24 gives that rank 8",
    ):
        classifier_from_arcface_torch(
            str(run), str(tmp_path / "w"), num_classes=24, dataset_fingerprint=FP
        )  # rank 2 would need 8
    (run / "rank_1_softmax_weight.pt").unlink()
    with pytest.raises(clf.ClassifierError, match=r"ranks \[1\] are missing"):
        classifier_from_arcface_torch(
            str(run), str(tmp_path / "w"), num_classes=23, dataset_fingerprint=FP
        )


def test_builder_from_mean_embeddings(tmp_path: Path, tiny_synthetic: SyntheticDatasets) -> None:
    torch.manual_seed(0)
    proj = torch.randn(3 * 4 * 4, 5, dtype=torch.float64)

    def embed(x: torch.Tensor) -> torch.Tensor:  # a fixed, simple "teacher"
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.double(), 4).flatten(1)
        return pooled @ proj

    uri = tiny_synthetic.train_uri
    meta = classifier_from_mean_embeddings(
        embed, uri, out=str(tmp_path / "w"), batch_size=4, dtype="float32"
    )
    assert meta.source["approximation"] is True
    # Independent reference: all images at once, per-class means by boolean masks.
    data_meta = fmt.read_meta(uri)
    images, labels = zip(*iter_dataset_batches(uri, data_meta, 1000), strict=True)
    from orchestrator.data.images import to_model_input

    emb = embed(to_model_input(np.concatenate(images))).numpy()
    emb = normalised(emb)
    y = np.concatenate(labels)
    expected = normalised(np.stack([emb[y == c].mean(0) for c in range(data_meta.num_classes)]))
    np.testing.assert_allclose(clf.load_full(str(tmp_path / "w"), meta), expected, atol=1e-6)
    assert meta.label_map_fingerprint == data_meta.label_map_fingerprint


def test_torchscript_teacher_backbone_is_accepted(tmp_path: Path) -> None:
    model = _tiny_teacher().eval()
    path = str(tmp_path / "scripted.pt")
    torch.jit.trace(model, torch.zeros(1, 3, 112, 112)).save(path)
    loaded = load_teacher_backbone(path)
    x = torch.randn(2, 3, 112, 112)
    torch.testing.assert_close(loaded(x), model(x))


def test_teacher_backbone_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.pt does not exist"):
        load_teacher_backbone(str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"junk\.pt: neither a PyTorch file .* nor an ONNX graph"):
        load_teacher_backbone(str(junk))


def test_a_failed_rewrite_leaves_the_old_classifier_as_it_was(tmp_path: Path) -> None:
    """Publish-last also over an existing classifier: the old one stays loadable, byte for
    byte, until the new meta.json replaces it; then its chunks are removed."""
    uri = str(tmp_path / "w")
    old = np.random.default_rng(3).normal(size=(12, 4))
    clf.write_classifier(uri, old, label_map_fingerprint=FP, source={}, chunk_rows=5)
    before = {p.name: p.read_bytes() for p in (tmp_path / "w").iterdir()}
    writer = clf.ClassifierWriter(uri, 4, label_map_fingerprint=FP, source={}, chunk_rows=5)
    writer.append(np.ones((7, 4)))  # one new chunk written beside the old ones
    with pytest.raises(clf.ClassifierError, match="is zero or not finite"):
        writer.append(np.zeros((1, 4)))
    meta = clf.read_meta(uri)
    assert {c.file for c in meta.chunks} == {n for n in before if n != "meta.json"}
    assert all((tmp_path / "w" / n).read_bytes() == data for n, data in before.items())
    np.testing.assert_allclose(
        clf.read_rows(uri, meta, start=0, size=12), normalised(old), atol=1e-3
    )
    new = clf.write_classifier(uri, np.ones((3, 4)), label_map_fingerprint=FP, source={})
    assert clf.read_meta(uri) == new and new.num_classes == 3
    names = {p.name for p in (tmp_path / "w").iterdir()}
    assert not names & ({n for n in before if n != "meta.json"}), "old chunks are removed"


def test_mean_embedding_takes_teacher_and_out_from_the_config_and_records_the_input(
    tmp_path: Path, train_setup: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobs import build_classifier
    from orchestrator.config import dump_yaml

    out = tmp_path / "from-config"
    base = train_setup.base
    config = replace(base, teacher=replace(base.teacher, classifier=str(out)))
    path = tmp_path / "teacher.yaml"
    path.write_text(dump_yaml(config))
    argv = ["mean-embedding", "--local", "--config", str(path), "--dataset", base.data.train]
    assert build_classifier.main(argv) == 0
    assert "[mean embeddings] teacher.input (--config" in capsys.readouterr().out
    meta = clf.read_meta(str(out))
    assert meta.source["teacher"] == base.teacher.backbone
    assert meta.source["teacher_input"] == to_dict(config.teacher.input)
    assert meta.source["teacher_input"]["size"] == [112, 112]
