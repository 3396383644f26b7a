"""Student and teacher training checkpoints.

A checkpoint holds the student, the loss's own trainable parameters (baselines only), the
optimizer, the epoch and the run history. The inherited teacher classifier is **never** in
it: the checkpoint names it by URI and checksum, and a resume refuses a classifier whose
checksum differs. Nothing in it depends on the number of workers.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from orchestrator import storage
from orchestrator.classifier import ClassifierError

STATE_FILE = "state.pt"
STUDENT_FILE = "student.pt"


@dataclass(frozen=True)
class ClassifierRef:
    uri: str
    checksum: str


@dataclass(frozen=True)
class TrainingState:
    epoch: int  # last completed epoch
    student: dict[str, torch.Tensor]
    loss: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    classifier: ClassifierRef | None
    config: dict[str, Any]
    epochs_done: tuple[int, ...] = ()  # every epoch trained, across resumes, in order
    resumed_at: tuple[int, ...] = ()  # the epoch each resume started from
    world_sizes: tuple[int, ...] = ()  # the worker count of each attempt
    train_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def save_state(directory: str, state: TrainingState) -> None:
    torch.save(
        {
            "epoch": state.epoch,
            "student": state.student,
            "loss": state.loss,
            "optimizer": state.optimizer,
            "classifier": None if state.classifier is None else vars(state.classifier),
            "config": state.config,
            "epochs_done": list(state.epochs_done),
            "resumed_at": list(state.resumed_at),
            "world_sizes": list(state.world_sizes),
            "train_seconds": state.train_seconds,
            "extra": state.extra,
        },
        os.path.join(directory, STATE_FILE),
    )


def load_state(directory: str) -> TrainingState:
    data = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False)
    ref = data["classifier"]
    return TrainingState(
        epoch=int(data["epoch"]),
        student=data["student"],
        loss=data["loss"],
        optimizer=data["optimizer"],
        classifier=None if ref is None else ClassifierRef(**ref),
        config=data["config"],
        epochs_done=tuple(data["epochs_done"]),
        resumed_at=tuple(data["resumed_at"]),
        world_sizes=tuple(data["world_sizes"]),
        train_seconds=float(data["train_seconds"]),
        extra=dict(data.get("extra", {})),
    )


def verify_classifier(
    saved: ClassifierRef | None, current: ClassifierRef | None, where: str
) -> None:
    """A resume must use the very classifier the checkpoint was trained against."""
    if saved is None and current is None:
        return
    if saved is None or current is None or saved.checksum != current.checksum:
        raise ClassifierError(
            f"{where} was trained against classifier {saved} but this run uses {current}: "
            "refusing to resume with a different inherited classifier"
        )


def export_student(
    uri: str, state: TrainingState, arch: str, emb_dim: int, image_size: int
) -> None:
    """The final student alone (no optimizer), for evaluation and export."""
    buffer = io.BytesIO()
    torch.save(
        {
            "kind": "proxylesskd-student",
            "version": 1,
            "arch": arch,
            "emb_dim": emb_dim,
            "image_size": image_size,
            "student": state.student,
            "classifier": None if state.classifier is None else vars(state.classifier),
            "config": state.config,
            "epochs_done": list(state.epochs_done),
            "train_seconds": state.train_seconds,
        },
        buffer,
    )
    storage.write_bytes_atomic(uri, buffer.getvalue())


def load_student_export(uri: str) -> dict[str, Any]:
    data = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("kind") != "proxylesskd-student":
        raise ValueError(f"{uri}: not a proxylesskd-student export")
    return data
