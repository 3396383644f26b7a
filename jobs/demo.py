"""The demo: synthetic identities end to end on a laptop (`make demo`).

    python -m jobs.demo [--config configs/demo.yaml] [--set ...]
    ray job submit --working-dir . -- python -m jobs.demo --config configs/demo.yaml

Current stage (core library): generates the synthetic dataset (skipped when it is already
there) and evaluates a randomly initialised student on the held-out identities, writing
runs/<name>/report.json. Training through Ray Train joins it with the end-to-end issue.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import torch

from orchestrator import cli, storage
from orchestrator.data.prepare import write_synthetic
from orchestrator.evaluation import evaluate_model, load_eval_set
from orchestrator.models import build_backbone, profile_model
from orchestrator.report import markdown_table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n")[0])
    cli.add_config_args(parser)
    parser.set_defaults(config="configs/demo.yaml")
    args = parser.parse_args(argv)
    config = cli.config_from_args(args)
    if storage.exists(storage.join(config.data.eval, "dataset.json")):
        print(f"dataset already at {config.synthetic.out}, reusing it")
    else:
        write_synthetic(config.synthetic)
    torch.manual_seed(config.seed)
    eval_set = load_eval_set(config.data.eval)
    student = build_backbone(
        config.student.arch, config.student.emb_dim, input_size=config.data.image_size
    )
    start = time.monotonic()
    metrics = evaluate_model(student, eval_set)
    rows = {f"random-init {config.student.arch.value}": metrics}
    report = {
        "dataset": {
            "eval": config.data.eval,
            "num_identities": eval_set.num_classes,
            "num_pairs": int(eval_set.same.size),
        },
        "students": {
            "random_init": {
                **metrics,
                "params": profile_model(student).params,
                "eval_seconds": time.monotonic() - start,
            }
        },
    }
    out_dir = os.path.join(config.storage_path, config.name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = markdown_table(rows)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"report: {out_dir}/report.json")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
