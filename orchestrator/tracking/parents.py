"""Searches and comparisons as parent MLflow runs: ``jobs.tune`` and ``jobs.compare`` open
one parent each (its id kept in ``<search or comparison path>/mlflow_parent.json``, so a
resumed search keeps it), every trial's training run is its child, and the parent closes
with the summary's files as artifacts and its numbers as metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from orchestrator import storage
from orchestrator.config import ExperimentConfig
from orchestrator.tracking.client import Tracker, run_exists, target_of
from orchestrator.tracking.runs import (
    RECORD_KEY,
    TrackedRun,
    log_metrics,
    new_run,
    set_tags,
    tracked_run_id,
    upload,
)

PARENT_RECORD = "mlflow_parent.json"
KIND_TAG = "kind"  # search | comparison
METRIC_KEY_JUNK = re.compile(r"[^\w\-. /]")  # what MLflow refuses in a metric's name


def open_parent(config: ExperimentConfig, path: str, *, kind: str) -> TrackedRun | None:
    """The parent run of the search or comparison at ``path``: the one recorded there when
    the server still has it, else a new one."""
    target = target_of(config)
    if target is None:
        return None
    tracker = Tracker(target)
    record_uri = storage.join(path, PARENT_RECORD)
    known = parent_id(path)
    if known and tracker.call("finding the parent run", run_exists, known):
        tracker.call("resuming the parent run", lambda c: c.update_run(known, status="RUNNING"))
        print(f"[tracking] {kind} {config.name}: continuing MLflow run {known}", flush=True)
        return TrackedRun(target, known)
    storage.makedirs(path)
    tags = {KIND_TAG: kind, "storage_path": path}
    run_name = f"{config.name} ({kind})"
    return new_run(tracker, config, run_name=run_name, tags=tags, record_uri=record_uri)


def parent_id(path: str) -> str | None:
    """The parent run recorded at ``path`` (what a trial's run names as its parent)."""
    uri = storage.join(path, PARENT_RECORD)
    if not storage.exists(uri):
        return None
    return str(json.loads(storage.read_text(uri))[RECORD_KEY]["run_id"])


def numeric_leaves(data: Any, prefix: str = "") -> dict[str, float]:
    """Every number in nested ``data`` by its path (``a/b/c``), in names MLflow takes."""
    if isinstance(data, bool) or data is None:
        return {}
    if isinstance(data, int | float):
        return {METRIC_KEY_JUNK.sub("_", prefix): float(data)}
    if isinstance(data, Mapping):
        out: dict[str, float] = {}
        for key, value in data.items():
            out.update(numeric_leaves(value, f"{prefix}/{key}" if prefix else str(key)))
        return out
    return {}


def close_parent(
    run: TrackedRun,
    *,
    metrics: Mapping[str, float],
    artifacts: Mapping[str, str],
    tags: Mapping[str, str] = {},
) -> None:
    """Log the summary's numbers, upload its files, set ``tags`` and end the parent."""
    tracker, run_id = run.tracker(), run.run_id
    # Stamped now: the latest close of a resumed search is what the run shows.
    log_metrics(tracker, run_id, [(0, {k: v for k, v in metrics.items() if v == v})])  # no NaN
    set_tags(tracker, run_id, tags)
    upload(tracker, run_id, artifacts, {})
    tracker.call("ending the parent run", lambda c: c.set_terminated(run_id, status="FINISHED"))


def tag_run(run: TrackedRun, run_id: str, tags: Mapping[str, str]) -> None:
    """Set ``tags`` on another run of the same server (a parent marks its best child)."""
    set_tags(run.tracker(), run_id, tags)


def end_run(
    run: TrackedRun, run_id: str, status: str, *, over: tuple[str, ...] = ("RUNNING",)
) -> None:
    """End another run of the same server with ``status`` where its status is one of
    ``over`` (a trial the scheduler stopped, or one interrupted between its last report and
    its close, is still RUNNING); any other run keeps its status and end time."""

    def end(client: Any) -> bool:
        if client.get_run(run_id).info.status in over:
            client.set_terminated(run_id, status=status)
        return True

    run.tracker().call("ending a trial's run", end)


def end_trial(parent: TrackedRun, root: str, outcome: str) -> None:
    """End the run of the trial or cell whose training run is at ``root``, by its
    ``outcome`` in the summary: completed FINISHED, error FAILED, anything else (stopped by
    the scheduler) KILLED, also over the FAILED of a fit that saw the stop as a failure. A
    trial stopped by the scheduler never closes its run, nor does one interrupted between
    its last report and its close (Ctrl-C) that --resume does not run again."""
    child = tracked_run_id(root)
    if child is None:
        return
    if outcome == "completed":
        end_run(parent, child, "FINISHED")
    elif outcome == "error":
        end_run(parent, child, "FAILED")
    else:
        end_run(parent, child, "KILLED", over=("RUNNING", "FAILED"))
