"""The Ray Train worker loop: plain PyTorch with a few visible Ray touch-points
(``get_context``, ``get_dataset_shard``, ``prepare_model``, ``get_checkpoint``, ``report``).

Read :func:`train_loop_per_worker` top to bottom: set up, then per epoch train, validate
when due, report (every rank: it is a barrier), checkpoint when due. With
``run.checkpoint_every_steps`` the epoch also checkpoints inside itself, recording which of
its images are trained (:mod:`orchestrator.data.consumed`); a run resumed from such a
checkpoint continues the epoch on the others only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from orchestrator import classifier as clf
from orchestrator import storage
from orchestrator.artifacts import (
    BestRecord,
    TeacherCheckpoint,
    TrainingState,
    load_state,
    read_best,
    save_state,
    save_teacher,
    verify_same_classifier,
    write_best,
)
from orchestrator.audit import AUDIT_DIR, skipped_file, trained_file
from orchestrator.benchmarks.suite import BinBenchmark, load_bin_benchmark
from orchestrator.config import (
    BENCHMARK_METRIC,
    DataConfig,
    DecodeAt,
    ExperimentConfig,
    Metric,
    Precision,
    from_dict,
    to_dict,
    val_targets,
    validation_key,
)
from orchestrator.data.consumed import EpochProgress, clear_skip, publish_skip, skip_dir
from orchestrator.data.images import to_model_input
from orchestrator.data.ray_input import (
    TimedBatches,
    augment_decoded,
    augment_draws,
    decoded_ahead,
    epoch_batches,
    shuffle_seed,
)
from orchestrator.errors import user_error_in_text
from orchestrator.evaluation import (
    EvalSet,
    Flip,
    NonFiniteEmbeddingsError,
    embed_images,
    evaluate_model,
    load_eval_set,
    pair_verification,
)
from orchestrator.losses import Margin, build_loss
from orchestrator.losses.sharded import ShardedProxylessLoss
from orchestrator.models import build_backbone
from orchestrator.progress import format_seconds
from orchestrator.runs import run_dir
from orchestrator.shards import Shard
from orchestrator.teacher_models import load_teacher_backbone
from orchestrator.train.spec import (
    DenseClassifier,
    ShardedClassifier,
    TeacherSnapshots,
    TrainSpec,
)
from orchestrator.train.step import lr_at, train_step
from orchestrator.train.sync_batchnorm import convert_batchnorm


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    config = from_dict(ExperimentConfig, loop_config["config"], "train_loop_config")
    spec: TrainSpec = loop_config["spec"]
    state = set_up(spec, config)
    write_rows_audit(state)
    if state.start_epoch >= spec.optim.epochs:
        # Rerun of a finished run: nothing to train; hand back its final checkpoint, with
        # its validation metrics measured again (a resumed Tune trial needs them).
        assert state.previous is not None
        final = EpochStats(epoch=state.previous.epoch)
        report(state, final, validate=True, save=state.rank == 0)
        return
    for epoch in range(state.start_epoch, spec.optim.epochs):
        use_teacher_of(state, epoch)
        prepare_input(state, epoch)
        stats = run_epoch(state, epoch)
        state.history = state.history.after_epoch(epoch, stats, state.teacher_backbone)
        if spec.snapshots is not None and state.rank == 0:
            save_snapshot(state, spec.snapshots, epoch)
        report(
            state,
            stats,
            validate=validation_due(state, epoch),
            save=state.rank == 0 and checkpoint_due(state, epoch),
        )


# --- set-up ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """How the global batch splits over the workers and where the learning rate is."""

    local_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    base_lr: float

    @classmethod
    def of(cls, spec: TrainSpec, world_size: int) -> Schedule:
        local_batch = spec.optim.batch_size // world_size
        steps = max(1, (spec.num_images // world_size) // local_batch)
        return cls(
            local_batch=local_batch,
            steps_per_epoch=steps,
            total_steps=steps * spec.optim.epochs,
            warmup_steps=round(spec.optim.warmup_epochs * steps),
            base_lr=spec.optim.lr,
        )

    def lr(self, step: int) -> float:
        return lr_at(
            step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, base_lr=self.base_lr
        )


@dataclass
class WorkerState:
    """Everything one worker trains with; ``history`` and the validation cache change as
    epochs go by."""

    spec: TrainSpec
    config: ExperimentConfig
    rank: int
    world_size: int
    device: torch.device
    student: nn.Module  # wrapped in DDP
    loss_fn: nn.Module
    teacher: nn.Module | None
    teacher_backbone: str | None  # the file ``teacher`` was loaded from
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    data: Any  # this worker's ray.data DataIterator
    previous: TrainingState | None
    history: History
    run_uri: str  # <storage_path>/<run name>
    # Inside the epoch a checkpoint was taken in: its steps and trained images so far.
    progress: EpochProgress | None = None
    validation: dict[str, float] = field(default_factory=dict)
    eval_set: EvalSet | None = None
    best: BestRecord | None = None  # rank 0: what <run>/best holds
    val_benches: dict[str, BinBenchmark] = field(default_factory=dict)  # run.val_targets

    @property
    def start_epoch(self) -> int:
        return 0 if self.previous is None else self.previous.epoch + 1

    @property
    def tag(self) -> str:
        return f"[{self.spec.tag} {self.config.name}]"


def set_up(spec: TrainSpec, config: ExperimentConfig) -> WorkerState:
    quiet_worker_logs()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)  # identical initial student on every rank
    student = build_student(spec, config, device)
    if config.run.sync_batchnorm and world_size > 1:
        student = convert_batchnorm(student)  # statistics over the global batch
    loss_fn = build_worker_loss(spec, config, rank=rank, world_size=world_size).to(device)
    params = list(student.parameters()) + list(loss_fn.parameters())
    optim = spec.optim
    optimizer = torch.optim.SGD(
        params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
    )
    previous = resume(spec, student=student, loss_fn=loss_fn, optimizer=optimizer)
    return WorkerState(
        spec=spec,
        config=config,
        rank=rank,
        world_size=world_size,
        device=device,
        student=ray.train.torch.prepare_model(student),  # DDP over the workers (not W)
        loss_fn=loss_fn,
        teacher=None,  # loaded per epoch by use_teacher_of (multistep changes it)
        teacher_backbone=None,
        optimizer=optimizer,
        schedule=Schedule.of(spec, world_size),
        data=ray.train.get_dataset_shard("train"),
        previous=previous,
        history=History.start(previous, world_size),
        run_uri=run_dir(config, ctx.get_experiment_name()),
        progress=None if previous is None else previous.progress,
        best=read_best(spec.best_uri) if spec.best_uri and rank == 0 else None,
    )


def quiet_worker_logs() -> None:
    """DDP's "grad strides" notice concerns depthwise-conv gradient layout (a possible
    slowdown, not an error) and would otherwise print once per worker per run. Ray Train
    logs every ``report`` at INFO ("Reporting training result N: ...") through a logger
    named by its file path, which Train's own LoggingConfig does not reach: our epoch lines
    already say what each report holds."""
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def build_student(spec: TrainSpec, config: ExperimentConfig, device: torch.device) -> nn.Module:
    model = build_backbone(
        spec.model.arch,
        spec.model.emb_dim,
        dropout=spec.model.dropout,
        input_size=config.data.image_size,
    ).to(device)
    if config.run.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def build_worker_loss(
    spec: TrainSpec, config: ExperimentConfig, *, rank: int, world_size: int
) -> nn.Module:
    """The sharded loss (this rank's rows only) or the dense one (W, if the method uses it,
    from the object store)."""
    source = spec.classifier
    if isinstance(source, ShardedClassifier):
        shard = Shard.for_rank(source.meta.num_classes, world_size, rank)
        rows = clf.read_rows(
            source.ref.uri, source.meta, start=shard.class_start, size=shard.local_classes
        )
        bf16 = config.sharding.matmul_precision is Precision.BF16
        return ShardedProxylessLoss(
            torch.from_numpy(rows),
            shard,
            Margin.from_config(spec.loss.margin),
            chunk_size=config.sharding.chunk_size,
            matmul_dtype=torch.bfloat16 if bf16 else None,
            sample_rate=source.sample_rate,
            seed=config.seed,
            normalized=True,
        )
    return build_loss(
        spec.loss,
        num_classes=spec.num_classes,
        emb_dim=spec.model.emb_dim,
        teacher_classifier=None if source is None else shared_classifier(source),
        normalized=True,
    )


def shared_classifier(source: DenseClassifier) -> torch.Tensor:
    """The teacher classifier from the object store: a read-only view of the node's copy."""
    array = ray.get(source.weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: never written to
        return torch.from_numpy(array)


def use_teacher_of(state: WorkerState, epoch: int) -> None:
    """Load the frozen teacher of ``epoch`` (any format, :mod:`orchestrator.teacher_models`)
    onto the worker's device, unless it is the one loaded already: once per run, or once
    per ``multistep`` stage."""
    teacher = state.spec.teacher_at(epoch)
    if teacher is None or teacher.backbone == state.teacher_backbone:
        return
    model = load_teacher_backbone(teacher, image_size=state.config.data.image_size)
    model = model.to(state.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if state.teacher_backbone is not None and state.rank == 0:
        print(f"{state.tag} epoch {epoch + 1}: distilling from {teacher.backbone}", flush=True)
    state.teacher, state.teacher_backbone = model, teacher.backbone


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


def resume(
    spec: TrainSpec, *, student: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer
) -> TrainingState | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = load_state(directory)
    verify_same_classifier(
        state.classifier, spec.classifier_ref, where=f"checkpoint {checkpoint.path}"
    )
    student.load_state_dict(state.student)
    loss_fn.load_state_dict(state.loss)
    optimizer.load_state_dict(state.optimizer)
    ctx = ray.train.get_context()
    if ctx.get_world_rank() == 0:
        where = (
            f"after epoch {state.epoch + 1}"
            if state.progress is None
            else f"inside epoch {state.epoch + 2}, after its step {state.progress.steps} "
            f"({len(state.progress.consumed)} of its images trained, skipped as they are read)"
        )
        workers = ctx.get_world_size()
        print(
            f"[{spec.tag}] resuming {where} with {workers} worker(s) from {checkpoint.path}",
            flush=True,
        )
    return state


# --- one epoch ---------------------------------------------------------------------------


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


def run_epoch(state: WorkerState, epoch: int) -> EpochStats:
    """Train on this worker's part of one epoch (of what is left of it, when the run resumed
    inside it); rank 0 prints progress. Every ``run.checkpoint_every_steps`` steps of the
    epoch a checkpoint records how far it is and which images it has trained on."""
    state.student.train()
    schedule, config = state.schedule, state.config
    progress = epoch_progress(state, epoch)
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
        write_audit(config, epoch=epoch, rank=state.rank, image_ids=segment, since=since)
        write_audit(config, epoch=epoch, rank=state.rank, image_ids=skipped, skipped=True)
    state.progress = None  # the epoch is done: the next one starts from its beginning
    ended = time.monotonic()
    stats = EpochStats(
        epoch=epoch,
        losses=tuple(losses),
        seconds=ended - started,
        after_first_step_s=ended - first_step_done if losses else 0.0,
        lr=lr,  # the rate of the epoch's last step
        global_batch=schedule.local_batch * state.world_size,
        input_wait_s=timed.waited - timed.first_wait,
        input_startup_s=timed.first_wait,
    )
    print_epoch_done(state, stats)
    return stats


def print_epoch_done(state: WorkerState, stats: EpochStats) -> None:
    """Rank 0's line at the end of an epoch."""
    if state.rank != 0:
        return
    print(
        f"{state.tag} epoch {stats.epoch + 1}/{state.spec.optim.epochs} done: loss "
        f"{stats.mean_loss:.4f}  {stats.samples_per_s:.0f} samples/s  "
        f"{format_seconds(stats.seconds)}  input: {stats.input_startup_s:.1f}s start-up, "
        f"then {stats.input_wait_share:.0%} of the time waiting",
        flush=True,
    )


# --- checkpoints inside an epoch (run.checkpoint_every_steps) ------------------------------


def epoch_progress(state: WorkerState, epoch: int) -> EpochProgress:
    """Where ``epoch`` starts: where the checkpoint the run resumed from left it, or at 0."""
    progress = state.progress
    return (
        progress if progress is not None and progress.epoch == epoch else EpochProgress.start(epoch)
    )


def prepare_input(state: WorkerState, epoch: int) -> None:
    """Before ``epoch``'s input is read: rank 0 tells the Parquet read tasks which images to
    skip (those trained on already, when resuming inside this epoch) or that there are
    none, and clears the audit segments an attempt that died left from this point of the
    epoch on; every rank waits for it, so no read starts before."""
    run = state.config.run
    if not (run.checkpoint_every_steps or run.audit_ids):
        return
    if state.rank == 0:
        progress = epoch_progress(state, epoch)
        if run.audit_ids:
            clear_audit_from(state.run_uri, epoch, progress.steps)
        if run.checkpoint_every_steps:
            directory = skip_dir(state.run_uri)
            if progress.steps:
                publish_skip(directory, progress)
            else:
                clear_skip(directory)
    if state.world_size > 1:
        torch.distributed.barrier()


def clear_audit_from(run_uri: str, epoch: int, steps: int) -> None:
    """Delete ``epoch``'s audit segments from its step ``steps`` on: what an attempt that
    died trained after the checkpoint this one resumed from. This attempt writes them
    again, but after a resize under other rank names, so they would otherwise stay."""
    audit = storage.join(run_uri, AUDIT_DIR)
    for path in storage.glob(audit, f"*epoch-{epoch:04d}-rank-*.txt"):
        name = path.rsplit("/", 1)[-1]
        _, found, since = name.removesuffix(".txt").partition("-from-step-")
        if not found or int(since) >= steps:  # a whole-epoch file, a skipped file, or later
            storage.delete(storage.join(audit, name))


def gather_ids(ids: list[str], world_size: int) -> list[str]:
    """Every rank's ``ids``, on every rank."""
    if world_size == 1:
        return list(ids)
    parts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(parts, ids)
    return [i for part in parts for i in part]


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
        write_audit(state.config, epoch=epoch, rank=rank, image_ids=segment, since=since)
    metrics = {
        "epoch": progress.epoch - 1,
        "epochs_done": list(state.history.epochs_done),
        "steps_in_epoch": steps,
        "images_in_epoch": len(progress.consumed),
    }
    if state.rank != 0:
        ray.train.report(metrics)
        return progress
    with tempfile.TemporaryDirectory() as directory:
        save_state(directory, training_state(state, progress.epoch - 1, progress=progress))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    print(
        f"{state.tag} epoch {progress.epoch + 1} step {steps}: checkpoint inside the epoch "
        f"({len(progress.consumed)} images trained on so far)",
        flush=True,
    )
    return progress


def epoch_input(state: WorkerState, epoch: int) -> Iterator[dict[str, Any]]:
    """This worker's decoded batches of ``epoch``: from the decode pool as they come, or
    decoded here, one batch ahead of the step (``data.decode: worker``)."""
    config = state.config
    batches = epoch_batches(
        state.data,
        state.schedule.local_batch,
        config.run.shuffle_buffer,
        shuffle_seed=shuffle_seed(config.seed, epoch=epoch, rank=state.rank),
    )
    key = (config.seed, epoch)  # augmentation: per image, from (seed, epoch, image id)
    if config.data.decode is DecodeAt.WORKER:
        return decoded_ahead(batches, config.data, key=key)
    return (augmented(batch, config.data, key=key) for batch in batches)


def augmented(batch: dict[str, Any], data: DataConfig, *, key: tuple[int, int]) -> dict[str, Any]:
    """A batch the decode pool decoded, augmented here (where the epoch is known)."""
    if not (data.flip or data.crop_pad):
        return batch
    draws = augment_draws(batch["image_id"], key=key, flip=data.flip, crop_pad=data.crop_pad)
    return {**batch, "image": augment_decoded(writable(batch["image"]), draws)}


def train_batch(state: WorkerState, batch: dict[str, Any], *, lr: float) -> float:
    """One optimisation step on a decoded batch; the step's loss."""
    # Arrays Ray hands out may be read-only views of its store: copy only then.
    images = to_model_input(torch.from_numpy(writable(batch["image"]))).to(state.device)
    if state.config.run.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.from_numpy(writable(batch["label"])).to(state.device)
    with torch.no_grad():
        teacher_emb = None if state.teacher is None else state.teacher(images).float()
    out = train_step(
        state.student,
        state.loss_fn,
        optimizer=state.optimizer,
        images=images,
        labels=labels,
        teacher_embeddings=teacher_emb,
        lr=lr,
        bf16=state.config.run.precision is Precision.BF16,
    )
    return float(out.loss.detach())


def check_finite(state: WorkerState, losses: list[float], epoch: int) -> None:
    if not np.isfinite(losses[-1]):
        raise FloatingPointError(
            f"{state.tag} loss is {losses[-1]} at epoch {epoch + 1} step {len(losses)}: "
            f"training diverged; lower optim.lr (now {state.spec.optim.lr}) or add "
            "optim.warmup_epochs"
        )


class ProgressLine:
    """Rank 0's periodic line: step, samples/s, recent loss, ETA. The first step carries
    start-up costs, so the rate is measured from the end of it."""

    def __init__(self, state: WorkerState, epoch: int) -> None:
        self.state, self.epoch = state, epoch
        self.last_log = self.warm = time.monotonic()

    def after_step(self, losses: list[float]) -> None:
        now = time.monotonic()
        if len(losses) == 1:
            self.warm = now
            return
        if self.state.rank != 0 or now - self.last_log < self.state.config.run.log_every_s:
            return
        self.last_log = now
        schedule, optim = self.state.schedule, self.state.spec.optim
        rate = (len(losses) - 1) * optim.batch_size / max(now - self.warm, 1e-9)
        steps = schedule.steps_per_epoch
        remaining = (steps - len(losses)) + steps * (optim.epochs - self.epoch - 1)
        eta = remaining * optim.batch_size / max(rate, 1e-9)
        print(
            f"{self.state.tag} epoch {self.epoch + 1}/{optim.epochs} step {len(losses)}/{steps}"
            f"  {rate:.0f} samples/s  loss {float(np.mean(losses[-20:])):.4f}  "
            f"ETA {format_seconds(eta)}",
            flush=True,
        )


def writable(array: np.ndarray) -> np.ndarray:
    return array if array.flags.writeable else array.copy()


def input_errors_named(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``batches``, with a data error raised in a decode actor (which Ray wraps in a long
    remote traceback) re-raised here as itself, so its message (dataset, image id) is the
    last line of what the run reports."""
    try:
        yield from batches
    except Exception as err:
        # The original exception crosses a process boundary as text inside Ray's wrappers.
        cause = user_error_in_text("".join(traceback.format_exception(err)))
        if cause is not None:
            raise cause from None
        raise


def write_rows_audit(state: WorkerState) -> None:
    """With ``run.audit_ids`` and the sharded classifier: which rows of W this rank holds in
    this attempt, and a digest of them, ``audit/classifier-rows-attempt-A-rank-R.json``."""
    shard = getattr(state.loss_fn, "shard", None)
    if not state.config.run.audit_ids or not isinstance(shard, Shard):
        return
    weight = state.loss_fn.get_buffer("weight").detach().cpu().float().numpy()
    attempt = len(state.history.world_sizes) - 1
    record = {
        "attempt": attempt,
        "world_size": state.world_size,
        "rank": state.rank,
        "start": shard.class_start,
        "size": shard.local_classes,
        "sha256": hashlib.sha256(np.ascontiguousarray(weight).tobytes()).hexdigest(),
    }
    file = f"classifier-rows-attempt-{attempt:03d}-rank-{state.rank:03d}.json"
    storage.write_text_atomic(storage.join(state.run_uri, AUDIT_DIR, file), json.dumps(record))


def write_audit(
    config: ExperimentConfig,
    *,
    epoch: int,
    rank: int,
    image_ids: list[str],
    since: int | None = None,
    skipped: bool = False,
) -> None:
    """The image ids this rank trained on in ``epoch``, one per line, in training order;
    with checkpoints inside epochs, those of one segment (from the epoch's step ``since`` to
    the next checkpoint or the epoch's end): ``epoch-E-rank-R-from-step-S.txt``. The
    segments a resumed run left cover what its checkpoints kept. With ``skipped``, the ids
    of the epoch's short remainder this rank received and did not train on:
    ``skipped-epoch-E-rank-R.txt`` (format: :mod:`orchestrator.audit`)."""
    name = ray.train.get_context().get_experiment_name()
    file = skipped_file(epoch, rank) if skipped else trained_file(epoch, rank, since)
    uri = storage.join(config.storage_path, name, AUDIT_DIR, file)
    storage.write_text_atomic(uri, "".join(f"{i}\n" for i in image_ids))


# --- validation, reports and checkpoints -------------------------------------------------


def validation_due(state: WorkerState, epoch: int) -> bool:
    """After the last epoch, and every ``run.eval_every_epochs`` (0: only the last)."""
    if not state.spec.eval_uri:
        return False
    every = state.config.run.eval_every_epochs
    return epoch == state.spec.optim.epochs - 1 or bool(every and (epoch + 1) % every == 0)


def checkpoint_due(state: WorkerState, epoch: int) -> bool:
    last = epoch == state.spec.optim.epochs - 1
    return last or (epoch + 1) % state.config.run.checkpoint_every_epochs == 0


def validation_metrics(state: WorkerState) -> dict[str, float]:
    """Rank 0 only: the student's metrics on ``spec.eval_uri`` (loaded once per run)."""
    assert state.spec.eval_uri is not None
    state.eval_set = state.eval_set or load_eval_set(state.spec.eval_uri)
    try:
        return {**validated(state, state.eval_set), NONFINITE_KEY: 0.0}
    except NonFiniteEmbeddingsError as err:
        # Recorded, not hidden: every validation metric at NONFINITE_SCORE (below any
        # measurable value, so Tune and ASHA rank the trial last and run.best never picks
        # the epoch), and val_nonfinite = 1 in the report and the run summary.
        print(f"{state.tag} WARNING: validation failed this epoch: {err}", flush=True)
        return failed_validation(state.config)


NONFINITE_KEY = "val_nonfinite"  # 1.0: the epoch's validation embeddings were not finite
NONFINITE_SCORE = -1.0  # every metric is in [0, 1]: -1 is below any measured value


def failed_validation(config: ExperimentConfig) -> dict[str, float]:
    """The metrics of a validation whose embeddings were not finite."""
    keys = [metric.validation_key for metric in Metric]
    keys += [validation_key(name + BENCHMARK_METRIC) for name in val_targets(config)]
    return {**dict.fromkeys(keys, NONFINITE_SCORE), NONFINITE_KEY: 1.0}


def validated(state: WorkerState, eval_set: EvalSet) -> dict[str, float]:
    report = evaluate_model(unwrap(state.student), eval_set)
    values = {metric.validation_key: metric.read(report) for metric in Metric}
    for name, uri in val_targets(state.config).items():
        if name not in state.val_benches:
            state.val_benches[name] = load_bin_benchmark(
                uri, image_size=state.config.data.image_size
            )
        bench = state.val_benches[name]
        emb = embed_images(unwrap(state.student), bench.images, flip=Flip.SUM, label=f"val {name}")
        values[validation_key(name + BENCHMARK_METRIC)] = pair_verification(bench.pairs, emb)[
            "acc_10fold"
        ]
    return {key: value for key, value in values.items() if value is not None}


def report(state: WorkerState, stats: EpochStats, *, validate: bool, save: bool) -> None:
    """Every rank reports (it is a barrier); rank 0 validates when due and attaches the
    checkpoint when one is due. The latest validation metrics ride along every report."""
    if validate and state.rank == 0 and state.spec.eval_uri:
        state.validation = validation_metrics(state)
        keep_if_best(state, stats.epoch)
    history = state.history
    metrics: dict[str, Any] = {
        "epoch": stats.epoch,
        "epochs_done": list(history.epochs_done),
        "resumed_at": list(history.resumed_at),
        "resumed_at_step": list(history.resumed_steps),
        "world_sizes": list(history.world_sizes),
        "train_seconds": history.train_seconds,
        # Epochs trained by this attempt (0: a rerun of a finished run trained nothing).
        "epochs_this_attempt": stats.epoch + 1 - state.start_epoch if stats.global_batch else 0,
        **state.validation,
        **({"best_epoch": state.best.epoch} if state.best else {}),
    }
    if stats.global_batch:  # an epoch was trained (not the rerun of a finished run)
        metrics.update(loss=stats.mean_loss, samples_per_s=stats.samples_per_s, lr=stats.lr)
        metrics.update(
            input_wait_share=stats.input_wait_share,
            input_startup_s=stats.input_startup_s,
            steady_samples_per_s=stats.steady_samples_per_s,
        )
        metrics.update(memory_mb())
    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_state(directory, training_state(state, stats.epoch))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def keep_if_best(state: WorkerState, epoch: int) -> None:
    """Rank 0, after a validation: copy the state to ``<run>/best`` when its
    ``run.best_metric`` beats the best so far (``run.keep_best``)."""
    metric = state.config.run.best_metric
    value = state.validation.get(validation_key(metric))
    if not (state.config.run.keep_best and state.spec.best_uri) or value is None:
        return
    if state.validation.get(NONFINITE_KEY):
        return  # its embeddings were not finite: never the best
    if state.best is not None and not state.best.improved_by(metric, value):
        return
    record = BestRecord(metric, epoch, value)
    write_best(state.spec.best_uri, training_state(state, epoch), record)
    state.best = record


def training_state(
    state: WorkerState, epoch: int, *, progress: EpochProgress | None = None
) -> TrainingState:
    history = state.history
    return TrainingState(
        epoch=epoch,
        student=unwrap(state.student).state_dict(),
        loss=state.loss_fn.state_dict(),
        optimizer=state.optimizer.state_dict(),
        classifier=state.spec.classifier_ref,
        config=to_dict(state.config),
        epochs_done=history.epochs_done,
        resumed_at=history.resumed_at,
        world_sizes=history.world_sizes,
        train_seconds=history.train_seconds,
        throughput=history.throughput,
        extra={
            **state.spec.provenance(),
            TEACHER_BY_EPOCH: list(history.teachers),
            RESUMED_AT_STEP: list(history.resumed_steps),
        },
        progress=progress,
    )


def memory_mb() -> dict[str, float]:
    """This worker's resident memory and the part of it shared with other processes (the
    object store's copy of W shows up there), from /proc/self/statm; empty elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            _, resident, shared, *_ = (int(v) for v in f.read().split())
    except OSError:
        return {}
    page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
    return {"rss_mb": resident * page_mb, "shared_mb": shared * page_mb}


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@dataclass(frozen=True)
class History:
    epochs_done: tuple[int, ...]
    resumed_at: tuple[int, ...]
    world_sizes: tuple[int, ...]
    train_seconds: float
    throughput: tuple[tuple[float, float], ...] = ()  # per epoch: samples/s, input wait share
    # Per trained epoch: the teacher file it distilled from ("" for none); multistep
    # changes it along its schedule. Kept in the checkpoint's extra as teacher_by_epoch.
    teachers: tuple[str, ...] = ()
    # Per resume (as resumed_at): the steps of that epoch already done (0: at its start).
    resumed_steps: tuple[int, ...] = ()

    @classmethod
    def start(cls, previous: TrainingState | None, world_size: int) -> History:
        """A new attempt: from scratch, or resumed at the epoch after ``previous``'s."""
        if previous is None:
            return cls((), (), (world_size,), 0.0)
        inside = previous.progress.steps if previous.progress is not None else 0
        return cls(
            previous.epochs_done,
            (*previous.resumed_at, previous.epoch + 1),
            (*previous.world_sizes, world_size),
            previous.train_seconds,
            previous.throughput,
            tuple(previous.extra.get(TEACHER_BY_EPOCH, ())),
            (*previous.extra.get(RESUMED_AT_STEP, ()), inside),
        )

    def after_epoch(self, epoch: int, stats: EpochStats, teacher: str | None = None) -> History:
        return replace(
            self,
            epochs_done=(*self.epochs_done, epoch),
            train_seconds=self.train_seconds + stats.seconds,
            throughput=(*self.throughput, (stats.samples_per_s, stats.input_wait_share)),
            teachers=(*self.teachers, teacher or ""),
        )


TEACHER_BY_EPOCH = "teacher_by_epoch"
RESUMED_AT_STEP = "resumed_at_step"
