"""Shared command-line plumbing: --config/--set, and errors a user can act on."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from orchestrator.config import ExperimentConfig, load_config
from orchestrator.errors import USER_ERRORS
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


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The config, with its object-store endpoint and region put in this process's
    ``AWS_*`` environment for every S3 client to see."""
    config = load_config(args.config, args.overrides)
    use_endpoint(config.storage.endpoint_url, config.storage.region)
    return config


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main``; a user error prints ``error: ...`` and returns 2 instead of a traceback.

    Anything else prints its traceback and returns 1. Both pass through :func:`redact`, so
    a secret that some library put in a message is never printed. Ctrl-C prints one line
    and returns 130 (128 + SIGINT, what a shell reports for an interrupted command).
    """
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(
            "interrupted: runs keep their last checkpoint; the same command resumes them",
            file=sys.stderr,
        )
        return 130
    except USER_ERRORS as err:
        print(redact(f"error: {err}"), file=sys.stderr)
        return 2
    except Exception:
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1
