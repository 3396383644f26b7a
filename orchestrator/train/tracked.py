"""A fit mirrored in MLflow (:mod:`orchestrator.tracking.runs`): the run is opened before
the fit, logged per epoch by the controller while it trains, and closed with its summary
(``<run>/summary.json``, written whether or not anything tracks) when the fit returns."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from orchestrator import storage
from orchestrator.config import ExperimentConfig
from orchestrator.runs import run_dir, student_uri
from orchestrator.tracking.runs import (
    SUMMARY_FILE,
    EpochLogger,
    TrackedRun,
    close_run,
    end_failed,
    history_tags,
    open_run,
    start_tags,
)
from orchestrator.train.spec import TrainSpec
from orchestrator.train.trainer import RunOutcome, fit, summary


def tracked_fit(
    config: ExperimentConfig,
    spec: TrainSpec,
    *,
    name: str,
    callbacks: Sequence[Any] = (),
    classifier_checksum: str | None = None,
    parent: str | None = None,
) -> tuple[RunOutcome, TrackedRun | None]:
    """:func:`~orchestrator.train.trainer.fit`, with its MLflow run (None when nothing
    tracks); a fit that raises ends its MLflow run as failed."""
    tags = start_tags(config, name, role=spec.role.value, classifier_checksum=classifier_checksum)
    tracked = open_run(config, name, tags=tags, parent=parent)
    logger = [] if tracked is None else [EpochLogger(tracked)]
    try:
        return fit(config, spec, name=name, callbacks=[*callbacks, *logger]), tracked
    except BaseException as err:
        end_failed(tracked, err)
        raise


def finish(
    config: ExperimentConfig, name: str, outcome: RunOutcome, tracked: TrackedRun | None
) -> None:
    """Write ``<run>/summary.json``; close the MLflow run with it, its curves and tags."""
    uri = storage.join(run_dir(config, name), SUMMARY_FILE)
    storage.write_text_atomic(uri, json.dumps(summary(outcome), indent=2, sort_keys=True))
    if tracked is None:
        return
    artifacts = {SUMMARY_FILE: uri}
    if config.tracking.log_student and storage.exists(student_uri(config, name)):
        artifacts["student/student.pt"] = student_uri(config, name)
    close_run(
        tracked,
        name=name,
        curves=outcome.state.history.curves,
        tags=history_tags(outcome.state.history),
        artifacts=artifacts,
    )
