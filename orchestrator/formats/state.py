"""The training state inside each Ray Train checkpoint (``state.pt``), with the run's
history as one typed record, and the check that a resume uses the same classifier."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from orchestrator.classifier import ClassifierError
from orchestrator.data.consumed import EpochProgress
from orchestrator.formats.loading import ArtifactError, ClassifierRef, classifier_ref, load_data

STATE_FILE = "state.pt"
# The history's per-epoch teachers and per-resume steps sit in the file's "extra" (where
# older checkpoints put them); everything else in it is provenance.
TEACHER_BY_EPOCH = "teacher_by_epoch"
RESUMED_AT_STEP = "resumed_at_step"
# Per trained epoch: its figures as logged to the tracker (loss, lr, images/s, input
# start-up and wait share, global step, and the validation metrics of an epoch validated).
EPOCH_METRICS = "epoch_metrics"


@dataclass(frozen=True)
class RunHistory:
    """A run's history across its attempts (each start or resume is an attempt)."""

    epochs_done: tuple[int, ...] = ()  # every epoch trained, across resumes, in order
    resumed_at: tuple[int, ...] = ()  # the epoch each resume started from
    world_sizes: tuple[int, ...] = ()  # the worker count of each attempt
    train_seconds: float = 0.0
    # Per trained epoch (as epochs_done): (samples/s, share of the time waiting for input).
    throughput: tuple[tuple[float, float], ...] = ()
    # Per trained epoch: the teacher file it distilled from ("" for none); multistep
    # changes it along its schedule.
    teachers: tuple[str, ...] = ()
    # Per resume (as resumed_at): the steps of that epoch already done (0: at its start).
    resumed_steps: tuple[int, ...] = ()
    # Per trained epoch whose figures were recorded (the last ones: older checkpoints
    # recorded none): {"epoch": e, "step": global step, "loss": ..., "val_auc": ...}.
    curves: tuple[dict[str, float], ...] = ()

    def measured_throughput(self) -> list[tuple[int, tuple[float, float]]]:
        """(epoch, (samples/s, input wait share)) of the epochs whose throughput was
        recorded (the last ones: older checkpoints recorded none)."""
        measured = self.epochs_done[len(self.epochs_done) - len(self.throughput) :]
        return list(zip(measured, self.throughput, strict=True))

    def to_data(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "epochs_done": list(self.epochs_done),
            "resumed_at": list(self.resumed_at),
            "world_sizes": list(self.world_sizes),
            "train_seconds": self.train_seconds,
            "throughput": [list(t) for t in self.throughput],
            "extra": {
                **extra,
                TEACHER_BY_EPOCH: list(self.teachers),
                RESUMED_AT_STEP: list(self.resumed_steps),
                EPOCH_METRICS: [dict(c) for c in self.curves],
            },
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> RunHistory:
        extra = data.get("extra", {})
        return cls(
            epochs_done=tuple(data["epochs_done"]),
            resumed_at=tuple(data["resumed_at"]),
            world_sizes=tuple(data["world_sizes"]),
            train_seconds=float(data["train_seconds"]),
            throughput=tuple(
                (float(rate), float(wait)) for rate, wait in data.get("throughput", [])
            ),
            teachers=tuple(str(t) for t in extra.get(TEACHER_BY_EPOCH, ())),
            resumed_steps=tuple(int(s) for s in extra.get(RESUMED_AT_STEP, ())),
            curves=tuple(
                {str(k): float(v) for k, v in c.items()} for c in extra.get(EPOCH_METRICS, ())
            ),
        )


@dataclass(frozen=True)
class TrainingState:
    """What a checkpoint holds: the student, the loss's own trainable parameters
    (baselines only), the optimizer, the epoch and the run history.

    The inherited teacher classifier is **never** in it: the state names it by URI and
    checksum, and a resume refuses a classifier whose checksum differs. Nothing in it
    depends on the number of workers.
    """

    epoch: int  # last completed epoch
    student: dict[str, torch.Tensor]
    loss: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    classifier: ClassifierRef | None
    config: dict[str, Any]
    history: RunHistory = RunHistory()
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (the run's spec)
    # A checkpoint inside an epoch (run.checkpoint_every_steps): how far into epoch + 1 the
    # run is and which of its images are trained on. None at the end of an epoch.
    progress: EpochProgress | None = None


def save_state(directory: str, state: TrainingState) -> None:
    with open(os.path.join(directory, STATE_FILE), "wb") as handle:
        handle.write(state_bytes(state))


def state_bytes(state: TrainingState) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {
            "epoch": state.epoch,
            "student": state.student,
            "loss": state.loss,
            "optimizer": state.optimizer,
            "classifier": None if state.classifier is None else vars(state.classifier),
            "config": state.config,
            **state.history.to_data(state.extra),
            "progress": None if state.progress is None else state.progress.to_data(),
        },
        buffer,
    )
    return buffer.getvalue()


def load_state(directory: str) -> TrainingState:
    where = os.path.join(directory, STATE_FILE)
    return state_from_data(load_data(where, where, "a training checkpoint"), where)


def state_from_data(data: Any, where: str) -> TrainingState:
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: expected a training checkpoint, found {type(data).__name__}")
    try:
        return TrainingState(
            epoch=int(data["epoch"]),
            student=data["student"],
            loss=data["loss"],
            optimizer=data["optimizer"],
            classifier=classifier_ref(data["classifier"]),
            config=data["config"],
            history=RunHistory.from_data(data),
            extra={
                key: value
                for key, value in dict(data.get("extra", {})).items()
                if key not in (TEACHER_BY_EPOCH, RESUMED_AT_STEP, EPOCH_METRICS)
            },
            progress=None
            if data.get("progress") is None
            else EpochProgress.from_data(data["progress"], where),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{where}: malformed training checkpoint ({err!r})") from None


def verify_same_classifier(
    saved: ClassifierRef | None, current: ClassifierRef | None, *, where: str
) -> None:
    """A resume must use the very classifier the checkpoint was trained against."""
    if saved is None and current is None:
        return
    if saved is None or current is None or saved.checksum != current.checksum:
        raise ClassifierError(
            f"{where} was trained against classifier {saved} but this run uses {current}: "
            "refusing to resume with a different inherited classifier"
        )
