"""What a worker builds at set-up: the student, its loss (sharded rows of W or the dense
loss over the shared copy), and the frozen teacher of an epoch."""

from __future__ import annotations

import logging
import warnings

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from orchestrator import classifier as clf
from orchestrator.config import ExperimentConfig, Precision, TeacherConfig
from orchestrator.losses import Margin, build_loss
from orchestrator.losses.sharded import ShardedProxylessLoss
from orchestrator.models import build_backbone
from orchestrator.shards import Shard
from orchestrator.teacher.models import load_teacher_backbone
from orchestrator.train.spec import (
    DenseClassifier,
    ShardedClassifier,
    TrainSpec,
)
from orchestrator.train.state import WorkerState
from orchestrator.train.sync_batchnorm import convert_batchnorm


def quiet_worker_logs() -> None:
    """DDP's "grad strides" notice concerns depthwise-conv gradient layout (a possible
    slowdown, not an error) and would otherwise print once per worker per run. Ray Train
    logs every ``report`` at INFO ("Reporting training result N: ...") through a logger
    named by its file path, which Train's own LoggingConfig does not reach: our epoch lines
    already say what each report holds."""
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    # ray.train: heavy (about a second to import), imported where it is used
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def build_student(spec: TrainSpec, config: ExperimentConfig, device: torch.device) -> nn.Module:
    model = build_backbone(
        spec.model.arch,
        spec.model.emb_dim,
        dropout=spec.model.dropout,
        input_size=config.data.image_size,
        shape=spec.model.shape,
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


def frozen_teacher(teacher: TeacherConfig, *, image_size: int, device: torch.device) -> nn.Module:
    """The teacher backbone (any format, :mod:`orchestrator.teacher.models`) on ``device``,
    in eval mode, with no gradients."""
    model = load_teacher_backbone(teacher, image_size=image_size).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_training(
    spec: TrainSpec, config: ExperimentConfig, *, device: torch.device, rank: int, world_size: int
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """The student (seeded: identical on every rank; its batch norms synchronised over the
    workers with ``run.sync_batchnorm``), this rank's loss and the SGD optimiser over both."""
    torch.manual_seed(config.seed)
    student = build_student(spec, config, device)
    if config.run.sync_batchnorm and world_size > 1:
        student = convert_batchnorm(student)  # statistics over the global batch
    loss_fn = build_worker_loss(spec, config, rank=rank, world_size=world_size).to(device)
    params = list(student.parameters()) + list(loss_fn.parameters())
    optim = spec.optim
    optimizer = torch.optim.SGD(
        params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
    )
    return student, loss_fn, optimizer


def use_teacher_of(state: WorkerState, epoch: int) -> None:
    """Load the frozen teacher of ``epoch`` (any format, :mod:`orchestrator.teacher.models`)
    onto the worker's device, unless it is the one loaded already: once per run, or once
    per ``multistep`` stage."""
    teacher = state.spec.teacher_at(epoch)
    if teacher is None or teacher.backbone == state.teacher_backbone:
        return
    model = frozen_teacher(teacher, image_size=state.config.data.image_size, device=state.device)
    if state.teacher_backbone is not None and state.rank == 0:
        print(f"{state.tag} epoch {epoch + 1}: distilling from {teacher.backbone}", flush=True)
    state.teacher, state.teacher_backbone = model, teacher.backbone
