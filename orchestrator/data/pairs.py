"""Verification pairs drawn from a dataset: positive and negative pairs per fold, without
repeats, from the identities with enough images (the pairs file: :mod:`orchestrator.data.format`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from orchestrator.data.format import NUM_FOLDS, PAIRS_SCHEMA, DatasetError


def check_pair_identities(usable: int) -> None:
    """Verification pairs need two identities with 2+ images in each of the folds."""
    if usable < 2 * NUM_FOLDS:
        raise DatasetError(
            f"verification pairs need at least {2 * NUM_FOLDS} identities with 2+ images "
            f"({NUM_FOLDS} folds, 2 identities each), found {usable}"
        )


def make_pairs(
    image_ids: Sequence[str], labels: Sequence[int], *, pairs_per_fold: int, seed: int
) -> pa.Table:
    """Verification pairs in ``NUM_FOLDS`` identity-disjoint folds (the LFW layout).

    Identities with 2+ images are dealt round-robin to folds; each fold gets
    ``pairs_per_fold // 2`` same-identity pairs and as many different-identity pairs,
    drawn within the fold **without replacement**: each unordered pair of images at most
    once. A fold that cannot hold the asked number is an error naming the shortfall.
    """
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[str]] = {}
    for image_id, label in zip(image_ids, labels, strict=True):
        by_label.setdefault(int(label), []).append(image_id)
    usable = sorted(label for label, ids in by_label.items() if len(ids) >= 2)
    check_pair_identities(len(usable))
    columns: dict[str, list[Any]] = {name: [] for name in PAIRS_SCHEMA.names}
    half = pairs_per_fold // 2
    for fold in range(NUM_FOLDS):
        members = [by_label[label] for label in usable[fold::NUM_FOLDS]]
        for same, drawn in ((True, positive_pairs), (False, negative_pairs)):
            for a, b in drawn(members, half, rng, fold=fold):
                _add_pair(columns, a, b, same, fold)
    return pa.table(columns, schema=PAIRS_SCHEMA)


def single_image_identities(labels: Sequence[int]) -> int:
    """How many identities have one image only (they make no same-identity pair and are
    left out of verification pairs)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64)) if len(labels) else np.zeros(0)
    return int((counts == 1).sum())


def _shortfall(kind: str, asked: int, available: int, fold: int) -> DatasetError:
    return DatasetError(
        f"fold {fold}: {asked} {kind} pairs asked (pairs_per_fold // 2), but its identities "
        f"hold only {available} distinct ones; lower the pairs per fold to at most "
        f"{2 * available}, or add identities or images"
    )


def positive_pairs(
    members: Sequence[Sequence[str]], count: int, rng: np.random.Generator, *, fold: int
) -> list[tuple[str, str]]:
    """``count`` distinct same-identity pairs: each identity's n(n-1)/2 pairs are a block,
    drawn from without replacement (:func:`_draw_from_blocks`), then unranked."""
    sizes = [len(ids) * (len(ids) - 1) // 2 for ids in members]
    out = []
    for who, k in _draw_from_blocks(sizes, count, rng, kind="same-identity", fold=fold):
        a, b = _unrank_pair(k)
        out.append((members[who][a], members[who][b]))
    return out


def negative_pairs(
    members: Sequence[Sequence[str]], count: int, rng: np.random.Generator, *, fold: int
) -> list[tuple[str, str]]:
    """``count`` distinct different-identity pairs: each identity pair's n_i * n_j image
    pairs are a block, drawn from without replacement (:func:`_draw_from_blocks`)."""
    couples = [(i, j) for i in range(len(members)) for j in range(i + 1, len(members))]
    sizes = [len(members[i]) * len(members[j]) for i, j in couples]
    out = []
    for which, k in _draw_from_blocks(sizes, count, rng, kind="different-identity", fold=fold):
        i, j = couples[which]
        a, b = divmod(k, len(members[j]))
        out.append((members[i][a], members[j][b]))
    return out


def _draw_from_blocks(
    sizes: Sequence[int], count: int, rng: np.random.Generator, *, kind: str, fold: int
) -> list[tuple[int, int]]:
    """``count`` distinct items of blocks of ``sizes`` items, in order, as (block, index in
    the block): indices into the blocks' concatenation drawn without replacement. Too few
    items is an error naming the fold and the shortfall."""
    starts = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))])
    total = int(starts[-1])
    if count > total:
        raise _shortfall(kind, count, total, fold)
    out = []
    for k in np.sort(rng.choice(total, size=count, replace=False)):
        block = int(np.searchsorted(starts, k, side="right")) - 1
        out.append((block, int(k - starts[block])))
    return out


def _unrank_pair(k: int) -> tuple[int, int]:
    """The k-th pair (a, b), a < b, in the order (0,1), (0,2), (1,2), (0,3), (1,3), ..."""
    b = int((1 + math.isqrt(1 + 8 * k)) // 2)
    while b * (b - 1) // 2 > k:
        b -= 1
    return k - b * (b - 1) // 2, b


def duplicate_pairs(table: pa.Table) -> int:
    """Pairs that repeat an earlier one (the same two images, in either order)."""
    seen: set[tuple[str, str]] = set()
    repeats = 0
    for a, b in zip(
        table.column("image_id_a").to_pylist(), table.column("image_id_b").to_pylist(), strict=True
    ):
        key = (a, b) if a <= b else (b, a)
        repeats += key in seen
        seen.add(key)
    return repeats


def _add_pair(columns: dict[str, list[Any]], a: str, b: str, same: bool, fold: int) -> None:
    columns["image_id_a"].append(a)
    columns["image_id_b"].append(b)
    columns["same"].append(same)
    columns["fold"].append(fold)
