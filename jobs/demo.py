"""The demo (`make demo`): ProxylessKD end to end on synthetic identities, on a laptop.

    python -m jobs.demo [--config configs/demo.yaml] [--set ...]
    ray job submit --working-dir . -- python -m jobs.demo --config configs/demo.yaml

Phases: generate the synthetic dataset (reused when present), train the teacher on Ray
Train and export its classifier, distil three students at equal budget (`proxyless`,
`l2`, `scratch`), evaluate them all on held-out identities, print the table and write
report.json, report.md and roc.png to <storage_path> (runs/demo). Each run starts fresh.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from orchestrator import cli, storage
from orchestrator.config import Method
from orchestrator.data.prepare import write_synthetic
from orchestrator.evaluation import evaluate_students, write_report
from orchestrator.progress import format_seconds
from orchestrator.teacher import load_teacher_backbone
from orchestrator.train.launch import distill, ensure_ray, student_uri, train_teacher

METHODS = (Method.PROXYLESS, Method.L2, Method.SCRATCH)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n")[0])
    cli.add_config_args(parser)
    parser.set_defaults(config="configs/demo.yaml")
    parser.add_argument(
        "--methods",
        default=",".join(m.value for m in METHODS),
        help="students to distil, comma-separated",
    )
    args = parser.parse_args(argv)
    config = cli.config_from_args(args)
    methods = [Method(m) for m in args.methods.split(",")]
    started = time.monotonic()

    def phase(title: str) -> None:
        print(
            f"\n=== {title}  (elapsed {format_seconds(time.monotonic() - started)}) ===", flush=True
        )

    phase("1/4 synthetic dataset")
    if storage.exists(storage.join(config.data.eval, "dataset.json")):
        print(f"reusing {config.synthetic.out}")
    else:
        write_synthetic(config.synthetic)
    if storage.is_local(config.storage_path) and os.path.isdir(config.storage_path):
        shutil.rmtree(config.storage_path)  # a fresh demo every time (runs resume by name)
    ensure_ray()

    phase(f"2/4 teacher ({config.teacher.arch.value}, {config.teacher_optim.epochs} epochs)")
    train_teacher(config, "teacher")

    students = {}
    for i, method in enumerate(methods, 1):
        phase(
            f"3/4 student {i}/{len(methods)}: {method.value} ({config.student.arch.value}, {config.optim.epochs} epochs)"
        )
        run = replace(config, loss=replace(config.loss, method=method))
        distill(run, method.value)
        students[method.value] = student_uri(run, method.value)

    phase("4/4 evaluation on held-out identities")
    result = evaluate_students(
        config.data.eval, load_teacher_backbone(os.path.abspath(config.teacher.backbone)), students
    )
    table = write_report(result, config.storage_path)
    print(table)
    print(verdict(result.report))
    print(
        f"report: {config.storage_path}/report.json, report.md, roc.png  (total {format_seconds(time.monotonic() - started)})"
    )
    return 0


def verdict(report: dict[str, Any]) -> str:
    """One honest sentence per comparison, from the numbers in the report."""
    s = report["students"]
    if "proxyless" not in s:
        return ""
    own = s["proxyless"]["acc_10fold"]
    lines = []
    for other in ("l2", "scratch"):
        if other in s:
            diff = own - s[other]["acc_10fold"]
            word = "beats" if diff > 0 else "does not beat"
            lines.append(
                f"proxyless {word} {other}: {own:.4f} vs {s[other]['acc_10fold']:.4f} ({diff:+.4f}) 10-fold accuracy"
            )
    cross = s["proxyless"].get("cross_model")
    if cross:
        lines.append(
            f"proxyless cross-model (teacher gallery, student probes): {cross['acc_10fold']:.4f} vs its own {own:.4f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(cli.run(main))
