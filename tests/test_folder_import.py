"""Real faces: the ORL database imported from its folder layout."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import OnCorrupt
from orchestrator.data import format as fmt
from orchestrator.data.images import CorruptImageError, decode_jpeg
from orchestrator.data.prepare import FolderImport, write_image_folder
from tests.conftest import SHARED_DATASETS

ORL = SHARED_DATASETS / "orl_faces"
pytestmark = pytest.mark.skipif(not ORL.is_dir(), reason="shared/datasets/orl_faces not present")


@pytest.fixture(scope="module")
def orl(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, fmt.DatasetMeta]:
    out = str(tmp_path_factory.mktemp("orl") / "orl")
    return out, write_image_folder(FolderImport(input=str(ORL), out=out, pairs_per_fold=20))


def test_orl_counts_labels_and_fingerprint(orl: tuple[str, fmt.DatasetMeta]) -> None:
    out, meta = orl
    assert (meta.num_classes, meta.num_images, len(meta.skipped)) == (40, 400, 0)
    expected_names = sorted(p.name for p in ORL.iterdir() if p.is_dir())  # s1, s10, s11, ...
    assert fmt.read_identities(out, meta) == expected_names
    # Fingerprint recomputed by hand from the label map's definition.
    text = "".join(f"{name}\n" for name in expected_names)
    assert meta.label_map_fingerprint == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    assert json.loads((Path(out) / "dataset.json").read_text())["num_classes"] == 40
    counts = np.zeros(40, dtype=int)
    for table in fmt.iter_shards(out, meta):
        labels = np.asarray(table.column("label"))
        np.add.at(counts, labels, 1)
        for identity, label, image_id in zip(
            table.column("identity").to_pylist(),
            labels,
            table.column("image_id").to_pylist(),
            strict=True,
        ):
            assert identity == expected_names[label] and image_id.startswith(identity + "/")
    assert counts.tolist() == [10] * 40


def test_orl_images_are_grey_expanded_and_letterboxed(orl: tuple[str, fmt.DatasetMeta]) -> None:
    out, meta = orl
    table = next(fmt.iter_shards(out, meta))
    image = decode_jpeg(table.column("image")[0].as_py(), "orl")
    assert image.shape == (112, 112, 3)
    # Grey source: the three channels agree (up to JPEG chroma rounding).
    assert np.abs(image[..., 0].astype(int) - image[..., 2].astype(int)).max() <= 3
    # 92x112 fitted into 112x112: 10 black columns on each side, content in the middle.
    assert image[:, :8].max() <= 12 and image[:, -8:].max() <= 12
    assert image[:, 40:70].mean() > 40


def test_orl_pairs(orl: tuple[str, fmt.DatasetMeta]) -> None:
    out, meta = orl
    pairs = fmt.read_pairs(out, meta)
    assert pairs.num_rows == 200 and sum(pairs.column("same").to_pylist()) == 100


def copy_subset(tmp_path: Path, n: int = 3) -> Path:
    root = tmp_path / "faces"
    for name in ("s1", "s2", "s3")[:n]:
        shutil.copytree(ORL / name, root / name)
    return root


def test_corrupt_image_stops_the_import_naming_the_file(tmp_path: Path) -> None:
    root = copy_subset(tmp_path)
    (root / "s2" / "11.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    with pytest.raises(CorruptImageError, match=r"s2/11\.png: cannot decode image"):
        write_image_folder(FolderImport(input=str(root), out=str(out)))
    assert not (out / "dataset.json").exists(), "nothing half-written is published"


def test_corrupt_image_skipped_and_counted_when_configured(tmp_path: Path) -> None:
    root = copy_subset(tmp_path)
    (root / "s2" / "11.pgm").write_bytes(b"P5\n92 112\n255\n" + b"\x00" * 100)  # truncated
    meta = write_image_folder(
        FolderImport(input=str(root), out=str(tmp_path / "out"), on_corrupt=OnCorrupt.SKIP)
    )
    assert (meta.num_classes, meta.num_images) == (3, 30)
    assert len(meta.skipped) == 1 and "s2/11.pgm" in meta.skipped[0]
    saved = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert saved["num_skipped"] == 1


def test_refuses_to_overwrite_a_published_dataset_from_another_input(tmp_path: Path) -> None:
    root = copy_subset(tmp_path, 2)
    options = FolderImport(input=str(root), out=str(tmp_path / "out"))
    first = write_image_folder(options)
    assert write_image_folder(options) == first  # same input and options: nothing to do
    (root / "s1" / "1.pgm").unlink()
    with pytest.raises(fmt.DatasetError, match="already exists and came from another input"):
        write_image_folder(options)


def test_rerun_after_a_crash_skips_finished_shards(tmp_path: Path) -> None:
    root = copy_subset(tmp_path, 4)
    out = tmp_path / "out"
    options = FolderImport(input=str(root), out=str(out), shard_bytes=40_000)
    complete = write_image_folder(options)
    assert len(complete.files) >= 3
    published = (out / "dataset.json").read_bytes()
    # Back to the state of a crash while writing the last shard: it and everything
    # published after it are gone (or were never written).
    last = complete.files[-1].name
    for name in (last, f"_import/{last}.json", "dataset.json", "identities.txt"):
        (out / name).unlink()
    finished = {f.name: (out / f.name).stat().st_mtime_ns for f in complete.files[:-1]}
    assert write_image_folder(options) == complete
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished  # not rewritten
    assert (out / "dataset.json").read_bytes() == published
    assert (out / last).exists()


def test_unfinished_import_of_another_input_is_not_mixed_in(tmp_path: Path) -> None:
    root = copy_subset(tmp_path, 2)
    out = tmp_path / "out"
    write_image_folder(FolderImport(input=str(root), out=str(out)))
    (out / "dataset.json").unlink()  # as if it had crashed before publishing
    with pytest.raises(fmt.DatasetError, match="unfinished import of another input"):
        write_image_folder(FolderImport(input=str(root), out=str(out), jpeg_quality=80))


def test_missing_input_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such directory"):
        write_image_folder(FolderImport(input=str(tmp_path / "nope"), out=str(tmp_path / "out")))


def test_out_of_range_label_in_a_shard_names_file_row_and_c(tmp_path: Path) -> None:
    root = copy_subset(tmp_path, 2)
    out = tmp_path / "out"
    meta = write_image_folder(FolderImport(input=str(root), out=str(out)))
    # A dataset.json that claims fewer classes than the shards use.
    data = json.loads((out / "dataset.json").read_text())
    data["num_classes"] = 1
    (out / "dataset.json").write_text(json.dumps(data))
    bad = fmt.read_meta(str(out))
    with pytest.raises(
        fmt.DatasetError,
        match=r"part-00000\.parquet: row 10 has label 1, outside \[0, num_classes=1\)",
    ):
        list(fmt.iter_shards(str(out), bad))
    assert meta.num_classes == 2


def test_identity_ranges_make_a_held_out_split(tmp_path: Path) -> None:
    train = write_image_folder(
        FolderImport(input=str(ORL), out=str(tmp_path / "train"), identities=":20")
    )
    held_out = write_image_folder(
        FolderImport(
            input=str(ORL), out=str(tmp_path / "eval"), identities="20:", pairs_per_fold=10
        )
    )
    names = sorted(p.name for p in ORL.iterdir() if p.is_dir())
    assert fmt.read_identities(str(tmp_path / "train"), train) == names[:20]
    assert fmt.read_identities(str(tmp_path / "eval"), held_out) == names[20:]
    assert (train.num_images, held_out.num_images) == (200, 200)
    with pytest.raises(fmt.DatasetError, match=r"--identities '3-4': expected START:STOP"):
        write_image_folder(FolderImport(input=str(ORL), out=str(tmp_path / "x"), identities="3-4"))
    with pytest.raises(fmt.DatasetError, match=r"selects none of its 40 identity folders"):
        write_image_folder(FolderImport(input=str(ORL), out=str(tmp_path / "y"), identities="50:"))
