"""The errors caused by input (a config, a dataset, a classifier, a file we load, storage),
which the command line reports as one ``error:`` line with exit code 2, and the way to find
one inside the wrappers Ray puts around an exception raised in a worker."""

from __future__ import annotations

import re
import traceback

from orchestrator.classifier import ClassifierError
from orchestrator.config import ConfigError
from orchestrator.data.format import DatasetError
from orchestrator.data.images import CorruptImageError
from orchestrator.export import NonFiniteStudentError
from orchestrator.formats.loading import ArtifactError
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


REMOTE_TRACE = "proxylesskd_remote_trace"


def unwrapped_user_error(err: BaseException) -> Exception | None:
    """:func:`user_error_in`, keeping the whole failure as Ray reported it (its text holds
    the remote tracebacks) on the error found, for :func:`remote_trace`."""
    cause = user_error_in(err)
    if cause is not None and cause is not err:
        setattr(cause, REMOTE_TRACE, "".join(traceback.format_exception(err)))
    return cause


def remote_trace(err: BaseException) -> str | None:
    """The failure an input error was unwrapped from, as text, or None if it was raised
    where it was caught."""
    trace = getattr(err, REMOTE_TRACE, None)
    return trace if isinstance(trace, str) else None


def user_error_in(err: BaseException) -> Exception | None:
    """The input error at the root of ``err``, if there is one.

    Ray Train reports a failed worker group as ``WorkerGroupError.worker_failures`` (rank ->
    exception, each inside Train's ``UserExceptionWithTraceback``); Ray wraps a task's exception in a ``RayTaskError`` that keeps the original
    as ``cause``; Python chains keep ``__cause__``. The first user error found is returned,
    re-created as its own type with its own message (Ray's wrappers subclass the original
    type and carry the remote traceback in their text)."""
    seen: set[int] = set()
    pending: list[BaseException] = [err]
    wrapped = False  # a Ray wrapper was met: the original may survive only as text
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
        if raised_by_ray(current):  # a wrapper, not the original
            wrapped = True
        elif isinstance(current, USER_ERRORS):
            return current
    if wrapped:
        return user_error_in_text("".join(traceback.format_exception(err)))
    return None


def raised_by_ray(err: BaseException) -> bool:
    """Whether ``err`` is one of Ray's exception types (a wrapper around a remote failure,
    even when it also subclasses the original's type)."""
    return type(err).__module__.startswith("ray.")


def user_error_in_text(text: str) -> Exception | None:
    """The first input error named in a traceback's text, re-created from its message line.

    Some of Ray's wrappers (a Ray Data task's ``UserCodeException``) cross the process
    boundary with the original exception only as text: its qualified class name, ``: ``
    and its message, on a line of their own."""
    found: list[tuple[int, Exception]] = []
    for cls in USER_ERRORS:
        name = (
            cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
        )
        match = re.search(rf"^{re.escape(name)}: (.+)$", text, re.MULTILINE)
        if match:
            found.append((match.start(), cls(match.group(1))))
    return min(found, key=lambda pair: pair[0])[1] if found else None
