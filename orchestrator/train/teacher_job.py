"""The ``teacher`` role (``jobs.train_teacher``): a teacher trained with its own margin
head on the same machinery, exported as a teacher checkpoint with snapshots for
multistep."""

from __future__ import annotations

from dataclasses import replace

from orchestrator import storage
from orchestrator.config import (
    ExperimentConfig,
    Method,
)
from orchestrator.data import format as fmt
from orchestrator.errors import UsageError
from orchestrator.formats.state import TrainingState
from orchestrator.runs import (
    absolute_paths,
    best_uri,
    claim_run,
    ensure_ray,
    run_lock,
    use_object_store_config,
)
from orchestrator.teacher.checkpoint import TeacherCheckpoint, save_teacher
from orchestrator.teacher.classifiers import (
    classifier_from_checkpoint,
    snapshot_uri,
)
from orchestrator.train.checks import check_inputs, checked_run_name, small_batch_warning, warn
from orchestrator.train.resources import preflight
from orchestrator.train.spec import (
    ModelSpec,
    Role,
    TeacherSnapshots,
    TrainSpec,
)
from orchestrator.train.tracked import finish, tracked_fit
from orchestrator.train.trainer import RunOutcome, trained_nothing


def train_teacher(config: ExperimentConfig, name: str | None = None) -> RunOutcome:
    """Train the teacher with its own margin classifier, then export its backbone and head
    to ``teacher.backbone`` and its classifier (contract format) to ``teacher.classifier``."""
    name = checked_run_name(name or f"{config.name}-teacher")
    config = absolute_paths(config)
    use_object_store_config(config)
    meta = check_inputs(config)
    batch = config.teacher_optim.batch_size
    synced = config.run.sync_batchnorm
    warn(small_batch_warning(batch, config.scaling, key="teacher_optim.batch_size", synced=synced))
    ensure_ray()
    preflight(config)
    with run_lock(config, name):
        claim_run(config, name, role=Role.TEACHER.value)
        return train_teacher_locked(config, name, meta)


def train_teacher_locked(config: ExperimentConfig, name: str, meta: fmt.DatasetMeta) -> RunOutcome:
    spec = TrainSpec(
        role=Role.TEACHER,
        model=ModelSpec(config.teacher.arch, config.teacher.emb_dim, config.teacher.dropout),
        loss=replace(config.loss, method=Method.SCRATCH),
        optim=config.teacher_optim,
        num_classes=meta.num_classes,
        num_images=meta.num_images,
        eval_uri=config.data.eval,
        best_uri=best_uri(config, name) if config.run.keep_best else None,
        snapshots=teacher_snapshots(config, meta),
    )
    outcome, tracked = tracked_fit(config, spec, name=name)
    if trained_nothing(outcome) and storage.exists(config.teacher.backbone):
        print(f"[run] {name}: finished already; {config.teacher.backbone} left as it is")
        finish(config, name, outcome, tracked)
        return outcome
    export_teacher(config, outcome.state, meta)
    finish(config, name, outcome, tracked)
    return outcome


def teacher_snapshots(config: ExperimentConfig, meta: fmt.DatasetMeta) -> TeacherSnapshots | None:
    """``teacher.snapshot_epochs``: the intermediate teachers this run keeps, and where."""
    epochs = tuple(sorted(set(config.teacher.snapshot_epochs)))
    beyond = [e for e in epochs if e > config.teacher_optim.epochs]
    if beyond:
        raise UsageError(
            f"teacher.snapshot_epochs {list(epochs)}: epochs {beyond} are past the teacher's "
            f"last, teacher_optim.epochs = {config.teacher_optim.epochs}"
        )
    if not epochs:
        return None
    return TeacherSnapshots(
        epochs=epochs,
        uris=tuple(snapshot_uri(config.teacher.backbone, e) for e in epochs),
        label_map_fingerprint=meta.label_map_fingerprint,
        image_size=config.data.image_size,
    )


def export_teacher(config: ExperimentConfig, state: TrainingState, meta: fmt.DatasetMeta) -> None:
    teacher = TeacherCheckpoint.from_training(
        config.teacher.arch,
        config.teacher.emb_dim,
        image_size=config.data.image_size,
        backbone=state.student,
        loss=state.loss,
        label_map_fingerprint=meta.label_map_fingerprint,
    )
    head = teacher.classifier
    save_teacher(config.teacher.backbone, teacher)
    classifier_from_checkpoint(
        config.teacher.backbone,
        config.teacher.classifier,
        dataset_fingerprint=meta.label_map_fingerprint,
    )
    print(
        f"teacher -> {config.teacher.backbone}; classifier {head.shape[0]} x {head.shape[1]} -> {config.teacher.classifier}"
    )
