"""Evaluate the teacher and any set of students on held-out identities: verification
(10-fold accuracy, TAR@FAR, AUC, EER), identification (rank-1/5) and the cross-model mode
(teacher-embedded gallery, student-embedded probes).

Locally:
    python -m jobs.evaluate --config configs/demo.yaml --student proxyless=runs/demo/proxyless/student.pt --out runs/demo/report
On a cluster:
    ray job submit --working-dir . -- python -m jobs.evaluate --config configs/demo.yaml --student proxyless=s3://bucket/runs/demo/proxyless/student.pt --out /tmp/report

Writes report.json, report.md and roc.png to --out (default <storage_path>/<name>/report).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orchestrator import cli, storage
from orchestrator.evaluation import evaluate_students, write_report
from orchestrator.teacher import load_teacher_backbone


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.evaluate", description=__doc__.split("\n")[0]
    )
    cli.add_config_args(parser)
    parser.add_argument(
        "--student",
        action="append",
        default=[],
        metavar="NAME=URI",
        help="a student.pt (repeatable)",
    )
    parser.add_argument(
        "--no-teacher", action="store_true", help="skip the teacher and the cross-model mode"
    )
    parser.add_argument("--flip", action="store_true", help="flip-test embeddings (image + mirror)")
    parser.add_argument("--out", help="report directory")
    args = parser.parse_args(argv)
    config = cli.config_from_args(args)
    students = {}
    for item in args.student:
        name, sep, uri = item.partition("=")
        if not sep or not name or not uri:
            parser.error(f"--student expects NAME=URI, found {item!r}")
        if not storage.exists(uri):
            raise FileNotFoundError(f"--student {name}: {uri} does not exist")
        students[name] = uri
    teacher = None if args.no_teacher else load_teacher_backbone(config.teacher.backbone)
    result = evaluate_students(config.data.eval, teacher, students, flip=args.flip)
    out = args.out or storage.join(config.storage_path, config.name, "report")
    print(write_report(result, out))
    print(f"report: {out}/report.json, {out}/report.md, {out}/roc.png")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
