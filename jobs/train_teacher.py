"""Train a teacher with its own margin classifier on Ray Train, then export its backbone and
its classifier (the one students inherit).

Locally (starts a private local Ray cluster unless RAY_ADDRESS is set):
    python -m jobs.train_teacher --config configs/demo.yaml
On a cluster:
    ray job submit --working-dir . -- python -m jobs.train_teacher --config configs/demo.yaml

Outputs: the run under <storage_path>/<name>-teacher, teacher.backbone (backbone + head) and
teacher.classifier (the format of README "Formats"). Rerunning with the same name resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from orchestrator import cli
from orchestrator.train.teacher_job import train_teacher
from orchestrator.train.trainer import summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train_teacher", description=cli.description(__doc__)
    )
    cli.add_config_args(parser)
    parser.add_argument(
        "--name", help="run name (default: <config name>-teacher); reuse it to resume"
    )
    args = parser.parse_args(argv)
    config = cli.config_from_args(args)
    outcome = train_teacher(config, args.name)
    print(json.dumps(summary(outcome)))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
