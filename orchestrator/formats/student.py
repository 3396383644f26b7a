"""The exported student (``student.pt``): its writer, its reader and
:func:`load_student`, the model ready to embed."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orchestrator import storage
from orchestrator.config import NAMED_SHAPES, Arch, BackboneShape
from orchestrator.config.family import as_dict, shape_from_dict
from orchestrator.formats.loading import (
    ArtifactError,
    ClassifierRef,
    arch_of,
    classifier_ref,
    kind_checked,
    load_data,
    model_from,
    required_field,
)
from orchestrator.formats.state import TrainingState

STUDENT_FILE = "student.pt"
STUDENT_KIND = "proxylesskd-student"


@dataclass(frozen=True)
class StudentExport:
    """The final student alone (no optimizer), for evaluation, export and promotion."""

    arch: Arch
    emb_dim: int
    image_size: int
    student: dict[str, torch.Tensor]
    classifier: ClassifierRef | None
    config: dict[str, Any]
    epochs_done: tuple[int, ...]
    train_seconds: float
    throughput: tuple[tuple[float, float], ...] = ()  # per epoch: samples/s, input wait share
    shape: BackboneShape | None = None  # None: the arch's named point of the family

    @classmethod
    def from_state(
        cls,
        state: TrainingState,
        *,
        arch: Arch,
        emb_dim: int,
        image_size: int,
        shape: BackboneShape | None = None,
    ) -> StudentExport:
        return cls(
            arch=arch,
            shape=shape,
            emb_dim=emb_dim,
            image_size=image_size,
            student=state.student,
            classifier=state.classifier,
            config=state.config,
            epochs_done=state.history.epochs_done,
            train_seconds=state.history.train_seconds,
            throughput=state.history.throughput,
        )


def write_student_export(uri: str, export: StudentExport) -> None:
    buffer = io.BytesIO()
    torch.save(
        {
            "kind": STUDENT_KIND,
            "version": 1,
            "arch": export.arch.value,
            "emb_dim": export.emb_dim,
            "image_size": export.image_size,
            "student": export.student,
            "classifier": None if export.classifier is None else vars(export.classifier),
            "config": export.config,
            "epochs_done": list(export.epochs_done),
            "train_seconds": export.train_seconds,
            "throughput": [list(t) for t in export.throughput],
            # The point of the student family (absent in exports of before the family:
            # the arch's named point).
            "shape": as_dict(export.shape or NAMED_SHAPES[export.arch.value]),
        },
        buffer,
    )
    storage.write_bytes_atomic(uri, buffer.getvalue())


def read_student_export(uri: str) -> StudentExport:
    if not storage.exists(uri):
        raise FileNotFoundError(f"student export {uri} does not exist (jobs.distill writes it)")
    data = kind_checked(
        load_data(storage.read_bytes(uri), uri, "a student export"), STUDENT_KIND, uri
    )
    try:
        return StudentExport(
            arch=arch_of(required_field(data, "arch", uri), uri),
            emb_dim=int(required_field(data, "emb_dim", uri)),
            image_size=int(required_field(data, "image_size", uri)),
            student=required_field(data, "student", uri),
            classifier=classifier_ref(data.get("classifier")),
            config=dict(data.get("config") or {}),
            epochs_done=tuple(data.get("epochs_done") or ()),
            train_seconds=float(data.get("train_seconds") or 0.0),
            throughput=tuple((float(r), float(w)) for r, w in data.get("throughput", [])),
            shape=None if data.get("shape") is None else shape_from_dict(data["shape"], uri),
        )
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{uri}: malformed student export ({err})") from None


def load_student(uri: str) -> tuple[nn.Module, StudentExport]:
    """A student exported by jobs.distill (student.pt), in eval mode, and its metadata."""
    export = read_student_export(uri)
    model = model_from(
        uri,
        export.student,
        arch=export.arch,
        emb_dim=export.emb_dim,
        image_size=export.image_size,
        shape=export.shape,
    )
    return model, export
