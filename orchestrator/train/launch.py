"""The driver side of a training run: check inputs, place the classifier in the object
store once, build and fit the TorchTrainer, export the result.

Every input problem is found here, before any worker starts or any step is taken: a label
outside [0, C), a classifier whose size, embedding width or label map does not match.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from orchestrator import classifier as clf
from orchestrator import config as settings
from orchestrator import storage
from orchestrator.benchmarks.verification_bin import read_bin
from orchestrator.config import (
    ClassifierMode,
    DecodeAt,
    ExperimentConfig,
    Method,
    is_single_component,
    to_dict,
    val_targets,
)
from orchestrator.data import format as fmt
from orchestrator.data.consumed import skip_dir
from orchestrator.data.ray_input import DecodePlan, decode_plan, training_dataset
from orchestrator.errors import UsageError, unwrapped_user_error
from orchestrator.formats.best import load_best_state, read_best
from orchestrator.formats.loading import ArtifactError, ClassifierRef
from orchestrator.formats.state import TrainingState, load_state
from orchestrator.formats.student import STUDENT_FILE, StudentExport, write_student_export
from orchestrator.metric_names import Metric
from orchestrator.runs import (
    RerunPolicy,
    absolute_paths,
    best_uri,
    claim_run,
    ensure_ray,
    ineffective_settings,
    object_store_env,
    process_env,
    run_dir,
    run_lock,
    storage_root,
    student_uri,
    use_object_store_config,
)
from orchestrator.teacher.checkpoint import TeacherCheckpoint, save_teacher
from orchestrator.teacher.classifiers import (
    check_stage_files,
    classifier_from_checkpoint,
    snapshot_uri,
)
from orchestrator.train.resources import preflight
from orchestrator.train.spec import (
    ClassifierSource,
    DenseClassifier,
    ModelSpec,
    Role,
    ShardedClassifier,
    TeacherSnapshots,
    TeacherStage,
    TrainSpec,
)
from orchestrator.train.worker import train_loop_per_worker


def input_plan(config: ExperimentConfig) -> DecodePlan:
    import ray

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
    from orchestrator.teacher.models import load_teacher_backbone

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


@dataclass(frozen=True)
class RunOutcome:
    name: str
    checkpoint_path: str
    state: TrainingState
    metrics: dict[str, Any]
    wall_seconds: float


def fit(
    config: ExperimentConfig,
    spec: TrainSpec,
    *,
    name: str,
    callbacks: Sequence[Any] = (),
    dataset: Any = None,
) -> RunOutcome:
    """Run ``train_loop_per_worker`` on ``config.scaling.num_workers`` workers.

    Reusing ``name`` under the same storage path resumes from its latest checkpoint.
    ``callbacks`` go to Train's RunConfig (a Tune trial passes ``TuneReportCallback``).
    ``dataset`` replaces the Parquet input (a Ray Dataset with ``image``, ``label`` and
    ``image_id`` columns: ``bench/train_throughput.py`` feeds decoded images from memory).
    An input error raised in a worker (a corrupt image, a bad label) is re-raised here as
    itself, not inside Ray's wrappers.
    """
    ensure_ray()
    preflight(config)  # again: a Tune trial or a caller may reach fit directly
    trainer = torch_trainer(config, spec, name=name, callbacks=callbacks, dataset=dataset)
    started = time.monotonic()
    try:
        with controller_env(config):
            result = trainer.fit()
        if result.error is not None:
            raise result.error
    except Exception as err:  # Train V2 raises a failed run's error from fit()
        cause = unwrapped_user_error(err)
        if cause is not None:
            raise cause from None
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"run {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = load_state(directory)
    return RunOutcome(
        name, result.checkpoint.path, state, dict(result.metrics or {}), time.monotonic() - started
    )


WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@contextlib.contextmanager
def controller_env(config: ExperimentConfig) -> Iterator[None]:
    """The settings Ray Train's controller reads from its environment, which it takes from
    the driver's when ``fit`` creates it: this process's, for the length of the call."""
    with process_env(WORKER_START_TIMEOUT_ENV, f"{config.scaling.worker_start_timeout_s:g}"):
        yield


def run_dataset(config: ExperimentConfig, name: str) -> Any:
    """The run's Parquet input; with checkpoints inside epochs, read past the images a
    resumed epoch already trained (the run's skip directory)."""
    skip = skip_dir(run_dir(config, name)) if config.run.checkpoint_every_steps else None
    return training_dataset(config.data, input_plan(config), config.seed, skip_dir=skip)


def torch_trainer(
    config: ExperimentConfig,
    spec: TrainSpec,
    *,
    name: str,
    callbacks: Sequence[Any],
    dataset: Any = None,
) -> Any:
    # Train V2's classes (what ray.train.* resolves to at run time), named so types agree.
    from ray.data import ExecutionOptions
    from ray.train import DataConfig
    from ray.train.v2.api.config import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(config), "spec": spec},
        scaling_config=ScalingConfig(
            num_workers=(config.scaling.min_workers, config.scaling.max_workers)
            if config.scaling.elastic
            else config.scaling.max_workers,
            elastic_resize_monitor_interval_s=config.scaling.resize_check_s,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": config.scaling.cpus_per_worker},
        ),
        datasets={"train": dataset if dataset is not None else run_dataset(config, name)},
        # Explicit ingest options: Train's defaults copy the deprecated
        # ExecutionOptions.exclude_resources (a RayDeprecationWarning on every run).
        # preserve_order makes the split of each epoch's rows over the workers a function of
        # the data alone (Ray's splitter then also ignores locality hints).
        dataset_config=DataConfig(
            execution_options=ExecutionOptions(preserve_order=config.data.ordered)
        ),
        run_config=RunConfig(
            name=name,
            callbacks=list(callbacks),
            storage_path=storage_root(config),
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.run.keep_checkpoints or None),
            # Our per-epoch lines are the progress a person reads: Train's own INFO lines
            # repeat them, and its print patch would print each of ours twice.
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={
                "env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **object_store_env(config)}
            },
        ),
    )


def distill(
    config: ExperimentConfig,
    name: str | None = None,
    callbacks: Sequence[Any] = (),
    *,
    rerun: RerunPolicy = RerunPolicy.REFUSE,
) -> RunOutcome:
    """Train the student with ``config.loss.method``; export it to ``<storage>/<name>/student.pt``.

    The run holds its lock for the whole fit (a second live run of the name is refused),
    and a rerun of a name trained with other settings is refused unless ``rerun`` says
    otherwise (:func:`orchestrator.runs.claim_run`)."""
    name = checked_run_name(name or config.name)
    config = absolute_paths(config)
    use_object_store_config(config)
    meta, cmeta = checked_inputs(config)
    synced = config.run.sync_batchnorm
    batch = config.optim.batch_size
    warn(small_batch_warning(batch, config.scaling, key="optim.batch_size", synced=synced))
    unused = ineffective_settings(config, Role.STUDENT.value)
    warn(f"warning: settings with no effect in this run: {', '.join(unused)}" if unused else None)
    ensure_ray()  # before the classifier's ray.put: every method gets the same cluster
    preflight(config)  # every input and the cluster's size checked before a run exists
    with run_lock(config, name):
        claim_run(config, name, role=Role.STUDENT.value, policy=rerun)
        return distill_locked(config, name, meta, cmeta, callbacks)


def distill_locked(
    config: ExperimentConfig,
    name: str,
    meta: fmt.DatasetMeta,
    cmeta: clf.ClassifierMeta | None,
    callbacks: Sequence[Any],
) -> RunOutcome:
    spec = student_spec(config, name, meta, cmeta)
    outcome = fit(config, spec, name=name, callbacks=callbacks)
    uri = student_uri(config, name)
    if trained_nothing(outcome) and storage.exists(uri):
        print(f"[run] {name}: finished already, nothing trained; {uri} left as it is")
        return outcome
    export = StudentExport.from_state(
        outcome.state,
        arch=config.student.arch,
        emb_dim=config.student.emb_dim,
        image_size=config.data.image_size,
    )
    write_student_export(uri, export)
    export_best(config, name)
    return outcome


def student_spec(
    config: ExperimentConfig,
    name: str,
    meta: fmt.DatasetMeta,
    cmeta: clf.ClassifierMeta | None,
) -> TrainSpec:
    """What the workers of student run ``name`` train (the classifier placed on the
    cluster: put in the object store, or read per rank)."""
    method = config.loss.method
    return TrainSpec(
        role=Role.STUDENT,
        model=ModelSpec(config.student.arch, config.student.emb_dim, config.student.dropout),
        loss=config.loss,
        optim=config.optim,
        num_classes=meta.num_classes,
        num_images=meta.num_images,
        classifier=None if cmeta is None else place_classifier(config, cmeta),
        teacher=config.teacher if method.needs_teacher_embeddings else None,
        eval_uri=config.data.eval or None,
        best_uri=best_uri(config, name) if config.run.keep_best else None,
        teacher_stages=teacher_stages(config),
    )


def export_best(config: ExperimentConfig, name: str) -> None:
    """``<run>/best/student.pt`` from the best validated state, when the run kept one."""
    where = best_uri(config, name)
    record = read_best(where) if config.run.keep_best else None
    if record is None:
        return
    export = StudentExport.from_state(
        load_best_state(where, record),
        arch=config.student.arch,
        emb_dim=config.student.emb_dim,
        image_size=config.data.image_size,
    )
    write_student_export(storage.join(where, STUDENT_FILE), export)
    print(
        f"[run] {name}: best epoch {record.epoch + 1}/{config.optim.epochs} "
        f"({record.metric} {record.value:.4f}) "
        f"-> {storage.join(where, STUDENT_FILE)}",
        flush=True,
    )


def trained_nothing(outcome: RunOutcome) -> bool:
    """A rerun of a finished run: its exports stay those of the run that trained them."""
    return outcome.metrics.get("epochs_this_attempt", 1) == 0


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


def place_classifier(config: ExperimentConfig, cmeta: clf.ClassifierMeta) -> ClassifierSource:
    """Either ``ray.put`` the (checked) classifier once (dense: each node holds one shared
    copy and workers get read-only views) or leave it in storage for each worker to read
    its own rows."""
    import ray

    uri = config.teacher.classifier
    ref = ClassifierRef(uri, clf.checksum(cmeta))
    if use_sharded(config, cmeta):
        print(
            f"classifier {cmeta.num_classes} x {cmeta.emb_dim}: sharded over "
            f"{config.scaling.describe()} workers (each reads its own rows, re-read at a resize)",
            flush=True,
        )
        return ShardedClassifier(ref, cmeta, config.sharding.sample_rate)
    if config.sharding.sample_rate < 1.0:
        print(
            f"warning: sharding.sample_rate {config.sharding.sample_rate} has no effect: "
            f"sharding.mode auto chose the dense layout for W of {cmeta.num_classes} x "
            f"{cmeta.emb_dim} (set sharding.mode: sharded to sample negatives)",
            file=sys.stderr,
            flush=True,
        )
    # Unit fp32 rows (the reader normalises), so workers use the node's copy as it is.
    return DenseClassifier(ref, ray.put(clf.load_full(uri, cmeta)))


def use_sharded(config: ExperimentConfig, meta: clf.ClassifierMeta) -> bool:
    """The rule of ShardingConfig: explicit mode, or auto by worker count and W's size."""
    match config.sharding.mode:
        case ClassifierMode.SHARDED:
            return True
        case ClassifierMode.DENSE:
            return False
        case ClassifierMode.AUTO:
            fp32_bytes = meta.num_classes * meta.emb_dim * 4
            return (
                config.loss.method.shardable
                and config.scaling.max_workers > 1
                and fp32_bytes >= config.sharding.auto_min_bytes
            )


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
    outcome = fit(config, spec, name=name)
    if trained_nothing(outcome) and storage.exists(config.teacher.backbone):
        print(f"[run] {name}: finished already; {config.teacher.backbone} left as it is")
        return outcome
    export_teacher(config, outcome.state, meta)
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


def summary(outcome: RunOutcome) -> dict[str, Any]:
    headline = (Metric.ACC_10FOLD, Metric.AUC, Metric.RANK1)
    keep = (
        "loss",
        "samples_per_s",
        "input_wait_share",
        "best_epoch",
        "val_nonfinite",
        *(m.validation_key for m in headline),
    )
    history = outcome.state.history
    return {
        "name": outcome.name,
        "checkpoint": outcome.checkpoint_path,
        "epochs_done": list(history.epochs_done),
        # Each attempt's worker count, and the epoch each restart resumed in.
        "world_sizes": list(history.world_sizes),
        "resumed_at": list(history.resumed_at),
        "train_seconds": round(history.train_seconds, 1),
        "throughput": [
            {"epoch": epoch, "samples_per_s": round(rate, 1), "input_wait_share": round(wait, 3)}
            for epoch, (rate, wait) in history.measured_throughput()
        ],
        **{
            k: (round(v, 4) if isinstance(v, float) and np.isfinite(v) else v)
            for k, v in outcome.metrics.items()
            if k in keep
        },
    }
