"""The one way this package talks to MLflow: a :class:`Tracker` whose every call is
bounded (``tracking.retries`` tries of at most ``tracking.timeout_s`` seconds) and can
never fail the work around it. A failure prints one warning line per tracker (with any
credentials in the URI hidden) and the call returns ``None``; the caller carries on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from orchestrator import storage
from orchestrator.config import ExperimentConfig
from orchestrator.config.tracking import redact_uri
from orchestrator.runs import process_env, storage_root

T = TypeVar("T")
DATABASE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"  # beside an SQLite database: its experiments' artifacts
SQLITE_PREFIX = "sqlite:///"  # + an absolute path: sqlite:////data/runs/mlflow.db
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_KIND_TAG, MODEL_TRAINING = (
    "mlflow.experimentKind",
    "custom_model_development",
)  # MLflow's own: used when tracking.uri is empty
# MLflow's own HTTP retries: its defaults (7 retries with backoff, 120 s timeout) would
# hold a run for minutes when the server is gone. Ours wrap each call instead.
HTTP_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
HTTP_TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"
_SAID: set[str] = set()
# After a call failed every try, the tracker skips calls for this long (each skipped call
# fails at once): an outage costs a run one bounded wait, not one per epoch.
COOL_OFF_S = 30.0


@dataclass(frozen=True)
class Target:
    """Where a job logs: the tracking URI, the experiment, and the bounds of each call."""

    uri: str
    experiment: str
    timeout_s: float = 5.0
    retries: int = 2
    log_student: bool = False
    registered_model: str = ""

    @property
    def shown(self) -> str:
        """The URI as it may be printed."""
        return redact_uri(self.uri)

    @property
    def artifact_root(self) -> str | None:
        """Where a new experiment keeps its artifacts: beside an SQLite database
        (``<its folder>/mlartifacts``; MLflow's default would be ``./mlruns`` in whatever
        directory the job runs in); a server decides for itself (None)."""
        if not self.uri.startswith(SQLITE_PREFIX):
            return None
        database = self.uri.removeprefix(SQLITE_PREFIX)
        return f"file://{os.path.join(os.path.dirname(database), ARTIFACTS_DIR)}"


def target_of(config: ExperimentConfig) -> Target | None:
    """Where ``config``'s jobs log, or None: tracking off, or no URI given (``tracking.uri``
    or ``$MLFLOW_TRACKING_URI``) with the runs on object storage (a database file cannot
    live in a bucket; one line says so)."""
    tracking = config.tracking
    if not tracking.enabled:
        return None
    uri = tracking.uri or os.environ.get(TRACKING_URI_ENV, "")
    if not uri:
        root = storage_root(config)
        if not storage.is_local(root):
            say_once(
                f"[tracking] off: storage_path {root} is on object storage and tracking.uri "
                "and MLFLOW_TRACKING_URI are empty (set one to an MLflow server to log these runs)"
            )
            return None
        uri = local_database_uri(root)
    return Target(
        uri=uri,
        experiment=tracking.experiment or config.name,
        timeout_s=tracking.timeout_s,
        retries=tracking.retries,
        log_student=tracking.log_student,
        registered_model=tracking.registered_model or config.name,
    )


def local_database_uri(root: str) -> str:
    """The embedded default: ``sqlite:///<storage_path>/mlflow.db`` (absolute)."""
    path = os.path.abspath(root.removeprefix("file://"))
    return f"{SQLITE_PREFIX}{os.path.join(path, DATABASE_FILE)}"


def ui_command(target: Target) -> str:
    """The command that opens the MLflow UI on ``target`` (a database file is served by a
    local ``mlflow ui``; a server is opened in the browser)."""
    if target.uri.startswith("sqlite:"):
        mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
        return f"{mlflow} ui --backend-store-uri {target.uri} --port 5000"
    return f"open {target.shown} in a browser"


def say_once(line: str) -> None:
    if line not in _SAID:
        _SAID.add(line)
        print(line, file=sys.stderr, flush=True)


class Tracker:
    """An MLflow client for ``target`` whose calls never raise (see the module's doc)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.failures = 0
        self.resting_until = 0.0  # time.monotonic() before which calls are skipped
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            # mlflow: heavy (about 1.5 s to import), loaded only when a job tracks
            from mlflow import MlflowClient

            # MLflow announces every database migration and artifact upload at INFO (its
            # import sets its loggers up, hence after it).
            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)

            self._client = MlflowClient(tracking_uri=self.target.uri)
        return self._client

    def call(self, what: str, action: Callable[..., T], *args: Any) -> T | None:
        """``action(client, *args)``, tried ``target.retries`` times; None (and one warning line
        per tracker) when every try failed, and at once while resting after such a failure."""
        if time.monotonic() < self.resting_until:
            self.failures += 1
            return None
        error: Exception | None = None
        for attempt in range(self.target.retries):
            try:
                with self.bounded():
                    return action(self.client(), *args)
            except Exception as err:  # any backend failure: the work goes on without it
                error = err
                if attempt + 1 < self.target.retries:
                    time.sleep(min(self.target.timeout_s, 0.5 * 2**attempt))
        self.failures += 1
        self.resting_until = time.monotonic() + COOL_OFF_S
        if self.failures == 1:
            print(
                f"warning: tracking: {what} failed at {self.target.shown} "
                f"({self.problem(error)}); the work goes on without it",
                file=sys.stderr,
                flush=True,
            )
        return None

    @contextlib.contextmanager
    def bounded(self) -> Iterator[None]:
        """MLflow's HTTP bounds for our own calls only (a user's settings of them win): set
        for the process, they bounded every other MLflow client in it too (seen in a test
        whose own reads timed out after 1 s)."""
        retries = os.environ.get(HTTP_RETRIES_ENV, "0")
        timeout = os.environ.get(HTTP_TIMEOUT_ENV, f"{self.target.timeout_s:g}")
        with process_env(HTTP_RETRIES_ENV, retries), process_env(HTTP_TIMEOUT_ENV, timeout):
            yield

    def problem(self, error: Exception | None) -> str:
        text = str(error).strip().splitlines()[0] if error is not None and str(error) else ""
        text = redact_uri(storage.redact(text)).replace(self.target.uri, self.target.shown)
        return f"{type(error).__name__}: {text[:200]}"

    def experiment_id(self) -> str | None:
        """The experiment's id, created when it does not exist yet."""

        def find_or_create(client: Any) -> str:
            found = client.get_experiment_by_name(self.target.experiment)
            if found is not None:
                return str(found.experiment_id)
            # The UI opens it as model training (MLflow 3 opens an untagged one as GenAI).
            tags = {EXPERIMENT_KIND_TAG: MODEL_TRAINING}
            return str(
                client.create_experiment(
                    self.target.experiment, artifact_location=self.target.artifact_root, tags=tags
                )
            )

        return self.call(f"opening experiment {self.target.experiment!r}", find_or_create)


def run_exists(client: Any, run_id: str) -> bool:
    """Whether the server has ``run_id`` (a run deleted there is not an outage)."""
    # mlflow: heavy, loaded only when a job tracks
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True
