"""The Ray Train worker loop: plain PyTorch with a few visible Ray touch-points
(``get_context``, ``get_dataset_shard``, ``prepare_model``, ``get_checkpoint``, ``report``).

Read :func:`train_loop_per_worker` top to bottom: set up, then per epoch train, validate
when due, report (every rank: it is a barrier), checkpoint when due. With
``run.checkpoint_every_steps`` the epoch also checkpoints inside itself, recording which of
its images are trained (:mod:`orchestrator.data.consumed`); a run resumed from such a
checkpoint continues the epoch on the others only.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import ray.train.torch
import torch
from torch import nn

from orchestrator.audit import write_audit
from orchestrator.config import ExperimentConfig, from_dict
from orchestrator.data.consumed import EpochProgress
from orchestrator.data.ray_input import TimedBatches
from orchestrator.formats.best import read_best
from orchestrator.formats.state import TrainingState, load_state, save_state
from orchestrator.runs import run_dir
from orchestrator.train.builders import build_training, quiet_worker_logs, use_teacher_of
from orchestrator.train.checkpoints import (
    audit_rows,
    restore,
    resume_line,
    save_snapshot,
    training_state,
    validate_epoch,
)
from orchestrator.train.distributed import gather_ids, wrap_student
from orchestrator.train.epoch import (
    ProgressLine,
    check_finite,
    epoch_input,
    input_errors_named,
    memory_mb,
    print_epoch_done,
    train_batch,
)
from orchestrator.train.history import EpochStats, after_epoch, history_at_start, report_metrics
from orchestrator.train.midepoch import (
    epoch_progress,
    inside_line,
    inside_metrics,
    prepare_input,
    write_epoch_audit,
)
from orchestrator.train.schedule import Schedule, checkpoint_due, validation_due
from orchestrator.train.spec import TrainSpec
from orchestrator.train.state import WorkerState, run_tag
from orchestrator.train.validation import Validator


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    config = from_dict(ExperimentConfig, loop_config["config"], "train_loop_config")
    spec: TrainSpec = loop_config["spec"]
    state = set_up(spec, config)
    audit_rows(state)
    if state.start_epoch >= spec.optim.epochs:
        # A finished run rerun: its last checkpoint, validated again (a resumed trial needs it)
        assert state.previous is not None
        final = EpochStats(epoch=state.previous.epoch)
        report(state, final, validate=True, save=state.rank == 0)
        return
    for epoch in range(state.start_epoch, spec.optim.epochs):
        use_teacher_of(state, epoch)
        progress = epoch_progress(state.progress, epoch)
        prepare_input(
            config.run,
            run_uri=state.run_uri,
            progress=progress,
            rank=state.rank,
            world_size=state.world_size,
        )
        stats = run_epoch(state, epoch)
        end = (epoch + 1) * state.schedule.steps_per_epoch  # the run's step after the epoch
        state.history = after_epoch(state.history, epoch, stats, state.teacher_backbone, step=end)
        if spec.snapshots is not None and state.rank == 0:
            save_snapshot(state, spec.snapshots, epoch)
        epochs, run = spec.optim.epochs, config.run
        validate = validation_due(epoch, epochs=epochs, every=run.eval_every_epochs)
        save = checkpoint_due(epoch, epochs=epochs, every=run.checkpoint_every_epochs)
        report(state, stats, validate=validate, save=save and state.rank == 0)


def set_up(spec: TrainSpec, config: ExperimentConfig) -> WorkerState:
    quiet_worker_logs()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)  # identical initial student on every rank
    student, loss_fn, optimizer = build_training(
        spec, config, device=device, rank=rank, world_size=world_size
    )
    previous = resume(spec, student=student, loss_fn=loss_fn, optimizer=optimizer)
    return WorkerState(
        spec=spec,
        config=config,
        rank=rank,
        world_size=world_size,
        device=device,
        student=wrap_student(student),  # DDP over the workers (not W)
        loss_fn=loss_fn,
        teacher=None,  # loaded per epoch by use_teacher_of (multistep changes it)
        teacher_backbone=None,
        optimizer=optimizer,
        schedule=Schedule.of(spec, world_size),
        data=ray.train.get_dataset_shard("train"),
        previous=previous,
        history=history_at_start(previous, world_size),
        run_uri=run_dir(config, ctx.get_experiment_name()),
        progress=None if previous is None else previous.progress,
        best=read_best(spec.best_uri) if spec.best_uri and rank == 0 else None,
        validator=(
            Validator(spec.eval_uri, config, tag=run_tag(spec, config))
            if spec.eval_uri and rank == 0
            else None
        ),
    )


def resume(
    spec: TrainSpec, *, student: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer
) -> TrainingState | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = load_state(directory)
    restore(
        state, spec, student=student, loss_fn=loss_fn, optimizer=optimizer, where=checkpoint.path
    )
    ctx = ray.train.get_context()
    if ctx.get_world_rank() == 0:
        print(resume_line(spec.tag, state, ctx.get_world_size(), checkpoint.path), flush=True)
    return state


def run_epoch(state: WorkerState, epoch: int) -> EpochStats:
    """Train on this worker's part of one epoch (of what is left of it, when the run resumed
    inside it); rank 0 prints progress. Every ``run.checkpoint_every_steps`` steps of the
    epoch a checkpoint records how far it is and which images it has trained on."""
    state.student.train()
    schedule, config = state.schedule, state.config
    progress = epoch_progress(state.progress, epoch)
    first = progress.steps  # the epoch's steps done before this attempt
    step = epoch * schedule.steps_per_epoch + first
    every = config.run.checkpoint_every_steps
    losses: list[float] = []
    segment: list[str] = []  # image ids received since ``segment_from``, in order
    segment_from = first  # the epoch's step this segment starts at
    started = first_step_done = time.monotonic()
    line = ProgressLine(state, epoch)
    timed = TimedBatches(
        epoch_input(state, epoch),
        max_rows_per_s=config.data.throttle_images_per_s / state.world_size,
    )
    skipped: list[str] = []  # the epoch's short remainder on this rank: never trained
    lr = schedule.lr(step)
    for batch in input_errors_named(timed):
        if len(batch["label"]) < schedule.local_batch:
            # The epoch's remainder: every rank has the same count, so every rank skips it.
            skipped.extend(batch["image_id"].tolist())
            continue
        if config.run.audit_ids or every:
            segment.extend(batch["image_id"].tolist())
        lr = schedule.lr(step)
        losses.append(train_batch(state, batch, lr=lr))
        if len(losses) == 1:
            first_step_done = time.monotonic()
        check_finite(state, losses, epoch)
        step += 1
        line.after_step(losses)
        done = first + len(losses)
        if every and done % every == 0 and done < schedule.steps_per_epoch:
            progress = checkpoint_inside(state, progress, segment, steps=done, since=segment_from)
            segment, segment_from = [], done
    if config.run.audit_ids:
        since = segment_from if every else None
        write_epoch_audit(state.run_uri, epoch, state.rank, segment, since=since, skipped=skipped)
    state.progress = None  # the epoch is done: the next one starts from its beginning
    stats = EpochStats.measured(
        epoch,
        losses,
        started=started,
        first_step_done=first_step_done,
        lr=lr,  # the rate of the epoch's last step
        global_batch=schedule.local_batch * state.world_size,
        input_waited=timed.waited,
        input_first_wait=timed.first_wait,
    )
    print_epoch_done(state, stats)
    return stats


def checkpoint_inside(
    state: WorkerState, progress: EpochProgress, segment: list[str], *, steps: int, since: int
) -> EpochProgress:
    """Every rank, after the epoch's step ``steps``: the images all ranks trained on since
    the last checkpoint join the epoch's consumed set, and rank 0 saves a checkpoint that
    holds it (the state of a finished epoch ``progress.epoch - 1`` plus the progress)."""
    progress = progress.after(gather_ids(segment, state.world_size), steps=steps)
    if state.config.run.audit_ids:
        # Before the report: if this attempt dies in between, its successor resumes from
        # the previous checkpoint and writes this segment again, under the same name.
        epoch, rank = progress.epoch, state.rank
        write_audit(state.run_uri, epoch=epoch, rank=rank, image_ids=segment, since=since)
    metrics = inside_metrics(progress, state.history.epochs_done)
    if state.rank != 0:
        send(metrics, None)
        return progress
    send(metrics, training_state(state, progress.epoch - 1, progress=progress))
    print(f"{state.tag} {inside_line(progress)}", flush=True)
    return progress


def report(state: WorkerState, stats: EpochStats, *, validate: bool, save: bool) -> None:
    """Every rank reports (it is a barrier); rank 0 validates when due and attaches the
    checkpoint when one is due. The latest validation metrics ride along every report."""
    validated = validate and state.validator is not None
    if validated:
        validate_epoch(state, stats.epoch)
    metrics = report_metrics(
        state.history,
        stats,
        start_epoch=state.start_epoch,
        validation=state.validation,
        best_epoch=None if state.best is None else state.best.epoch,
        validated=validated,
    )
    if stats.global_batch:
        metrics.update(memory_mb())
    send(metrics, training_state(state, stats.epoch) if save else None)


def send(metrics: dict[str, Any], checkpoint: TrainingState | None) -> None:
    """``ray.train.report``, with ``checkpoint`` attached when there is one."""
    if checkpoint is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_state(directory, checkpoint)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
