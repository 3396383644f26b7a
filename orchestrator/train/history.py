"""The run's history across attempts (epochs trained, resumes, world sizes, time,
throughput, teachers): carried by every checkpoint, extended after every epoch."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from orchestrator.artifacts import (
    TrainingState,
)


@dataclass(frozen=True)
class History:
    epochs_done: tuple[int, ...]
    resumed_at: tuple[int, ...]
    world_sizes: tuple[int, ...]
    train_seconds: float
    throughput: tuple[tuple[float, float], ...] = ()  # per epoch: samples/s, input wait share
    # Per trained epoch: the teacher file it distilled from ("" for none); multistep
    # changes it along its schedule. Kept in the checkpoint's extra as teacher_by_epoch.
    teachers: tuple[str, ...] = ()
    # Per resume (as resumed_at): the steps of that epoch already done (0: at its start).
    resumed_steps: tuple[int, ...] = ()

    @classmethod
    def start(cls, previous: TrainingState | None, world_size: int) -> History:
        """A new attempt: from scratch, or resumed at the epoch after ``previous``'s."""
        if previous is None:
            return cls((), (), (world_size,), 0.0)
        inside = previous.progress.steps if previous.progress is not None else 0
        return cls(
            previous.epochs_done,
            (*previous.resumed_at, previous.epoch + 1),
            (*previous.world_sizes, world_size),
            previous.train_seconds,
            previous.throughput,
            tuple(previous.extra.get(TEACHER_BY_EPOCH, ())),
            (*previous.extra.get(RESUMED_AT_STEP, ()), inside),
        )

    def after_epoch(self, epoch: int, stats: EpochStats, teacher: str | None = None) -> History:
        return replace(
            self,
            epochs_done=(*self.epochs_done, epoch),
            train_seconds=self.train_seconds + stats.seconds,
            throughput=(*self.throughput, (stats.samples_per_s, stats.input_wait_share)),
            teachers=(*self.teachers, teacher or ""),
        )


TEACHER_BY_EPOCH = "teacher_by_epoch"


RESUMED_AT_STEP = "resumed_at_step"


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    losses: tuple[float, ...] = ()
    seconds: float = 0.0
    lr: float = float("nan")
    global_batch: int = 0
    input_wait_s: float = 0.0  # time blocked on the input iterator, after the first batch
    input_startup_s: float = 0.0  # the wait for the first batch (the pipeline's start-up)
    after_first_step_s: float = 0.0  # the epoch's time after its first step

    @classmethod
    def measured(
        cls,
        epoch: int,
        losses: list[float],
        *,
        started: float,
        first_step_done: float,
        lr: float,
        global_batch: int,
        input_waited: float,
        input_first_wait: float,
    ) -> EpochStats:
        """The stats of an epoch that ends now (``time.monotonic``), from its losses and the
        times it started and finished its first step."""
        ended = time.monotonic()
        return cls(
            epoch=epoch,
            losses=tuple(losses),
            seconds=ended - started,
            after_first_step_s=ended - first_step_done if losses else 0.0,
            lr=lr,
            global_batch=global_batch,
            input_wait_s=input_waited - input_first_wait,
            input_startup_s=input_first_wait,
        )

    @property
    def steady_samples_per_s(self) -> float:
        """The rate after the first step (start-up, first-batch compilation and allocation
        left out): what the loop sustains."""
        steps = len(self.losses) - 1
        return steps * self.global_batch / self.after_first_step_s if steps > 0 else 0.0

    @property
    def input_wait_share(self) -> float:
        """The share of the epoch after its first batch that this worker spent waiting for
        input (0..1): near 0 compute-bound, near 1 input-bound. The start-up before the
        first batch is ``input_startup_s``, apart: on short epochs it would swamp the rest."""
        return self.input_wait_s / max(self.seconds - self.input_startup_s, 1e-9)

    @property
    def mean_loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")

    @property
    def samples_per_s(self) -> float:
        return len(self.losses) * self.global_batch / max(self.seconds, 1e-9)


def report_metrics(
    history: History,
    stats: EpochStats,
    *,
    start_epoch: int,
    validation: dict[str, float],
    best_epoch: int | None,
) -> dict[str, Any]:
    """What every rank reports after an epoch: the history so far, the epoch's own figures
    (when one was trained: not on the rerun of a finished run), the latest validation
    metrics and the epoch ``<run>/best`` holds."""
    metrics: dict[str, Any] = {
        "epoch": stats.epoch,
        "epochs_done": list(history.epochs_done),
        "resumed_at": list(history.resumed_at),
        "resumed_at_step": list(history.resumed_steps),
        "world_sizes": list(history.world_sizes),
        "train_seconds": history.train_seconds,
        # Epochs trained by this attempt (0: a rerun of a finished run trained nothing).
        "epochs_this_attempt": stats.epoch + 1 - start_epoch if stats.global_batch else 0,
        **validation,
        **({} if best_epoch is None else {"best_epoch": best_epoch}),
    }
    if stats.global_batch:
        metrics.update(loss=stats.mean_loss, samples_per_s=stats.samples_per_s, lr=stats.lr)
        metrics.update(
            input_wait_share=stats.input_wait_share,
            input_startup_s=stats.input_startup_s,
            steady_samples_per_s=stats.steady_samples_per_s,
        )
    return metrics
