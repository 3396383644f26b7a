"""What a worker writes besides Ray's reports: the training state of a checkpoint and of
``<run>/best`` (when an epoch beats it), the teacher snapshots of a ``teacher`` role run,
and the classifier-rows audit (:mod:`orchestrator.audit`)."""

from __future__ import annotations

import torch
from torch import nn

from orchestrator.audit import write_rows_audit
from orchestrator.config import to_dict
from orchestrator.data.consumed import EpochProgress
from orchestrator.formats.best import write_best
from orchestrator.formats.state import TrainingState, verify_same_classifier
from orchestrator.shards import Shard
from orchestrator.teacher.checkpoint import TeacherCheckpoint, save_teacher
from orchestrator.train.distributed import unwrap
from orchestrator.train.history import with_validation
from orchestrator.train.spec import TeacherSnapshots, TrainSpec
from orchestrator.train.state import WorkerState
from orchestrator.train.validation import new_best


def save_snapshot(state: WorkerState, snapshots: TeacherSnapshots, epoch: int) -> None:
    """Role teacher, rank 0: the backbone and head after ``epoch``, when it is kept."""
    uri = snapshots.uri_after(epoch)
    if uri is None:
        return
    model = state.spec.model
    save_teacher(
        uri,
        TeacherCheckpoint.from_training(
            model.arch,
            model.emb_dim,
            image_size=snapshots.image_size,
            backbone=unwrap(state.student).state_dict(),
            loss=state.loss_fn.state_dict(),
            label_map_fingerprint=snapshots.label_map_fingerprint,
        ),
    )
    print(f"{state.tag} teacher after epoch {epoch + 1} -> {uri}", flush=True)


def training_state(
    state: WorkerState, epoch: int, *, progress: EpochProgress | None = None
) -> TrainingState:
    return TrainingState(
        epoch=epoch,
        student=unwrap(state.student).state_dict(),
        loss=state.loss_fn.state_dict(),
        optimizer=state.optimizer.state_dict(),
        classifier=state.spec.classifier_ref,
        config=to_dict(state.config),
        history=state.history,
        extra=state.spec.provenance(),
        progress=progress,
    )


def audit_rows(state: WorkerState) -> None:
    """With ``run.audit_ids`` and the sharded classifier: which rows of W this rank holds in
    this attempt (:mod:`orchestrator.audit`)."""
    shard = getattr(state.loss_fn, "shard", None)
    if not state.config.run.audit_ids or not isinstance(shard, Shard):
        return
    weight = state.loss_fn.get_buffer("weight").detach().cpu().float().numpy()
    attempt = len(state.history.world_sizes) - 1
    write_rows_audit(
        state.run_uri,
        attempt=attempt,
        world_size=state.world_size,
        rank=state.rank,
        start=shard.class_start,
        weight=weight,
    )


def validate_epoch(state: WorkerState, epoch: int) -> None:
    """Rank 0: measure the validation metrics after ``epoch``, record them with the
    epoch's figures in the history, and keep the state when it is the best so far."""
    assert state.validator is not None
    state.validation = state.validator.metrics(unwrap(state.student))
    state.history = with_validation(state.history, epoch, state.validation)
    keep_if_best(state, epoch)


def keep_if_best(state: WorkerState, epoch: int) -> None:
    """Rank 0, after a validation: copy the state to ``<run>/best`` when its
    ``run.best_metric`` beats the best so far (``run.keep_best``)."""
    run = state.config.run
    if not (run.keep_best and state.spec.best_uri):
        return
    record = new_best(state.validation, metric=run.best_metric, epoch=epoch, best=state.best)
    if record is not None:
        write_best(state.spec.best_uri, training_state(state, epoch), record)
        state.best = record


def resume_line(tag: str, state: TrainingState, workers: int, path: str) -> str:
    """Rank 0's line when a run resumes from the checkpoint at ``path``."""
    progress = state.progress
    where = (
        f"after epoch {state.epoch + 1}"
        if progress is None
        else f"inside epoch {state.epoch + 2}, after its step {progress.steps} "
        f"({len(progress.consumed)} of its images trained, skipped as they are read)"
    )
    return f"[{tag}] resuming {where} with {workers} worker(s) from {path}"


def restore(
    state: TrainingState,
    spec: TrainSpec,
    *,
    student: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    where: str,
) -> None:
    """Load a checkpoint's state into the freshly built student, loss and optimiser, after
    checking it was trained against this run's classifier (``where``: the checkpoint)."""
    verify_same_classifier(state.classifier, spec.classifier_ref, where=f"checkpoint {where}")
    student.load_state_dict(state.student)
    loss_fn.load_state_dict(state.loss)
    optimizer.load_state_dict(state.optimizer)
