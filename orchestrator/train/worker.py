"""The Ray Train worker loop: plain PyTorch with a few visible Ray touch-points
(``get_context``, ``get_dataset_shard``, ``prepare_model``, ``get_checkpoint``, ``report``)."""

from __future__ import annotations

import os
import re
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
from orchestrator.config import (
    Arch,
    ExperimentConfig,
    LossConfig,
    OptimConfig,
    Precision,
    from_dict,
    to_dict,
)
from orchestrator.data import format as fmt
from orchestrator.data.images import CorruptImageError, to_model_input
from orchestrator.data.ray_input import epoch_batches
from orchestrator.evaluation import EvalSet, evaluate_model, load_eval_set
from orchestrator.losses import Margin, build_loss, needs_teacher_embeddings
from orchestrator.losses.sharded import Shard, ShardedProxylessLoss
from orchestrator.models import build_backbone
from orchestrator.progress import format_seconds
from orchestrator.teacher import load_teacher_backbone
from orchestrator.train.checkpoint import (
    ClassifierRef,
    TrainingState,
    load_state,
    save_state,
    verify_classifier,
)
from orchestrator.train.step import lr_at, train_step


@dataclass(frozen=True)
class WorkerPlan:
    """What the driver resolved for the workers (beyond the experiment config)."""

    role: str  # "teacher" or "student"
    arch: Arch
    emb_dim: int
    dropout: float
    loss: LossConfig
    optim: OptimConfig
    num_classes: int
    num_images: int
    classifier: Any = None  # ray.ObjectRef of the (C, d) array: one copy per node (dense)
    classifier_ref: ClassifierRef | None = None
    sharded: bool = False  # each worker reads its own rows from classifier_ref.uri
    teacher_backbone: str | None = None  # for l2 / logit
    eval_uri: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    config = from_dict(ExperimentConfig, loop_config["config"], "train_loop_config")
    plan: WorkerPlan = loop_config["plan"]
    quiet_worker_logs()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)  # identical initial student on every rank

    student = build_student(plan, config, device)
    loss_fn = build_worker_loss(plan, config, rank, world_size).to(device)
    teacher = load_teacher(plan, device)
    params = list(student.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.SGD(
        params, lr=plan.optim.lr, momentum=plan.optim.momentum, weight_decay=plan.optim.weight_decay
    )
    previous = resume(student, loss_fn, optimizer, plan)
    student = ray.train.torch.prepare_model(student)  # DDP over the workers (not W)

    local_batch = plan.optim.batch_size // world_size
    steps_per_epoch = max(1, (plan.num_images // world_size) // local_batch)
    total_steps = steps_per_epoch * plan.optim.epochs
    warmup_steps = round(plan.optim.warmup_epochs * steps_per_epoch)
    start_epoch = 0 if previous is None else previous.epoch + 1
    history = History.start(previous, start_epoch, world_size)
    shard = ray.train.get_dataset_shard("train")
    eval_set: EvalSet | None = None
    metrics: dict[str, Any] = {}
    bf16 = config.run.precision is Precision.BF16

    if previous is not None and start_epoch >= plan.optim.epochs:
        # Rerun of a finished run: nothing to train; hand back its final checkpoint, with
        # its validation metrics measured again (a resumed Tune trial needs them).
        final: dict[str, Any] = {"epoch": previous.epoch}
        if rank == 0 and plan.eval_uri:
            final.update(validation_metrics(unwrap(student), load_eval_set(plan.eval_uri)))
        report(
            final,
            student,
            loss_fn,
            optimizer,
            plan,
            config,
            history,
            previous.epoch,
            save=rank == 0,
        )
        return
    for epoch in range(start_epoch, plan.optim.epochs):
        student.train()
        step = epoch * steps_per_epoch
        losses: list[float] = []
        started = last_log = warm = time.monotonic()
        seen_ids: list[str] = []
        batches = epoch_batches(shard, local_batch, config.run.shuffle_buffer)
        for batch in input_errors_named(batches):
            if config.run.audit_ids:
                seen_ids.extend(batch["image_id"].tolist())
            if len(batch["label"]) < local_batch:
                continue  # the epoch's remainder: every rank has the same count, so skips it
            # Arrays Ray hands out may be read-only views of its store: copy only then.
            images = to_model_input(torch.from_numpy(writable(batch["image"]))).to(device)
            if config.run.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = torch.from_numpy(writable(batch["label"])).to(device)
            with torch.no_grad():
                teacher_emb = None if teacher is None else teacher(images).float()
            out = train_step(
                student, loss_fn, optimizer, images, labels, teacher_emb,
                lr=lr_at(step, total_steps, warmup_steps, plan.optim.lr), bf16=bf16,
            )  # fmt: skip
            losses.append(float(out.loss.detach()))
            if not np.isfinite(losses[-1]):
                raise FloatingPointError(
                    f"[{plan.role} {config.name}] loss is {losses[-1]} at epoch {epoch + 1} step "
                    f"{len(losses)}: training diverged; lower optim.lr (now {plan.optim.lr}) or add "
                    "optim.warmup_epochs"
                )
            step += 1
            now = time.monotonic()
            if len(losses) == 1:
                warm = now  # the first step carries start-up costs: measure the rate after it
            elif rank == 0 and now - last_log >= config.run.log_every_s:
                last_log = now
                rate = (len(losses) - 1) * local_batch * world_size / max(now - warm, 1e-9)
                log_progress(
                    plan,
                    config,
                    epoch,
                    step - epoch * steps_per_epoch,
                    steps_per_epoch,
                    losses,
                    rate,
                )
        elapsed = time.monotonic() - started
        if config.run.audit_ids:
            write_audit(config, epoch, rank, seen_ids)
        metrics = {
            "epoch": epoch,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "samples_per_s": len(losses) * local_batch * world_size / max(elapsed, 1e-9),
            "lr": lr_at(step, total_steps, warmup_steps, plan.optim.lr),
            **memory_mb(),
            **{k: v for k, v in metrics.items() if k.startswith("val_")},
        }
        last = epoch == plan.optim.epochs - 1
        if rank == 0:
            print(
                f"[{plan.role} {config.name}] epoch {epoch + 1}/{plan.optim.epochs} done: loss {metrics['loss']:.4f}  "
                f"{metrics['samples_per_s']:.0f} samples/s  {format_seconds(elapsed)}",
                flush=True,
            )
        if (
            rank == 0
            and plan.eval_uri
            and (
                last
                or (
                    config.run.eval_every_epochs and (epoch + 1) % config.run.eval_every_epochs == 0
                )
            )
        ):
            eval_set = eval_set or load_eval_set(plan.eval_uri)
            metrics.update(validation_metrics(unwrap(student), eval_set))
        history = history.after_epoch(epoch, elapsed)
        due = last or (epoch + 1) % config.run.checkpoint_every_epochs == 0
        report(
            metrics,
            student,
            loss_fn,
            optimizer,
            plan,
            config,
            history,
            epoch,
            save=due and rank == 0,
        )


def quiet_worker_logs() -> None:
    """DDP's "grad strides" notice concerns depthwise-conv gradient layout (a possible
    slowdown, not an error) and would otherwise print once per worker per run."""
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def build_student(plan: WorkerPlan, config: ExperimentConfig, device: torch.device) -> nn.Module:
    model = build_backbone(plan.arch, plan.emb_dim, plan.dropout, config.data.image_size).to(device)
    if config.run.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def build_worker_loss(
    plan: WorkerPlan, config: ExperimentConfig, rank: int, world_size: int
) -> nn.Module:
    """The dense loss (W from the object store), or the sharded one (this rank's rows only)."""
    if not plan.sharded:
        return build_loss(
            plan.loss, plan.num_classes, plan.emb_dim, inherited_classifier(plan), normalized=True
        )
    assert plan.classifier_ref is not None
    meta = clf.read_meta(plan.classifier_ref.uri)
    shard = Shard.for_rank(meta.num_classes, world_size, rank)
    rows = clf.read_rows(plan.classifier_ref.uri, meta, shard.class_start, shard.local_classes)
    bf16 = config.sharding.matmul_precision is Precision.BF16
    return ShardedProxylessLoss(
        torch.from_numpy(rows), shard, Margin.from_config(plan.loss), config.sharding.chunk_size,
        torch.bfloat16 if bf16 else None, sample_rate=config.sharding.sample_rate, seed=config.seed,
    )  # fmt: skip


def inherited_classifier(plan: WorkerPlan) -> torch.Tensor | None:
    """The teacher classifier from the object store: a read-only view of the node's copy."""
    if plan.classifier is None:
        return None
    array = ray.get(plan.classifier)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: FrozenClassifier copies
        return torch.from_numpy(array)


def load_teacher(plan: WorkerPlan, device: torch.device) -> nn.Module | None:
    if not needs_teacher_embeddings(plan.loss.method):
        return None
    if plan.teacher_backbone is None:
        raise ValueError(f"method {plan.loss.method.value} needs teacher.backbone")
    teacher = load_teacher_backbone(plan.teacher_backbone).to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def resume(
    student: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, plan: WorkerPlan
) -> TrainingState | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = load_state(directory)
    verify_classifier(state.classifier, plan.classifier_ref, f"checkpoint {checkpoint.path}")
    student.load_state_dict(state.student)
    loss_fn.load_state_dict(state.loss)
    optimizer.load_state_dict(state.optimizer)
    if ray.train.get_context().get_world_rank() == 0:
        print(
            f"[{plan.role}] resuming after epoch {state.epoch + 1} from {checkpoint.path}",
            flush=True,
        )
    return state


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
        text = "".join(traceback.format_exception(err))
        for error_type in (CorruptImageError, fmt.DatasetError):
            match = re.search(rf"{error_type.__name__}: (.+)", text)
            if match:
                raise error_type(match.group(1)) from None
        raise


def write_audit(config: ExperimentConfig, epoch: int, rank: int, image_ids: list[str]) -> None:
    """The image ids this rank received in ``epoch``, one per line, in arrival order."""
    name = ray.train.get_context().get_experiment_name()
    uri = storage.join(config.storage_path, name, "audit", f"epoch-{epoch:04d}-rank-{rank:03d}.txt")
    storage.write_text_atomic(uri, "".join(f"{i}\n" for i in image_ids))


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def validation_metrics(student: nn.Module, eval_set: EvalSet) -> dict[str, float]:
    report = evaluate_model(student, eval_set)
    out = {
        "val_acc_10fold": report["acc_10fold"],
        "val_auc": report["auc"],
        "val_rank1": report["rank1"],
    }
    for far, tar in report["tar_at_far"].items():
        if tar is not None:
            out[f"val_tar_at_far_{far}"] = tar
    return out


@dataclass(frozen=True)
class History:
    epochs_done: tuple[int, ...]
    resumed_at: tuple[int, ...]
    world_sizes: tuple[int, ...]
    train_seconds: float

    @classmethod
    def start(cls, previous: TrainingState | None, start_epoch: int, world_size: int) -> History:
        if previous is None:
            return cls((), (), (world_size,), 0.0)
        return cls(
            previous.epochs_done,
            (*previous.resumed_at, start_epoch),
            (*previous.world_sizes, world_size),
            previous.train_seconds,
        )

    def after_epoch(self, epoch: int, seconds: float) -> History:
        return replace(
            self, epochs_done=(*self.epochs_done, epoch), train_seconds=self.train_seconds + seconds
        )


def report(
    metrics: dict[str, Any],
    student: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: WorkerPlan,
    config: ExperimentConfig,
    history: History,
    epoch: int,
    save: bool,
) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint when one is due."""
    metrics = {**metrics, "epochs_done": list(history.epochs_done), "resumed_at": list(history.resumed_at),
               "world_sizes": list(history.world_sizes), "train_seconds": history.train_seconds}  # fmt: skip
    if not save:
        ray.train.report(metrics)
        return
    state = TrainingState(
        epoch=epoch,
        student=unwrap(student).state_dict(),
        loss=loss_fn.state_dict(),
        optimizer=optimizer.state_dict(),
        classifier=plan.classifier_ref,
        config=to_dict(config),
        epochs_done=history.epochs_done,
        resumed_at=history.resumed_at,
        world_sizes=history.world_sizes,
        train_seconds=history.train_seconds,
        extra={"role": plan.role, "arch": plan.arch.value, "emb_dim": plan.emb_dim, **plan.extra},
    )
    with tempfile.TemporaryDirectory() as directory:
        save_state(directory, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def log_progress(
    plan: WorkerPlan,
    config: ExperimentConfig,
    epoch: int,
    step: int,
    steps: int,
    losses: list[float],
    rate: float,
) -> None:
    """``rate`` in samples/s; the ETA assumes it holds for the remaining steps."""
    global_batch = plan.optim.batch_size
    remaining = (steps - step) + steps * (plan.optim.epochs - epoch - 1)
    eta = remaining * global_batch / max(rate, 1e-9)
    recent = float(np.mean(losses[-20:]))
    print(
        f"[{plan.role} {config.name}] epoch {epoch + 1}/{plan.optim.epochs} step {step}/{steps}  "
        f"{rate:.0f} samples/s  loss {recent:.4f}  ETA {format_seconds(eta)}",
        flush=True,
    )
