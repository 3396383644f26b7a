"""What one worker trains with (:class:`WorkerState`, built by the set-up in
:mod:`orchestrator.train.worker`) and what one epoch measured (:class:`EpochStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from orchestrator.config import ExperimentConfig
from orchestrator.data.consumed import EpochProgress
from orchestrator.formats.best import BestRecord
from orchestrator.formats.state import RunHistory, TrainingState
from orchestrator.train.schedule import Schedule
from orchestrator.train.spec import TrainSpec
from orchestrator.train.validation import Validator


@dataclass
class WorkerState:
    """Everything one worker trains with; ``history`` and the validation cache change as
    epochs go by."""

    spec: TrainSpec
    config: ExperimentConfig
    rank: int
    world_size: int
    device: torch.device
    student: nn.Module  # wrapped in DDP
    loss_fn: nn.Module
    teacher: nn.Module | None
    teacher_backbone: str | None  # the file ``teacher`` was loaded from
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    data: Any  # this worker's ray.data DataIterator
    previous: TrainingState | None
    history: RunHistory
    run_uri: str  # <storage_path>/<run name>
    # Inside the epoch a checkpoint was taken in: its steps and trained images so far.
    progress: EpochProgress | None = None
    validation: dict[str, float] = field(default_factory=dict)
    validator: Validator | None = None  # rank 0, with data.eval
    best: BestRecord | None = None  # rank 0: what <run>/best holds

    @property
    def start_epoch(self) -> int:
        return 0 if self.previous is None else self.previous.epoch + 1

    @property
    def tag(self) -> str:
        return run_tag(self.spec, self.config)


def run_tag(spec: TrainSpec, config: ExperimentConfig) -> str:
    """The prefix of a worker's lines: its role and the run's config name."""
    return f"[{spec.tag} {config.name}]"
