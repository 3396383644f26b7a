"""The driver's checks before a run: every input problem is found here, before any worker
starts or any step is taken (a label outside [0, C), a classifier whose size, embedding
width or label map does not match, a teacher that does not load, a run name that is not
one path component), and the warnings about settings that work badly."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import replace

import ray
import torch

from orchestrator import classifier as clf
from orchestrator import config as settings
from orchestrator.benchmarks.verification_bin import read_bin
from orchestrator.config import (
    DecodeAt,
    ExperimentConfig,
    Method,
    is_single_component,
    val_targets,
)
from orchestrator.data import format as fmt
from orchestrator.data.ray_input import DecodePlan, decode_plan
from orchestrator.errors import UsageError
from orchestrator.formats.loading import ArtifactError
from orchestrator.runs import (
    absolute_paths,
    use_object_store_config,
)
from orchestrator.teacher.classifiers import (
    check_stage_files,
)
from orchestrator.teacher.models import load_teacher_backbone
from orchestrator.train.spec import (
    TeacherStage,
)


def input_plan(config: ExperimentConfig) -> DecodePlan:

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    plan = decode_plan(config.data, config.scaling, cpus)
    decode = (
        f"decoded in the workers ({config.data.decode_threads} thread(s) each)"
        if config.data.decode is DecodeAt.WORKER
        else f"{plan.actors} decode actor(s) x {plan.cpus_per_actor} CPU"
    )
    print(
        f"[data] {config.data.train}: {decode} beside {config.scaling.describe()} worker(s) "
        f"x {config.scaling.cpus_per_worker} CPU on {cpus:g} CPUs",
        flush=True,
    )
    return plan


def check_inputs(config: ExperimentConfig) -> fmt.DatasetMeta:
    """The training set (labels scanned) and the evaluation set (pairs present), before any
    worker starts."""
    meta = fmt.read_meta(config.data.train)
    if meta.image_size != config.data.image_size:
        raise fmt.DatasetError(
            f"{config.data.train}: images are {meta.image_size}x{meta.image_size} but "
            f"data.image_size is {config.data.image_size}"
        )
    check_labels(config.data.train, meta)
    fmt.read_pairs(config.data.eval, fmt.read_meta(config.data.eval))
    for name, uri in val_targets(config).items():  # read (safely) before any worker starts
        bench = read_bin(uri)
        print(f"[data] run.val_targets {name}: {bench.num_pairs} pairs from {uri}", flush=True)
    return meta


# Below this many images per worker, BatchNorm's training-mode statistics are degenerate:
# at 2 every channel of BatchNorm1d is exactly +-1 whatever the input, at 3 two normalised
# values fix the third. Its eval-mode running statistics then drift and embeddings can
# overflow. Every backbone here has BatchNorm.
BATCHNORM_MIN_LOCAL = 4


def small_batch_warning(
    batch_size: int, scaling: settings.ScalingConfig, *, key: str, synced: bool = False
) -> str | None:
    """One line when the global batch ``key`` leaves fewer than :data:`BATCHNORM_MIN_LOCAL`
    images per worker at the largest world size (``synced``, run.sync_batchnorm: the
    statistics span the global batch, which counts instead); None otherwise."""
    workers = scaling.max_workers
    local = batch_size // workers
    if (batch_size if synced else local) >= BATCHNORM_MIN_LOCAL:
        return None
    return (
        f"warning: {key}={batch_size} over {workers} workers is {local} images per worker: "
        f"BatchNorm's batch statistics over fewer than {BATCHNORM_MIN_LOCAL} are degenerate "
        f"(at 2 every channel is exactly +-1) and eval-mode embeddings can overflow; raise "
        f"{key} to at least {BATCHNORM_MIN_LOCAL * workers}, lower scaling.num_workers, or "
        "set run.sync_batchnorm: true"
    )


def checked_inputs(
    config: ExperimentConfig,
) -> tuple[fmt.DatasetMeta, clf.ClassifierMeta | None]:
    """What a student run checks on the driver before it exists: the dataset and its
    labels, the teacher classifier against it (when the method uses W), the teacher (when
    the method runs it per batch). ``config`` has absolute paths."""
    meta = check_inputs(config)
    uses_w = config.loss.method.uses_teacher_classifier
    cmeta = check_classifier(config, meta) if uses_w else None
    check_teacher(config)
    return meta, cmeta


def check_run_inputs(configs: Sequence[ExperimentConfig]) -> None:
    """:func:`checked_inputs` for the jobs that launch many runs (``jobs.tune``,
    ``jobs.compare``), whose runs share the data, the classifier and the teacher and differ
    in method and seed: each input is checked once (the labels scanned once, each teacher
    loaded once), and a bad one fails in seconds instead of in every trial."""
    configs = [absolute_paths(c) for c in configs]
    first = configs[0]
    use_object_store_config(first)
    meta = check_inputs(first)
    users_of_w = [c for c in configs if c.loss.method.uses_teacher_classifier]
    if users_of_w:
        check_classifier(users_of_w[0], meta)
    checked_stages: set[tuple[TeacherStage, ...]] = set()
    for config in configs:
        stages = teacher_stages(config)
        if config.loss.method.needs_teacher_embeddings and stages not in checked_stages:
            checked_stages.add(stages)
            check_teacher(config)


def warn(line: str | None) -> None:
    if line is not None:
        print(line, file=sys.stderr, flush=True)


def check_teacher(config: ExperimentConfig) -> None:
    """When the method runs the teacher per batch: load it here once (any format, its input
    convention applied) and check its width, so a teacher that does not fit fails before
    any worker starts rather than in every worker."""
    if not config.loss.method.needs_teacher_embeddings:
        return

    size = config.data.image_size
    for stage in teacher_stages(config) or (TeacherStage(0, config.teacher.backbone),):
        teacher = load_teacher_backbone(
            replace(config.teacher, backbone=stage.backbone), image_size=size
        )
        width = checked_teacher_width(teacher, stage.backbone, config)
        print(
            f"[teacher] {stage.backbone}: {type(teacher).__name__}, {width}-d, "
            f"format {config.teacher.format.value}",
            flush=True,
        )


def checked_teacher_width(teacher: torch.nn.Module, backbone: str, config: ExperimentConfig) -> int:
    """The teacher's embedding width on the run's images, which must be ``teacher.emb_dim``."""
    size = config.data.image_size
    with torch.no_grad():
        width = int(teacher(torch.zeros(2, 3, size, size)).shape[1])
    if width != config.teacher.emb_dim:
        raise ArtifactError(
            f"{backbone}: the teacher gives {width}-d embeddings on {size}x{size} inputs, "
            f"teacher.emb_dim is {config.teacher.emb_dim} (a network of fixed input size fed "
            "another geometry can give another width: see teacher.input)"
        )
    return width


def teacher_stages(config: ExperimentConfig) -> tuple[TeacherStage, ...]:
    """``multistep``: each stage of ``loss.multistep.schedule`` with its file (checked to
    exist); other methods: none."""
    if config.loss.method is not Method.MULTISTEP:
        return ()
    stages = config.loss.multistep.stages()
    uris = check_stage_files(config.teacher, stages)
    return tuple(TeacherStage(s.from_epoch, uri) for s, uri in zip(stages, uris, strict=True))


def check_labels(uri: str, meta: fmt.DatasetMeta) -> None:
    """Scan the label column of every shard (cheap: one int64 column) before training."""
    for _ in fmt.iter_shards(uri, meta, columns=["label"]):
        pass


def checked_run_name(name: str) -> str:
    if not is_single_component(name):
        raise UsageError(
            f"run name {name!r}: expected a single path component under storage_path "
            "(no '/', '\\', '..')"
        )
    return name


def check_classifier(config: ExperimentConfig, meta: fmt.DatasetMeta) -> clf.ClassifierMeta:
    """The teacher classifier against the dataset (size, label map) and the teacher's width,
    before any run is started."""
    uri = config.teacher.classifier
    cmeta = clf.read_meta(uri)
    clf.validate(
        cmeta,
        f"teacher classifier {uri}",
        num_classes=meta.num_classes,
        emb_dim=config.teacher.emb_dim,
        label_map_fingerprint=meta.label_map_fingerprint,
        dataset=f"dataset {config.data.train}",
        model="the teacher (teacher.emb_dim)",
    )
    return cmeta
