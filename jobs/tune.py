"""Search margin type and value, scale, student architecture, learning rate and the
embedding-KD weight with Ray Tune; every trial is a full Ray Train distillation run.

Locally:
    python -m jobs.tune --config configs/tune_demo.yaml
    python -m jobs.tune --config configs/tune_demo.yaml --resume      # after an interruption
On a cluster (storage on object storage):
    ray job submit --working-dir . -- python -m jobs.tune --config configs/webface_r100_to_mbf.yaml --set storage_path=s3://bucket/runs --set tune.space.margin.values=[0.3,0.4,0.5]

The search space is the config's `tune:` section (see TuneConfig). ASHA stops weak trials
on the validation metric `tune.metric` (10-fold accuracy or TAR at a FAR on `data.eval`).
Writes, under <tune.storage_path or storage_path/tune>/<name>/summary/: trials.md,
trials.csv, trials.json (every trial: config, metrics, status, the epoch where it stopped),
best.yaml (accepted as is by `python -m jobs.distill --config`), and
metric_vs_margin_scale.png. Prints the table, the best config's path and the best student.
With costs among `tune.objectives` / `tune.constraints` (README "Searching the student"):
also pareto.md, pareto.csv, pareto.json, pareto.png and front/<trial>.onnx|yaml.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orchestrator import cli
from orchestrator.cost import REFERENCE
from orchestrator.metric_names import validation_key
from orchestrator.tune import run_search


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.tune", description=cli.description(__doc__)
    )
    cli.add_config_args(parser)
    cli.add_resume_arg(parser, "search")
    args = parser.parse_args(argv)
    config = cli.config_from_args(args)
    outcome = run_search(config, resume=args.resume)
    print(outcome.table)
    stopped = sum(r.status == "stopped early" for r in outcome.rows)
    refused = sum(r.status == "refused" for r in outcome.rows)
    print(
        f"{len(outcome.rows)} trials ({stopped} stopped early by ASHA"
        + (f", {refused} refused by a constraint, never trained" if refused else "")
        + f"); best {outcome.best.trial_id}: "
        f"{validation_key(config.tune.accuracy_metric())} {outcome.best.metric:.4f}"
    )
    print(f"best config: {outcome.best_yaml}  (python -m jobs.distill --config <it>)")
    print(f"best student: {outcome.best.student}")
    print(
        f"summary: {outcome.summary}/trials.md, trials.csv, trials.json, metric_vs_margin_scale.png"
    )
    for point in outcome.front:
        ratio = point.vs_reference
        beside = "" if ratio is None else f" (x {ratio.median:.3f} {REFERENCE})"
        print(
            f"front: {point.trial_id} {point.shape}: {point.accuracy:.4f}, "
            f"{point.latency.median_ms:.3f} ms{beside}, {point.macs / 1e6:.1f} MMACs "
            f"-> {point.onnx}"
        )
    if outcome.front:
        print(f"Pareto front: {outcome.summary}/pareto.md, pareto.csv, pareto.png, front/")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
