"""The run's history across attempts (epochs trained, resumes, world sizes, time,
throughput, teachers): carried by every checkpoint, extended after every epoch."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from orchestrator.formats.state import RunHistory, TrainingState


def history_at_start(previous: TrainingState | None, world_size: int) -> RunHistory:
    """A new attempt's history: from scratch, or resumed at the epoch after ``previous``'s
    (inside it when ``previous`` was a checkpoint inside an epoch)."""
    if previous is None:
        return RunHistory(world_sizes=(world_size,))
    history = previous.history
    inside = previous.progress.steps if previous.progress is not None else 0
    return replace(
        history,
        resumed_at=(*history.resumed_at, previous.epoch + 1),
        world_sizes=(*history.world_sizes, world_size),
        resumed_steps=(*history.resumed_steps, inside),
    )


def after_epoch(
    history: RunHistory, epoch: int, stats: EpochStats, teacher: str | None = None, *, step: int = 0
) -> RunHistory:
    """``history`` with ``epoch`` trained (distilling from ``teacher``, if any), ending at
    the run's optimizer step ``step``."""
    return replace(
        history,
        epochs_done=(*history.epochs_done, epoch),
        train_seconds=history.train_seconds + stats.seconds,
        throughput=(*history.throughput, (stats.samples_per_s, stats.input_wait_share)),
        teachers=(*history.teachers, teacher or ""),
        curves=(*history.curves, epoch_curve(epoch, stats, step=step)),
    )


def epoch_curve(epoch: int, stats: EpochStats, *, step: int) -> dict[str, float]:
    """The figures of one trained epoch that the tracker draws as curves."""
    return {
        "epoch": float(epoch),
        "step": float(step),
        "loss": stats.mean_loss,
        "lr": stats.lr,
        "samples_per_s": stats.samples_per_s,
        "input_startup_s": stats.input_startup_s,
        "input_wait_share": stats.input_wait_share,
    }


def with_validation(history: RunHistory, epoch: int, metrics: dict[str, float]) -> RunHistory:
    """``history`` with the validation metrics measured after ``epoch`` added to that
    epoch's figures (unchanged when ``epoch`` is not the last one recorded)."""
    if not history.curves or history.curves[-1]["epoch"] != epoch:
        return history
    last = {**history.curves[-1], **{k: float(v) for k, v in metrics.items()}}
    return replace(history, curves=(*history.curves[:-1], last))


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
    history: RunHistory,
    stats: EpochStats,
    *,
    start_epoch: int,
    validation: dict[str, float],
    best_epoch: int | None,
    validated: bool = False,
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
    if stats.global_batch and history.curves:
        # The tracker's step for this epoch, and whether its validation is new.
        metrics.update(global_step=int(history.curves[-1]["step"]), validated=validated)
    if stats.global_batch:
        metrics.update(loss=stats.mean_loss, samples_per_s=stats.samples_per_s, lr=stats.lr)
        metrics.update(
            input_wait_share=stats.input_wait_share,
            input_startup_s=stats.input_startup_s,
            steady_samples_per_s=stats.steady_samples_per_s,
        )
    return metrics
