from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from orchestrator.data import format as fmt
from orchestrator.data.images import decode_jpeg
from orchestrator.data.prepare import SyntheticDatasets, write_synthetic
from orchestrator.data.synthetic import iter_identity_images, render_image
from tests.conftest import tiny_synthetic_config


def digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_byte_identical_output(
    tmp_path: Path, tiny_synthetic: SyntheticDatasets
) -> None:
    write_synthetic(tiny_synthetic_config(tmp_path / "again"))
    first = digest_tree(Path(tiny_synthetic.train_uri).parent)
    second = digest_tree(tmp_path / "again")
    assert first == second
    assert {"train/dataset.json", "eval/pairs.parquet", "train/identities.txt"} <= set(first)


def test_other_seed_gives_other_images(tmp_path: Path, tiny_synthetic: SyntheticDatasets) -> None:
    write_synthetic(tiny_synthetic_config(tmp_path / "seed1", seed=1))
    a = digest_tree(Path(tiny_synthetic.train_uri))
    b = digest_tree(tmp_path / "seed1" / "train")
    assert a["part-00000.parquet"] != b["part-00000.parquet"]


def test_metadata_and_shards(tiny_synthetic: SyntheticDatasets) -> None:
    meta = fmt.read_meta(tiny_synthetic.train_uri)
    assert (meta.num_classes, meta.num_images, meta.image_size) == (6, 18, 112)
    assert len(meta.files) > 1 and sum(f.rows for f in meta.files) == 18
    names = fmt.read_identities(tiny_synthetic.train_uri, meta)
    assert names == [f"synth{i:07d}" for i in range(6)]
    tables = list(fmt.iter_shards(tiny_synthetic.train_uri, meta))
    labels = np.concatenate([np.asarray(t.column("label")) for t in tables])
    identities = [name for t in tables for name in t.column("identity").to_pylist()]
    assert labels.tolist() == [i // 3 for i in range(18)]
    assert identities == [names[label] for label in labels]
    image = decode_jpeg(tables[0].column("image")[0].as_py(), "test")
    assert image.shape == (112, 112, 3) and image.dtype == np.uint8


def test_eval_identities_are_disjoint_and_pairs_are_well_formed(
    tiny_synthetic: SyntheticDatasets,
) -> None:
    train = set(
        fmt.read_identities(tiny_synthetic.train_uri, fmt.read_meta(tiny_synthetic.train_uri))
    )
    eval_meta = fmt.read_meta(tiny_synthetic.eval_uri)
    held_out = fmt.read_identities(tiny_synthetic.eval_uri, eval_meta)
    assert len(held_out) == 20 and not train & set(held_out)
    pairs = fmt.read_pairs(tiny_synthetic.eval_uri, eval_meta).to_pydict()
    assert len(pairs["same"]) == 10 * 4
    assert sorted(set(pairs["fold"])) == list(range(10))
    person = lambda image_id: image_id.split("/")[0]  # noqa: E731
    fold_of: dict[str, int] = {}
    for a, b, same, fold in zip(
        pairs["image_id_a"], pairs["image_id_b"], pairs["same"], pairs["fold"], strict=True
    ):
        assert (person(a) == person(b)) == same and a != b
        for p in (person(a), person(b)):
            assert fold_of.setdefault(p, fold) == fold, "folds must be identity-disjoint"
    assert sum(pairs["same"]) == 20


def test_rendering_is_a_pure_function_and_streams() -> None:
    streamed = list(iter_identity_images(5, 3, images_per_identity=4, size=64))
    assert np.array_equal(streamed[2], render_image(5, 3, image=2, size=64))
    # Identity 150_000 is rendered without touching the ones before it.
    far = render_image(5, 150_000, image=0, size=112)
    assert far.shape == (112, 112, 3)
    assert not np.array_equal(streamed[0], streamed[1]), "images of one identity vary"


def test_same_identity_faces_are_closer_than_different_ones() -> None:
    # A crude learnability check on the central face region (backgrounds are random per
    # image by design), as 8x8 thumbnails: images of one identity are on average closer to
    # each other than images of different identities, but far from identical.
    def thumb(identity: int, image: int) -> np.ndarray:
        x = render_image(0, identity, image=image, size=64).astype(np.float64)[16:48, 16:48]
        return x.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)).ravel()

    thumbs = {(i, k): thumb(i, k) for i in range(8) for k in range(4)}
    within = [
        np.linalg.norm(thumbs[i, a] - thumbs[i, b])
        for i in range(8)
        for a in range(4)
        for b in range(a + 1, 4)
    ]
    across = [
        np.linalg.norm(thumbs[i, 0] - thumbs[j, 0]) for i in range(8) for j in range(i + 1, 8)
    ]
    assert np.mean(within) < 0.8 * np.mean(across)
    assert np.mean(within) > 0.3 * np.mean(across), "nuisance must make recognition non-trivial"
