"""Scheduled retraining: distil on the newest dataset snapshot, evaluate on a fixed
benchmark, promote over the champion only if better by a margin.

Locally:
    python -m jobs.retrain --config configs/webface_r100_to_mbf.yaml --set retrain.snapshots=runs/snapshots --set retrain.benchmark=runs/data/synthetic/eval --set retrain.registry=runs/registry
On a cluster (cron, Airflow, a KubeRay CronJob: see cluster/kuberay/retrain-cronjob.yaml):
    ray job submit --working-dir . -- python -m jobs.retrain --config configs/webface_r100_to_mbf.yaml

Exit codes, for the scheduler: 0 promoted, 10 rejected (not better by retrain.min_improvement),
11 skipped (the newest snapshot was already decided), 12 no snapshot, 13 another run holds
the registry lock, 2 bad input, 1 a crash (rerun: finished steps are not repeated).
Every decision and its metrics are appended to <registry>/history.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orchestrator import cli
from orchestrator.retrain import run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.retrain", description=cli.description(__doc__)
    )
    cli.add_config_args(parser)
    args = parser.parse_args(argv)
    config = cli.config_from_args(args)
    decision = run(config)
    print(f"[retrain] {decision.outcome.name.lower()}: {decision.message}")
    if decision.metrics:
        print(f"[retrain] metrics: {decision.metrics}")
    return int(decision.outcome)


if __name__ == "__main__":
    sys.exit(cli.run(main))
