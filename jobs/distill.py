"""Distil a student on Ray Train: `proxyless` (inherit the teacher's frozen classifier) or a
baseline (`scratch`, `l2`, `logit`, `proxyless+l2`, `cckd`, `multistep`), chosen by loss.method.

Locally (starts a private local Ray cluster unless RAY_ADDRESS is set):
    python -m jobs.distill --config configs/demo.yaml --set loss.method=proxyless
On a cluster:
    ray job submit --working-dir . -- python -m jobs.distill --config configs/demo.yaml

The classifier reaches the workers through Ray's object store (one copy per node) and is
never trained, never in DDP and never saved in checkpoints (they name it by URI and
checksum). Outputs: the run under <storage_path>/<name> and <storage_path>/<name>/student.pt.
Rerunning with the same name resumes from the latest checkpoint; a rerun whose training
settings differ from the run's (recorded in <storage_path>/<name>/run.json) is refused
unless --resume-anyway or --force-new says what to do, and a second live run of the same
name is refused (exit 2, naming the lock's holder).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from orchestrator import cli
from orchestrator.runs import RerunPolicy, student_uri
from orchestrator.train.launch import distill
from orchestrator.train.trainer import summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.distill", description=cli.description(__doc__)
    )
    cli.add_config_args(parser)
    parser.add_argument("--name", help="run name (default: the config's name); reuse it to resume")
    rerun = parser.add_mutually_exclusive_group()
    rerun.add_argument(
        "--resume-anyway",
        action="store_true",
        help="continue a run of this name although its training settings differ",
    )
    rerun.add_argument(
        "--force-new",
        action="store_true",
        help="discard an existing run of this name (its checkpoints and student) and train anew",
    )
    args = parser.parse_args(argv)
    config = cli.config_from_args(args)
    name = args.name or config.name
    policy = RerunPolicy.REFUSE
    if args.resume_anyway:
        policy = RerunPolicy.RESUME_ANYWAY
    elif args.force_new:
        policy = RerunPolicy.FORCE_NEW
    outcome = distill(config, name, rerun=policy)
    print(f"student -> {student_uri(config, name)}")
    print(json.dumps(summary(outcome)))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
