"""This project's teacher checkpoint (a backbone and its trained margin head), as the
``teacher`` role writes it."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator import storage
from orchestrator.config import Arch
from orchestrator.formats.loading import (
    ArtifactError,
    arch_of,
    kind_checked,
    load_data,
    required_field,
)

TEACHER_KIND = "proxylesskd-teacher"
TEACHER_HEAD_KEY = "classifier.weight"  # the trained head in the training loss's state dict


@dataclass(frozen=True)
class TeacherCheckpoint:
    arch: Arch
    emb_dim: int
    image_size: int
    backbone: dict[str, torch.Tensor]
    classifier: torch.Tensor  # (C, d), the trained head
    label_map_fingerprint: str

    @classmethod
    def from_training(
        cls,
        arch: Arch,
        emb_dim: int,
        *,
        image_size: int,
        backbone: dict[str, torch.Tensor],
        loss: dict[str, torch.Tensor],
        label_map_fingerprint: str,
    ) -> TeacherCheckpoint:
        """A teacher from the role-teacher training state: the backbone's weights and the
        state dict of its margin loss, whose trained head is the classifier."""
        if TEACHER_HEAD_KEY not in loss:
            raise ArtifactError(
                f"the teacher's training loss holds no {TEACHER_HEAD_KEY!r} (found "
                f"{sorted(loss)}): was it trained with a margin loss of its own?"
            )
        return cls(
            arch=arch,
            emb_dim=emb_dim,
            image_size=image_size,
            backbone=backbone,
            classifier=loss[TEACHER_HEAD_KEY],
            label_map_fingerprint=label_map_fingerprint,
        )


def save_teacher(uri: str, teacher: TeacherCheckpoint) -> None:
    """Write atomically to a local path or an object-store URI."""
    buffer = io.BytesIO()
    torch.save(
        {
            "kind": TEACHER_KIND,
            "version": 1,
            "arch": teacher.arch.value,
            "emb_dim": teacher.emb_dim,
            "image_size": teacher.image_size,
            "backbone": teacher.backbone,
            "classifier": teacher.classifier,
            "label_map_fingerprint": teacher.label_map_fingerprint,
        },
        buffer,
    )
    storage.write_bytes_atomic(uri, buffer.getvalue())


def read_teacher_bytes(uri: str) -> bytes:
    if not storage.exists(uri):
        raise FileNotFoundError(f"teacher {uri} does not exist (train one with jobs.train_teacher)")
    return storage.read_bytes(uri)


def archive_kind(data: bytes) -> str | None:
    """A look at the file's zip directory (nothing is unpickled): ``"torchscript"`` for a
    TorchScript module (it has a ``code/`` folder), ``"checkpoint"`` for a ``torch.save``
    archive, None for anything else."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return None
    return "torchscript" if any("/code/" in n for n in names) else "checkpoint"


def load_teacher(uri: str, data: bytes | None = None) -> TeacherCheckpoint:
    """This project's teacher checkpoint from a local path or an object-store URI."""
    raw = read_teacher_bytes(uri) if data is None else data
    return teacher_from_data(load_data(raw, uri, "a teacher checkpoint"), uri)


def teacher_from_data(data: Any, uri: str) -> TeacherCheckpoint:
    """A teacher checkpoint from what :func:`load_data` read out of ``uri``."""
    saved = kind_checked(data, TEACHER_KIND, uri)
    try:
        return TeacherCheckpoint(
            arch=arch_of(required_field(saved, "arch", uri), uri),
            emb_dim=int(required_field(saved, "emb_dim", uri)),
            image_size=int(required_field(saved, "image_size", uri)),
            backbone=required_field(saved, "backbone", uri),
            classifier=required_field(saved, "classifier", uri),
            label_map_fingerprint=str(required_field(saved, "label_map_fingerprint", uri)),
        )
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{uri}: malformed teacher checkpoint ({err})") from None
