"""Compare distillation methods with error bars: methods x seeds at one budget, as one Ray
Tune grid, evaluated on one held-out set.

Locally:
    python -m jobs.compare --config configs/demo.yaml --set data.decode_cpus=0.25   # 2 CPUs
    python -m jobs.compare --config configs/demo.yaml --set data.decode_cpus=0.25 --resume
    python -m jobs.compare --config configs/demo.yaml --set compare.methods=[proxyless,l2] --set compare.seeds=[0,1]
On a cluster:
    ray job submit --working-dir . -- python -m jobs.compare --config configs/webface_r100_to_mbf.yaml --set storage_path=s3://bucket/runs

The grid is the config's `compare:` section (CompareConfig: methods, default all; seeds,
default 0, 1, 2; metrics; baseline, default proxyless; confidence, default 0.95). Every
cell is a full `jobs.distill` run named <name>-<method>-seed<k>, with the experiment's
optim, data and student. Writes, under <compare.storage_path or storage_path/compare>/<name>/summary/:
report.md (a table per metric: mean ± std over seeds, each method's paired difference to
the baseline with its t-interval, and in words which differences are significant),
comparison.json, cells.csv and comparison.png.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orchestrator import cli
from orchestrator.compare.grid import run_compare


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.compare", description=cli.description(__doc__)
    )
    cli.add_config_args(parser)
    cli.add_resume_arg(parser, "comparison")
    args = parser.parse_args(argv)
    config = cli.config_from_args(args)
    outcome = run_compare(config, resume=args.resume)
    print(outcome.report)
    done = sum(c.status == "completed" for c in outcome.cells)
    print(f"{done}/{len(outcome.cells)} runs completed")
    print(f"summary: {outcome.summary}/report.md, comparison.json, cells.csv, comparison.png")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
