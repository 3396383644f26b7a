"""What a worker trains: the typed hand-over from the driver to ``train_loop_per_worker``.

The driver resolves everything that depends on the role (teacher or student) and on where
the inherited classifier lives, so the worker reads one spec and never has to know which
part of the experiment config applied.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any

from orchestrator.classifier import ClassifierMeta
from orchestrator.config import (
    Arch,
    BackboneShape,
    LossConfig,
    OptimConfig,
    TeacherConfig,
    started_by,
)
from orchestrator.formats.loading import ClassifierRef


class Role(enum.StrEnum):
    TEACHER = "teacher"  # jobs.train_teacher: the teacher config, its own margin classifier
    STUDENT = "student"  # jobs.distill: the student config and loss.method


@dataclass(frozen=True)
class ModelSpec:
    arch: Arch
    emb_dim: int
    dropout: float
    shape: BackboneShape | None = None  # None: the arch's named point of the family


@dataclass(frozen=True)
class DenseClassifier:
    """All of W on every worker: one shared, read-only copy per node in the object store
    (unit rows, float32)."""

    ref: ClassifierRef
    weights: Any  # ray.ObjectRef of the (C, d) array


@dataclass(frozen=True)
class ShardedClassifier:
    """Each worker reads only its own rows of W from storage (:class:`orchestrator.shards.Shard`)."""

    ref: ClassifierRef
    meta: ClassifierMeta
    sample_rate: float  # below 1.0 the softmax is an approximation (negative sampling)


ClassifierSource = DenseClassifier | ShardedClassifier


@dataclass(frozen=True)
class TeacherStage:
    """``multistep``: from student epoch ``from_epoch`` (0-based) the teacher is the file
    ``backbone`` (resolved by the driver from ``loss.multistep.schedule``)."""

    from_epoch: int
    backbone: str


@dataclass(frozen=True)
class TeacherSnapshots:
    """Role teacher: rank 0 also saves the backbone after each of ``epochs`` (1-based) to
    ``uris[i]``, as a teacher checkpoint of its own (``teacher.snapshot_epochs``)."""

    epochs: tuple[int, ...]
    uris: tuple[str, ...]
    label_map_fingerprint: str
    image_size: int

    def uri_after(self, epoch: int) -> str | None:
        """Where the snapshot of 0-based ``epoch`` goes, if one is kept."""
        return dict(zip(self.epochs, self.uris, strict=True)).get(epoch + 1)


@dataclass(frozen=True)
class TrainSpec:
    role: Role
    model: ModelSpec
    loss: LossConfig
    optim: OptimConfig
    num_classes: int
    num_images: int
    classifier: ClassifierSource | None = None  # the teacher's W, when the method uses it
    teacher: TeacherConfig | None = None  # its backbone, when the method needs teacher embeddings
    eval_uri: str | None = None
    best_uri: str | None = None  # <run>/best: the best validated state is kept there
    teacher_stages: tuple[TeacherStage, ...] = ()  # multistep: the teacher per student epoch
    snapshots: TeacherSnapshots | None = None  # role teacher: intermediate backbones kept

    def teacher_at(self, epoch: int) -> TeacherConfig | None:
        """The teacher student epoch ``epoch`` (0-based) distils from: ``teacher``, with the
        backbone of its stage for ``multistep``."""
        if self.teacher is None or not self.teacher_stages:
            return self.teacher
        stages = self.teacher_stages
        stage = stages[started_by([s.from_epoch for s in stages], epoch)]
        return replace(self.teacher, backbone=stage.backbone)

    @property
    def classifier_ref(self) -> ClassifierRef | None:
        return None if self.classifier is None else self.classifier.ref

    @property
    def tag(self) -> str:
        return self.role.value

    def provenance(self) -> dict[str, Any]:
        """What a checkpoint records about how it was trained (beyond the config)."""
        out: dict[str, Any] = {
            "role": self.role.value,
            "arch": self.model.arch.value,
            "emb_dim": self.model.emb_dim,
        }
        if self.role is Role.STUDENT:
            out["method"] = self.loss.method.value
        match self.classifier:
            case DenseClassifier():
                out["classifier_layout"] = "dense"
            case ShardedClassifier(sample_rate=rate):
                out["classifier_layout"] = "sharded"
                out["approximate_softmax"] = rate < 1.0
                out["sample_rate"] = rate
        return out
