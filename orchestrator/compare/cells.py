"""The cells of a comparison (a method at a seed), where their runs and summary live, and
the names of the summary's columns."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator import storage
from orchestrator.config import ExperimentConfig, Method

SUMMARY_DIR = "summary"
CROSS_MODEL = "cross_model_acc_10fold"  # teacher gallery, student probes
CROSS_MODEL_RANK1 = "cross_model_rank1"  # the same search, rank-1 identification
TEACHER_ROW = "teacher"  # the reference row of each table (the teacher, one evaluation)
IMAGES_PER_S = "images_per_s"  # training rate, mean over the run's epochs


def compare_path(config: ExperimentConfig) -> str:
    root = config.compare.storage_path or storage.join(config.storage_path, "compare")
    return storage.join(root, config.name)


def run_name(config: ExperimentConfig, method: Method | str, seed: int) -> str:
    """The training run of one cell of the grid (its student: <storage>/<run>/student.pt)."""
    return f"{config.name}-{Method(method).value}-seed{seed}"


@dataclass(frozen=True)
class Cell:
    method: str
    seed: int
    run: str
    status: str  # completed | error | missing
    student: str | None
    metrics: dict[str, float | None]  # metric name -> value on the held-out set
    error: str | None = None


@dataclass(frozen=True)
class Comparison:
    cells: list[Cell]
    columns: list[str]  # the measured quantities, in table order
    report: str  # Markdown (report.md)
    summary: str  # URI of the summary directory
