"""Checks of single values that several sections share: seeds and one-component names."""

from __future__ import annotations

from collections.abc import Sequence

MAX_SEED = 2**63 - 1  # a seed is a non-negative 64-bit signed integer


def seed_problem(seeds: Sequence[int]) -> str | None:
    """Why ``seeds`` are not valid seeds (each in [0, 2**63 - 1]), or None."""
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    return f"a seed must be in [0, 2**63 - 1], found {bad}" if bad else None


def is_single_component(name: str) -> bool:
    """One path component, never a path that leaves its parent: what run names (one
    directory under storage_path) and a dataset's file names must be."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\:\0")
