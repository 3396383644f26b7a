"""Shared command-line plumbing: --config/--set, and errors a user can act on."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence

from orchestrator.config import ExperimentConfig, load_config
from orchestrator.errors import USER_ERRORS, raised_by_ray, remote_trace, unwrapped_user_error
from orchestrator.storage import redact, use_endpoint


def description(doc: str | None) -> str:
    """A module docstring's first paragraph, as one line: the ``--help`` description."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML (configs/*.yaml); defaults if omitted")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, type-checked (repeatable), e.g. --set loss.margin.m=0.45",
    )


def add_resume_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """``--resume``: continue the interrupted ``what`` (a Tune experiment) of this name."""
    parser.add_argument(
        "--resume", action="store_true", help=f"continue the interrupted {what} of this name"
    )


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The config, with its object-store endpoint and region put in this process's
    ``AWS_*`` environment for every S3 client to see."""
    config = load_config(args.config, args.overrides)
    use_endpoint(config.storage.endpoint_url, config.storage.region)
    return config


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main``; a user error prints ``error: ...`` and returns 2 instead of a traceback.

    An input error raised inside a Ray worker, actor or Ray Data task counts too: the line
    is the error's own message, and the whole failure as Ray reported it (the remote
    tracebacks) goes to a log file the line names (:func:`error_log`). Anything else prints
    its traceback and returns 1. Both pass through :func:`redact`, so a secret that some
    library put in a message is never printed. Ctrl-C prints one line and returns 130
    (128 + SIGINT, what a shell reports for an interrupted command).
    """
    try:
        return main(argv)
    except KeyboardInterrupt as err:
        said = str(err) or "runs keep their last checkpoint; the same command resumes them"
        print(f"interrupted: {said}", file=sys.stderr)
        return 130
    except Exception as err:
        cause = input_error(err)
        if cause is None:
            print(redact(traceback.format_exc()), file=sys.stderr, end="")
            return 1
        trace = remote_trace(cause)
        where = "" if trace is None else f" (traceback: {error_log(main, redact(trace))})"
        print(redact(f"error: {cause}{where}"), file=sys.stderr)
        return 2


def input_error(err: Exception) -> Exception | None:
    """``err`` if it is an input error; the input error inside it if Ray raised it (a
    worker's, an actor's or a task's failure); otherwise None. A program error raised while
    another exception was handled stays a program error."""
    if isinstance(err, USER_ERRORS):
        return err
    if raised_by_ray(err):
        return unwrapped_user_error(err)
    return None


ERROR_LOG_DIR_ENV = "PROXYLESSKD_ERROR_LOGS"


def error_log(main: Callable[..., object], text: str) -> str:
    """Write ``text`` to a new file under ``$PROXYLESSKD_ERROR_LOGS`` (default: the
    temporary directory's ``proxylesskd-errors``) and return its path."""
    root = os.environ.get(ERROR_LOG_DIR_ENV) or os.path.join(
        tempfile.gettempdir(), "proxylesskd-errors"
    )
    os.makedirs(root, exist_ok=True)
    module = getattr(main, "__module__", "job")
    if module == "__main__":  # python -m jobs.<name>
        module = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    job = module.rsplit(".", 1)[-1]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(root, f"{job}-{stamp}-{os.getpid()}.log")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
