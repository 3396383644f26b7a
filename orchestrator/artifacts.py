"""The files a run leaves behind, each with its reader and writer side by side: the training
state of a checkpoint, the exported student (``student.pt``) and this project's teacher
checkpoint. Training, evaluation, export, retraining and tuning all read them from here.

**Nothing loaded here can run code.** Every file is read with ``torch.load(...,
weights_only=True)``: tensors, numbers, strings and the builtin containers only. A file
that asks for anything else (a pickled object whose ``__reduce__`` would call a function)
is refused with :class:`ArtifactError` naming the file and the global it asked for. That
holds for the checkpoints of a run we wrote ourselves too: anyone who can write to the
storage path could otherwise run code in every worker on resume.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from orchestrator import storage
from orchestrator.classifier import ClassifierError
from orchestrator.config import Arch
from orchestrator.data.consumed import EpochProgress

STATE_FILE = "state.pt"
STUDENT_FILE = "student.pt"
STUDENT_KIND = "proxylesskd-student"
TEACHER_KIND = "proxylesskd-teacher"


class ArtifactError(ValueError):
    """A checkpoint, export or teacher file that is unreadable, foreign or unsafe to load."""


@dataclass(frozen=True)
class ClassifierRef:
    """The inherited classifier a run trained against, by location and content."""

    uri: str
    checksum: str


def load_data(source: str | bytes, where: str, what: str) -> Any:
    """``torch.load`` restricted to data (``weights_only=True``), with every failure an
    :class:`ArtifactError` that names ``where`` and what it expected to find.

    torch's own message for a refused global advises loading with ``weights_only=False``;
    that advice is never passed on: a file that needs it is not one of ours.
    """
    handle: str | io.BytesIO = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        wanted = re.search(r"GLOBAL ([\w.]+)", text)
        if wanted:
            raise ArtifactError(
                f"{where}: refusing to load it as {what}: it asks for {wanted.group(1)}, and "
                f"{what} holds only tensors and plain data (nothing in it may run code)"
            ) from None
        reason = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
        detail = reason.group(1) if reason else "unreadable pickle"
        raise ArtifactError(f"{where}: not {what} ({detail})") from None
    except (OSError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ArtifactError(f"{where}: not {what} ({first})") from None


def _kind_checked(data: Any, kind: str, where: str) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("kind") != kind:
        found = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise ArtifactError(f"{where}: expected a {kind} file, found {found!r}")
    return data


def _field(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ArtifactError(f"{where}: missing field {key!r}")
    return data[key]


def _arch(value: Any, where: str) -> Arch:
    try:
        return Arch(value)
    except ValueError:
        known = ", ".join(a.value for a in Arch)
        raise ArtifactError(f"{where}: arch {value!r} is not one of {known}") from None


def _ref(value: Any) -> ClassifierRef | None:
    return None if value is None else ClassifierRef(**value)


def model_from(
    where: str, weights: dict[str, torch.Tensor], *, arch: Arch, emb_dim: int, image_size: int
) -> torch.nn.Module:
    """The backbone ``arch`` with ``weights`` loaded, in eval mode; weights that do not fit
    are an :class:`ArtifactError` naming ``where``."""
    from orchestrator.models import build_backbone

    model = build_backbone(arch, emb_dim, input_size=image_size)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ArtifactError(
            f"{where}: its weights do not fit arch {arch.value} emb_dim {emb_dim} "
            f"({str(err).splitlines()[0]})"
        ) from None
    return model.eval()


# --- training state (inside each Ray Train checkpoint) ---------------------------------


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
    epochs_done: tuple[int, ...] = ()  # every epoch trained, across resumes, in order
    resumed_at: tuple[int, ...] = ()  # the epoch each resume started from
    world_sizes: tuple[int, ...] = ()  # the worker count of each attempt
    train_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    # Per trained epoch (as epochs_done): (samples/s, share of the time waiting for input).
    throughput: tuple[tuple[float, float], ...] = ()
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
            "epochs_done": list(state.epochs_done),
            "resumed_at": list(state.resumed_at),
            "world_sizes": list(state.world_sizes),
            "train_seconds": state.train_seconds,
            "extra": state.extra,
            "throughput": [list(t) for t in state.throughput],
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
            classifier=_ref(data["classifier"]),
            config=data["config"],
            epochs_done=tuple(data["epochs_done"]),
            resumed_at=tuple(data["resumed_at"]),
            world_sizes=tuple(data["world_sizes"]),
            train_seconds=float(data["train_seconds"]),
            throughput=tuple(
                (float(rate), float(wait)) for rate, wait in data.get("throughput", [])
            ),
            extra=dict(data.get("extra", {})),
            progress=None
            if data.get("progress") is None
            else EpochProgress.from_data(data["progress"], where),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{where}: malformed training checkpoint ({err!r})") from None


# --- the best checkpoint of a run (<run>/best/) -------------------------------------------

BEST_DIR = "best"
BEST_RECORD = "best.json"


@dataclass(frozen=True)
class BestRecord:
    """Which epoch's state ``<run>/best/`` holds, and its validation ``metric`` (higher is
    better for every :class:`orchestrator.config.Metric`)."""

    metric: str
    epoch: int
    value: float

    @property
    def state_file(self) -> str:
        return f"state_epoch{self.epoch:04d}.pt"

    def improved_by(self, metric: str, value: float) -> bool:
        """A new validation beats this one (a record of another metric is always beaten:
        the run's ``run.best_metric`` changed)."""
        return metric != self.metric or value > self.value


def write_best(uri: str, state: TrainingState, record: BestRecord) -> None:
    """Publish-last: the new state under its own name, then the record that names it,
    then the old state goes. A crash at any point leaves a record and the state it names."""
    old = read_best(uri)
    storage.write_bytes_atomic(storage.join(uri, record.state_file), state_bytes(state))
    storage.write_text_atomic(storage.join(uri, BEST_RECORD), json.dumps(vars(record)))
    if old is not None and old.state_file != record.state_file:
        storage.delete(storage.join(uri, old.state_file))


def read_best(uri: str) -> BestRecord | None:
    """The record of ``<run>/best`` (None before a run's first validation)."""
    where = storage.join(uri, BEST_RECORD)
    if not storage.exists(where):
        return None
    try:
        data = json.loads(storage.read_text(where))
        return BestRecord(str(data["metric"]), int(data["epoch"]), float(data["value"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{where}: malformed best-checkpoint record ({err!r})") from None


def load_best_state(uri: str, record: BestRecord) -> TrainingState:
    where = storage.join(uri, record.state_file)
    return state_from_data(
        load_data(storage.read_bytes(where), where, "a training checkpoint"), where
    )


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


# --- the exported student (student.pt) ---------------------------------------------------


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

    @classmethod
    def from_state(
        cls, state: TrainingState, *, arch: Arch, emb_dim: int, image_size: int
    ) -> StudentExport:
        return cls(
            arch=arch,
            emb_dim=emb_dim,
            image_size=image_size,
            student=state.student,
            classifier=state.classifier,
            config=state.config,
            epochs_done=state.epochs_done,
            train_seconds=state.train_seconds,
            throughput=state.throughput,
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
        },
        buffer,
    )
    storage.write_bytes_atomic(uri, buffer.getvalue())


def read_student_export(uri: str) -> StudentExport:
    if not storage.exists(uri):
        raise FileNotFoundError(f"student export {uri} does not exist (jobs.distill writes it)")
    data = _kind_checked(
        load_data(storage.read_bytes(uri), uri, "a student export"), STUDENT_KIND, uri
    )
    try:
        return StudentExport(
            arch=_arch(_field(data, "arch", uri), uri),
            emb_dim=int(_field(data, "emb_dim", uri)),
            image_size=int(_field(data, "image_size", uri)),
            student=_field(data, "student", uri),
            classifier=_ref(data.get("classifier")),
            config=dict(data.get("config") or {}),
            epochs_done=tuple(data.get("epochs_done") or ()),
            train_seconds=float(data.get("train_seconds") or 0.0),
            throughput=tuple((float(r), float(w)) for r, w in data.get("throughput", [])),
        )
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{uri}: malformed student export ({err})") from None


# --- this project's teacher checkpoint ---------------------------------------------------

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
    import zipfile

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
    saved = _kind_checked(data, TEACHER_KIND, uri)
    try:
        return TeacherCheckpoint(
            arch=_arch(_field(saved, "arch", uri), uri),
            emb_dim=int(_field(saved, "emb_dim", uri)),
            image_size=int(_field(saved, "image_size", uri)),
            backbone=_field(saved, "backbone", uri),
            classifier=_field(saved, "classifier", uri),
            label_map_fingerprint=str(_field(saved, "label_map_fingerprint", uri)),
        )
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{uri}: malformed teacher checkpoint ({err})") from None
