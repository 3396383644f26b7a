"""The errors caused by input (a config, a dataset, a classifier, a file we load, storage),
which the command line reports as one ``error:`` line with exit code 2, and the way to find
one inside the wrappers Ray puts around an exception raised in a worker."""

from __future__ import annotations

from orchestrator.artifacts import ArtifactError
from orchestrator.classifier import ClassifierError
from orchestrator.config import ConfigError
from orchestrator.data.format import DatasetError
from orchestrator.data.images import CorruptImageError
from orchestrator.export import NonFiniteStudentError
from orchestrator.losses.heads import LabelRangeError
from orchestrator.storage import StorageError


class UsageError(ValueError):
    """A command-line argument that names something absent or contradicts another."""


class MissingMetricError(ValueError):
    """A number a decision needs could not be measured (jobs.retrain's gate metric for the
    candidate or the champion): no decision is taken on a missing or non-finite number."""


USER_ERRORS: tuple[type[Exception], ...] = (
    UsageError,
    ConfigError,
    DatasetError,
    ClassifierError,
    CorruptImageError,
    LabelRangeError,
    ArtifactError,
    FileNotFoundError,
    StorageError,
    MissingMetricError,
    NonFiniteStudentError,
)


def user_error_in(err: BaseException) -> Exception | None:
    """The input error at the root of ``err``, if there is one.

    Ray Train reports a failed worker group as ``WorkerGroupError.worker_failures`` (rank ->
    exception, each inside Train's ``UserExceptionWithTraceback``); Ray wraps a task's exception in a ``RayTaskError`` that keeps the original
    as ``cause``; Python chains keep ``__cause__``. The first user error found is returned,
    re-created as its own type with its own message (Ray's wrappers subclass the original
    type and carry the remote traceback in their text)."""
    seen: set[int] = set()
    pending: list[BaseException] = [err]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            pending.extend(failures[rank] for rank in sorted(failures))
        # Train V2 keeps a worker's exception in UserExceptionWithTraceback._base_exc.
        for attr in ("_base_exc", "cause", "__cause__", "__context__"):
            inner = getattr(current, attr, None)
            if isinstance(inner, BaseException):
                pending.append(inner)
        from_ray = type(current).__module__.startswith("ray.")  # a wrapper, not the original
        if isinstance(current, USER_ERRORS) and not from_ray:
            return current
    return None
