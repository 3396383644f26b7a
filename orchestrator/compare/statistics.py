"""The statistics of a comparison: per method the mean and standard deviation over seeds,
and the paired difference to the baseline with Student's t interval."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from orchestrator.compare.cells import (
    Cell,
)
from orchestrator.config import ExperimentConfig


@dataclass(frozen=True)
class Spread:
    mean: float
    std: float  # sample standard deviation (ddof 1); nan for one value
    n: int


def spread(values: Sequence[float]) -> Spread:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return Spread(math.nan, math.nan, 0)
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return Spread(float(array.mean()), std, int(array.size))


@dataclass(frozen=True)
class PairedInterval:
    """mean(a_k - b_k) over the seeds k both have, and its two-sided t interval."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (needs at least two pairs)."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def paired_interval(
    a: Mapping[int, float], b: Mapping[int, float], confidence: float
) -> PairedInterval:
    """Student's t interval of the mean paired difference a - b over the common seeds:
    mean(d) +- t_{(1+confidence)/2, n-1} * sd(d) / sqrt(n)."""
    # scipy: heavy (about a second to import), only for the intervals
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    d = np.asarray([a[k] - b[k] for k in seeds], dtype=np.float64)
    n = int(d.size)
    if n == 0:
        return PairedInterval(math.nan, math.nan, math.nan, 0, confidence)
    mean = float(d.mean())
    if n == 1:
        return PairedInterval(mean, math.nan, math.nan, 1, confidence)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    return PairedInterval(mean, mean - half, mean + half, n, confidence)


def mean_interval(values: Sequence[float], confidence: float) -> tuple[float, float]:
    """The t interval of a mean (the plot's error bar); nan for fewer than two values."""
    # scipy: heavy (about a second to import), only for the intervals
    from scipy import stats

    s = spread(values)
    if s.n < 2:
        return (math.nan, math.nan)
    half = float(stats.t.ppf((1 + confidence) / 2, s.n - 1)) * s.std / math.sqrt(s.n)
    return (s.mean - half, s.mean + half)


def by_seed(cells: Sequence[Cell], method: str, column: str) -> dict[int, float]:
    return {
        c.seed: float(v)
        for c in cells
        if c.method == method and (v := c.metrics.get(column)) is not None and math.isfinite(v)
    }


def summary_data(config: ExperimentConfig, cells: list[Cell], columns: list[str]) -> dict[str, Any]:
    """Plain data of the whole comparison: per column, per method, the spread and the
    paired interval to the baseline."""
    compare = config.compare
    baseline = compare.baseline.value
    tables: dict[str, Any] = {}
    for column in columns:
        rows = {}
        base = by_seed(cells, baseline, column)
        for method in compare.methods:
            values = by_seed(cells, method.value, column)
            row: dict[str, Any] = {
                "values": {str(k): v for k, v in sorted(values.items())},
                **asdict(spread(list(values.values()))),
            }
            if method.value != baseline:
                interval = paired_interval(values, base, compare.confidence)
                row["vs_baseline"] = {**asdict(interval), "significant": interval.significant}
            rows[method.value] = row
        tables[column] = rows
    return {
        "name": config.name,
        "baseline": baseline,
        "confidence": compare.confidence,
        "interval": "paired Student t over seeds: mean(d) +- t_{(1+c)/2, n-1} sd(d) / sqrt(n)",
        "seeds": list(compare.seeds),
        "budget": {
            "epochs": config.optim.epochs,
            "global_batch": config.optim.batch_size,
            "lr": config.optim.lr,
            "student": config.student.arch.value,
            "train": config.data.train,
            "eval": config.data.eval,
        },
        "cells": [asdict(c) for c in cells],
        "tables": tables,
    }
