"""Verification pairs: drawn without replacement, counted, short folds refused, and
single-image identities reported; repeats in an older pairs file detected."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from orchestrator.data import format as fmt
from orchestrator.data import pairs as pair_draw
from orchestrator.data.prepare import FolderImport, write_image_folder
from orchestrator.data.synthetic import render_image


def unordered(table: pa.Table) -> list[tuple[str, str]]:
    a, b = table.column("image_id_a").to_pylist(), table.column("image_id_b").to_pylist()
    return [(x, y) if x <= y else (y, x) for x, y in zip(a, b, strict=True)]


def test_every_pair_at_most_once_even_when_the_folds_are_just_big_enough() -> None:
    """20 identities x 3 images: each fold holds 2 identities, so 6 same-identity pairs and
    9 different-identity pairs exist. Asking 6 + 6 per fold takes every positive: drawing
    with replacement would repeat one almost surely (6 draws from 6: P(no repeat) = 1.5%)."""
    labels = [i for i in range(20) for _ in range(3)]
    ids = [f"p{i}/{j}" for i in range(20) for j in range(3)]
    table = pair_draw.make_pairs(ids, labels, pairs_per_fold=12, seed=0)
    pairs = unordered(table)
    assert table.num_rows == 120 and len(set(pairs)) == 120, "no pair twice"
    assert pair_draw.duplicate_pairs(table) == 0
    label_of = dict(zip(ids, labels, strict=True))
    same = table.column("same").to_pylist()
    assert all((label_of[a] == label_of[b]) == s for (a, b), s in zip(pairs, same, strict=True))
    assert all(a != b for a, b in pairs)
    folds = np.asarray(table.column("fold"))
    for fold in range(10):
        mine = {label_of[x] for k in np.flatnonzero(folds == fold) for x in pairs[k]}
        assert mine == {fold, fold + 10}, "identity-disjoint folds"
    with pytest.raises(
        fmt.DatasetError, match=r"fold 0: 7 same-identity pairs asked .* only 6 distinct"
    ):
        pair_draw.make_pairs(ids, labels, pairs_per_fold=14, seed=0)


def test_a_repeated_pair_is_counted() -> None:
    table = pa.table(
        {
            "image_id_a": ["a", "b", "c"],
            "image_id_b": ["b", "a", "d"],
            "same": [True] * 3,
            "fold": [0] * 3,
        },
        schema=fmt.PAIRS_SCHEMA,
    )
    assert pair_draw.duplicate_pairs(table) == 1
    assert pair_draw.single_image_identities([0, 0, 1, 2, 2, 3]) == 2


def test_an_import_prints_the_pairs_it_wrote_and_the_single_image_identities(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "faces"
    for person in range(21):
        (root / f"s{person:02d}").mkdir(parents=True)
        for image in range(1 if person == 20 else 4):
            face = render_image(0, person, image=image, size=32)
            Image.fromarray(face).save(root / f"s{person:02d}" / f"{image}.png")
    out = str(tmp_path / "out")
    meta = write_image_folder(FolderImport(input=str(root), out=out, pairs_per_fold=8))
    output = capsys.readouterr().out
    printed = re.search(r"\[pairs\] (\d+) verification pairs written", output)
    assert "; 1 identities with a single image make no pair" in output
    written = fmt.read_pairs(out, meta)
    assert printed is not None and int(printed.group(1)) == written.num_rows == 80
    assert len(set(unordered(written))) == 80
