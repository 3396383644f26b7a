"""A training run as one MLflow run.

The driver opens it (:func:`open_run`) and keeps its id in the run's ``run.json``, so a
resumed run (mid-epoch, elastic, a resubmitted driver) continues the same MLflow run. The
Ray Train controller logs rank 0's report after every epoch as it arrives
(:class:`EpochLogger`; an unreachable server costs it one bounded call, then a cool-off).
When the fit returns, the driver closes the run (:func:`close_run`): every epoch's figures
from the final checkpoint's history that the server does not have yet are logged then (an
outage in the middle of a run leaves no gap once the server is back; what still cannot be
logged is named), and the artifacts and the final tags follow.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ray.train.v2.api.callback import UserCallback

from orchestrator import storage
from orchestrator.config import ExperimentConfig, to_dict
from orchestrator.data.format import dataset_fingerprint
from orchestrator.formats.state import RunHistory
from orchestrator.runs import RUN_RECORD, flatten, run_dir
from orchestrator.tracking.client import Target, Tracker, run_exists, target_of

RECORD_KEY = "mlflow"  # run.json: {"run_id": ..., "experiment": ..., "uri": (redacted)}
PARENT_TAG = "mlflow.parentRunId"
CHANGED_TAG = "param_changed."  # + a param's key: its value in a later attempt
# The per-epoch figures a run logs (with the validation metrics ``val_*`` of an epoch
# validated); each is logged at the run's optimizer step at the end of the epoch.
CURVE_KEYS = ("loss", "lr", "samples_per_s", "input_startup_s", "input_wait_share")
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value
PARAMS_PER_CALL = 100  # and on the params of one log_batch
METRICS_PER_CALL = 1000
TAGS_PER_CALL = 100  # MLflow's limit on the tags of one log_batch


@dataclass(frozen=True)
class TrackedRun:
    target: Target
    run_id: str

    def tracker(self) -> Tracker:
        return Tracker(self.target)


def open_run(
    config: ExperimentConfig,
    name: str,
    *,
    tags: Mapping[str, str],
    parent: str | None = None,
) -> TrackedRun | None:
    """The MLflow run of training run ``name``: the one its ``run.json`` names when the
    server still has it (a resume), else a new one (its id written to ``run.json``).
    None when tracking is off or the backend cannot be reached (one warning line)."""
    target = target_of(config)
    if target is None:
        return None
    tracker = Tracker(target)
    known = tracked_run_id(run_dir(config, name))
    if known and tracker.call("finding the run", run_exists, known):
        tracker.call("resuming the run", lambda c: c.update_run(known, status="RUNNING"))
        log_params(tracker, known, config)
        print(f"[tracking] {name}: continuing MLflow run {known} at {target.shown}", flush=True)
        return TrackedRun(target, known)
    all_tags = {**tags, **({PARENT_TAG: parent} if parent else {})}
    record_uri = storage.join(run_dir(config, name), RUN_RECORD)
    return new_run(tracker, config, run_name=name, tags=all_tags, record_uri=record_uri)


def new_run(
    tracker: Tracker,
    config: ExperimentConfig,
    *,
    run_name: str,
    tags: Mapping[str, str],
    record_uri: str,
) -> TrackedRun | None:
    """A new MLflow run with ``config`` as its params, its id recorded in the JSON file at
    ``record_uri`` (beside what that file holds already) so that a resume finds it."""
    experiment = tracker.experiment_id()
    if experiment is None:
        return None
    made = tracker.call(
        "creating the run", lambda c: c.create_run(experiment, run_name=run_name, tags=tags)
    )
    if made is None:
        return None
    run_id, target = str(made.info.run_id), tracker.target
    record = json.loads(storage.read_text(record_uri)) if storage.exists(record_uri) else {}
    record[RECORD_KEY] = {"run_id": run_id, "experiment": target.experiment, "uri": target.shown}
    storage.write_text_atomic(record_uri, json.dumps(record, indent=2, sort_keys=True))
    log_params(tracker, run_id, config)
    print(f"[tracking] {run_name}: MLflow run {run_id} at {target.shown}", flush=True)
    return TrackedRun(target, run_id)


def tracked_run_id(root: str) -> str | None:
    """The MLflow run of the training run at ``root``, as its ``run.json`` records it."""
    uri = storage.join(root, RUN_RECORD)
    if not storage.exists(uri):
        return None
    found = json.loads(storage.read_text(uri)).get(RECORD_KEY, {}).get("run_id")
    return None if found is None else str(found)


def log_params(tracker: Tracker, run_id: str, config: ExperimentConfig) -> None:
    """The flattened config as the run's params; on a resume only the keys the run does not
    have yet (MLflow's params cannot change; run.json's fingerprint guards the rest)."""
    from mlflow.entities import Param  # mlflow: heavy, loaded only when a job tracks

    run = tracker.call("reading the run's params", lambda c: c.get_run(run_id))
    have: dict[str, str] = {} if run is None else dict(run.data.params)
    wanted = {key: value[:MAX_PARAM_CHARS] for key, value in config_params(config).items()}
    params = [Param(key, value) for key, value in wanted.items() if key not in have]
    # A run resumed with other settings (more epochs, --resume-anyway): the new values.
    changed = sorted(k for k in wanted.keys() & have.keys() if wanted[k] != have[k])
    set_tags(tracker, run_id, {f"{CHANGED_TAG}{key}": wanted[key] for key in changed})
    for start in range(0, len(params), PARAMS_PER_CALL):
        chunk = params[start : start + PARAMS_PER_CALL]
        tracker.call("logging params", lambda c, part: c.log_batch(run_id, params=part), chunk)


def config_params(config: ExperimentConfig) -> dict[str, str]:
    """Every config setting by dotted key, as text (lists as JSON)."""
    return {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in flatten(to_dict(config)).items()
    }


def curve_metrics(figures: Mapping[str, Any], *, validated: bool) -> dict[str, float]:
    """The figures of one epoch that are drawn as curves: :data:`CURVE_KEYS`, and the
    validation metrics when the epoch was validated."""
    keys = [k for k in CURVE_KEYS if k in figures]
    if validated:
        keys += sorted(k for k in figures if k.startswith("val_"))
    return {k: float(figures[k]) for k in keys}


class EpochLogger(UserCallback):
    """Runs in Ray Train's controller: after each epoch's report, rank 0's figures are
    logged to ``run``. Synchronous, so that every live log is done when the fit returns
    and :func:`close_run` never logs an epoch twice; a server that fails is left alone for
    a while (:data:`~orchestrator.tracking.client.COOL_OFF_S`), so an outage costs the
    controller one bounded call, and :func:`close_run` logs what it missed."""

    def __init__(self, run: TrackedRun) -> None:
        self.run = run
        self._tracker: Tracker | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"run": self.run, "_tracker": None}

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        first = metrics[0] if metrics else {}
        if "global_step" not in first:
            return  # a checkpoint inside an epoch, or the rerun of a finished run
        if self._tracker is None:
            self._tracker = self.run.tracker()
        figures = curve_metrics(first, validated=bool(first.get("validated")))
        log_metrics(self._tracker, self.run.run_id, [(int(first["global_step"]), figures)])


def log_metrics(
    tracker: Tracker, run_id: str, epochs: Iterable[tuple[int, Mapping[str, float]]]
) -> bool:
    """Log each (step, figures) pair, stamped now (at equal step and time MLflow shows the
    largest value ever logged; a later time wins); whether every call went through."""
    from mlflow.entities import Metric  # mlflow: heavy, loaded only when a job tracks

    now = int(time.time() * 1000)
    entries = [
        Metric(key, value, now, step) for step, figures in epochs for key, value in figures.items()
    ]
    ok = True
    for start in range(0, len(entries), METRICS_PER_CALL):
        chunk = entries[start : start + METRICS_PER_CALL]
        done = tracker.call(
            "logging metrics", lambda c, part: c.log_batch(run_id, metrics=part) or True, chunk
        )
        ok = ok and done is not None
    return ok


def set_tags(tracker: Tracker, run_id: str, tags: Mapping[str, str]) -> None:
    """Set ``tags`` on the run, in as few calls as MLflow takes."""
    from mlflow.entities import RunTag  # mlflow: heavy, loaded only when a job tracks

    entries = [RunTag(key, value) for key, value in tags.items()]
    for start in range(0, len(entries), TAGS_PER_CALL):
        chunk = entries[start : start + TAGS_PER_CALL]
        tracker.call("setting tags", lambda c, part: c.log_batch(run_id, tags=part), chunk)


def logged_steps(tracker: Tracker, run_id: str, key: str) -> set[int] | None:
    """The steps at which the run has ``key``; None when the server cannot say."""
    found = tracker.call(f"reading {key}", lambda c: c.get_metric_history(run_id, key))
    return None if found is None else {int(m.step) for m in found}


def missing_epochs(
    tracker: Tracker, run_id: str, curves: Iterable[Mapping[str, float]]
) -> list[tuple[int, dict[str, float]]] | None:
    """The figures of ``curves`` the run does not have yet, by step; None when the server
    cannot be read."""
    wanted = [
        (int(c["step"]), {k: v for k, v in c.items() if k not in ("epoch", "step")}) for c in curves
    ]
    have: dict[str, set[int]] = {}
    for key in sorted({k for _, figures in wanted for k in figures}):
        steps = logged_steps(tracker, run_id, key)
        if steps is None:
            return None
        have[key] = steps
    missing = [
        (step, {k: v for k, v in figures.items() if step not in have[k]})
        for step, figures in wanted
    ]
    return [(step, figures) for step, figures in missing if figures]


def close_run(
    run: TrackedRun,
    *,
    name: str,
    curves: Iterable[Mapping[str, float]],
    tags: Mapping[str, str],
    artifacts: Mapping[str, str],
    texts: Mapping[str, str] = {},
    status: str = "FINISHED",
) -> None:
    """Log what the run lacks of ``curves``, set ``tags``, upload ``artifacts`` (artifact
    path -> storage URI, read as bytes) and ``texts`` (artifact path -> content), and end
    the run with ``status``."""
    tracker, run_id = run.tracker(), run.run_id
    curves = list(curves)
    missing = missing_epochs(tracker, run_id, curves)
    if missing:
        log_metrics(tracker, run_id, missing)
        missing = missing_epochs(tracker, run_id, curves)
    if missing is None or missing:
        lost = "all" if missing is None else ", ".join(str(step) for step, _ in missing)
        print(
            f"warning: tracking: {name}: epoch figures not logged to MLflow run {run_id} "
            f"(steps: {lost}); the run summary (summary.json) holds them",
            flush=True,
        )
    set_tags(tracker, run_id, tags)
    upload(tracker, run_id, artifacts, texts)
    tracker.call("ending the run", lambda c: c.set_terminated(run_id, status=status))


def upload(
    tracker: Tracker, run_id: str, artifacts: Mapping[str, str], texts: Mapping[str, str]
) -> None:
    """Each artifact's bytes as they are in storage, under its artifact path."""
    with tempfile.TemporaryDirectory() as local:
        files = {
            path: storage.read_bytes(uri) for path, uri in artifacts.items() if storage.exists(uri)
        }
        files.update({path: text.encode() for path, text in texts.items()})
        for path, data in files.items():
            where = os.path.join(local, path)
            os.makedirs(os.path.dirname(where), exist_ok=True)
            with open(where, "wb") as out:
                out.write(data)
            folder = os.path.dirname(path) or None
            tracker.call(
                f"uploading {path}",
                lambda c, w, f: c.log_artifact(run_id, w, artifact_path=f),
                where,
                folder,
            )


def attach(config: ExperimentConfig, name: str, artifacts: Mapping[str, str]) -> None:
    """Upload ``artifacts`` (artifact path -> storage URI) to training run ``name``'s MLflow
    run, when it has one (an evaluation report made after the run)."""
    target, run_id = target_of(config), tracked_run_id(run_dir(config, name))
    if target is not None and run_id is not None:
        upload(Tracker(target), run_id, artifacts, {})


def end_failed(run: TrackedRun | None, err: BaseException) -> None:
    """End ``run`` whose work raised ``err``: KILLED for Ctrl-C (it can be resumed), else
    FAILED."""
    if run is None:
        return
    status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
    run.tracker().call("ending the run", lambda c: c.set_terminated(run.run_id, status))


SUMMARY_FILE = "summary.json"


def start_tags(
    config: ExperimentConfig, name: str, *, role: str, classifier_checksum: str | None
) -> dict[str, str]:
    """What identifies a training run, set when its MLflow run is made."""
    record_uri = storage.join(run_dir(config, name), RUN_RECORD)
    record = json.loads(storage.read_text(record_uri)) if storage.exists(record_uri) else {}
    tags = {
        "run_name": name,
        "role": role,
        "method": config.loss.method.value if role == "student" else "teacher",
        "fingerprint": str(record.get("fingerprint", "")),
        "code_version": str(record.get("code_version", "")),
        "dataset": config.data.train,
        "dataset_fingerprint": dataset_fingerprint(config.data.train),
        "storage_path": run_dir(config, name),
    }
    if classifier_checksum:
        tags["classifier_checksum"] = classifier_checksum
    return tags


def history_tags(history: RunHistory) -> dict[str, str]:
    """How the run got there: its attempts' world sizes and the points each resumed at."""
    return {
        "world_sizes": json.dumps(list(history.world_sizes)),
        "resumed_at_epoch": json.dumps(list(history.resumed_at)),
        "resumed_at_step": json.dumps(list(history.resumed_steps)),
        "epochs_done": json.dumps(list(history.epochs_done)),
    }
