"""The student job (``jobs.distill``): check the inputs, place the classifier once, fit the
TorchTrainer, export the student and its best epoch. The rooms it draws on:
:mod:`~orchestrator.train.checks`, :mod:`~orchestrator.train.placement`,
:mod:`~orchestrator.train.trainer`; the teacher role is
:mod:`~orchestrator.train.teacher_job`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from orchestrator import classifier as clf
from orchestrator import storage
from orchestrator.config import (
    ExperimentConfig,
)
from orchestrator.data import format as fmt
from orchestrator.formats.best import load_best_state, read_best
from orchestrator.formats.student import STUDENT_FILE, StudentExport, write_student_export
from orchestrator.runs import (
    RerunPolicy,
    absolute_paths,
    best_uri,
    claim_run,
    ensure_ray,
    ineffective_settings,
    run_lock,
    student_uri,
    use_object_store_config,
)
from orchestrator.train.checks import (
    checked_inputs,
    checked_run_name,
    small_batch_warning,
    teacher_stages,
    warn,
)
from orchestrator.train.placement import place_classifier
from orchestrator.train.resources import preflight
from orchestrator.train.spec import (
    ModelSpec,
    Role,
    TrainSpec,
)
from orchestrator.train.tracked import finish, tracked_fit
from orchestrator.train.trainer import RunOutcome, trained_nothing


def distill(
    config: ExperimentConfig,
    name: str | None = None,
    callbacks: Sequence[Any] = (),
    *,
    rerun: RerunPolicy = RerunPolicy.REFUSE,
    tracking_parent: str | None = None,
) -> RunOutcome:
    """Train the student with ``config.loss.method``; export it to ``<storage>/<name>/student.pt``.

    The run holds its lock for the whole fit (a second live run of the name is refused),
    and a rerun of a name trained with other settings is refused unless ``rerun`` says
    otherwise (:func:`orchestrator.runs.claim_run`). ``tracking_parent``: the MLflow run of
    the search or comparison this run is a trial of."""
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
        return distill_locked(config, name, meta, cmeta, callbacks, tracking_parent)


def distill_locked(
    config: ExperimentConfig,
    name: str,
    meta: fmt.DatasetMeta,
    cmeta: clf.ClassifierMeta | None,
    callbacks: Sequence[Any],
    tracking_parent: str | None = None,
) -> RunOutcome:
    spec = student_spec(config, name, meta, cmeta)
    outcome, tracked = tracked_fit(
        config,
        spec,
        name=name,
        callbacks=callbacks,
        classifier_checksum=None if cmeta is None else clf.checksum(cmeta),
        parent=tracking_parent,
    )
    uri = student_uri(config, name)
    if trained_nothing(outcome) and storage.exists(uri):
        print(f"[run] {name}: finished already, nothing trained; {uri} left as it is")
        finish(config, name, outcome, tracked)
        return outcome
    export = StudentExport.from_state(
        outcome.state,
        arch=config.student.arch,
        emb_dim=config.student.emb_dim,
        image_size=config.data.image_size,
        shape=config.student.shape(),
    )
    write_student_export(uri, export)
    export_best(config, name)
    finish(config, name, outcome, tracked)
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
        model=ModelSpec(
            config.student.arch,
            config.student.emb_dim,
            config.student.dropout,
            shape=config.student.shape(),
        ),
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
        shape=config.student.shape(),
    )
    write_student_export(storage.join(where, STUDENT_FILE), export)
    print(
        f"[run] {name}: best epoch {record.epoch + 1}/{config.optim.epochs} "
        f"({record.metric} {record.value:.4f}) "
        f"-> {storage.join(where, STUDENT_FILE)}",
        flush=True,
    )
