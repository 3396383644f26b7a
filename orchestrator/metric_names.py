"""The names of the metrics (beside :mod:`orchestrator.metrics`, which computes them): the
headline numbers of an evaluation report, their keys in a training run's per-epoch report,
and the benchmark and IJB metric names."""

from __future__ import annotations

import enum
from typing import Any


class Metric(enum.StrEnum):
    """The evaluation report's headline numbers (``report.json``: the first three at the top
    of a model's entry, TAR@FAR under ``tar_at_far``). Tune ranks trials by the validation
    copy a training run reports, ``val_<name>``; retraining compares reports."""

    ACC_10FOLD = "acc_10fold"
    AUC = "auc"
    RANK1 = "rank1"
    TAR_AT_FAR_1E_1 = "tar_at_far_1e-1"
    TAR_AT_FAR_1E_2 = "tar_at_far_1e-2"
    TAR_AT_FAR_1E_3 = "tar_at_far_1e-3"
    TAR_AT_FAR_1E_4 = "tar_at_far_1e-4"

    @property
    def validation_key(self) -> str:
        """The key of this metric in a training run's per-epoch report."""
        return f"val_{self.value}"

    def read(self, report: dict[str, Any]) -> float | None:
        """This metric from one model's entry of an evaluation report (None: not measured,
        e.g. too few negative pairs for the FAR)."""
        if self.value.startswith("tar_at_far_"):
            value = (report.get("tar_at_far") or {}).get(self.value.removeprefix("tar_at_far_"))
        else:
            value = report.get(self.value)
        return None if value is None else float(value)


BENCHMARK_METRIC = "_acc"  # a .bin benchmark's metric: <name>_acc, its 10-fold accuracy
# What a student costs to run (orchestrator.cost measures them): names a search can optimise
# (tune.objectives) or bound (tune.constraints).
LATENCY_MS = "latency_ms"  # one image (batch 1), median of repeated runs
SERVING_LATENCY_MS = "serving_latency_ms"  # one call of tune.latency.serving_batch images
MACS = "macs"  # multiply-accumulates for one image
PARAMS = "params"
ONNX_MB = "onnx_mb"  # the ONNX export's size, MB (10^6 bytes)
COST_METRICS = (LATENCY_MS, SERVING_LATENCY_MS, MACS, PARAMS, ONNX_MB)
ARCHITECTURE_METRICS = (MACS, PARAMS)  # known from the architecture alone, before export
# Beside each timing's median (LATENCY_MS: "latency", SERVING_LATENCY_MS: "serving"), a
# search reports its spread: <timing>_p10_ms, <timing>_p90_ms, <timing>_noise.
TIMINGS = {"latency": LATENCY_MS, "serving": SERVING_LATENCY_MS}
TIMING_SPREAD = ("p10_ms", "p90_ms", "noise")
# A student timed again at the end of a search is also timed beside a reference network
# (orchestrator.cost.Relative): <timing>_vs_ref, its time over the reference's, and
# <timing>_vs_ref_p10, _p90, _noise.
RELATIVE_SPREAD = ("p10", "p90", "noise")
COST_DETAIL = tuple(f"{timing}_{part}" for timing in TIMINGS for part in TIMING_SPREAD)


def relative_key(timing: str) -> str:
    """Where a report holds a timing's (a key of :data:`TIMINGS`) ratio to the reference."""
    return f"{timing}_vs_ref"


IJB_SETS = ("IJBB", "IJBC")
IJB_FAR_KEYS = ("1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1")  # the FARs IJB reports


def validation_key(metric: str) -> str:
    """The key of ``metric`` (a :class:`Metric` or ``<val target>_acc``) in a training
    run's per-epoch report."""
    return f"val_{metric}"


def report_key(metric: str) -> str:
    """Where a search trial's report holds ``metric``: a cost by its name, an accuracy as
    its validation key."""
    return metric if metric in COST_METRICS else validation_key(metric)
