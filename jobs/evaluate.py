"""Evaluate the teacher and any set of students on held-out identities: verification
(10-fold accuracy, TAR@FAR, AUC, EER), identification (rank-1/5) and the cross-model mode
(teacher-embedded gallery, student-embedded probes); and on the standard benchmarks:
insightface's .bin verification sets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW) and IJB-B/IJB-C.

Locally:
    python -m jobs.evaluate --config configs/demo.yaml --student proxyless=runs/demo/proxyless/student.pt --out runs/demo/report
    python -m jobs.evaluate --config configs/demo.yaml --student proxyless=runs/demo/proxyless/student.pt --no-eval --benchmark /data/lfw.bin --benchmark /data/cfp_fp.bin --ijb /data/IJB/IJBC --ijb-set IJBC
On a cluster:
    ray job submit --working-dir . -- python -m jobs.evaluate --config configs/demo.yaml --student proxyless=s3://bucket/runs/demo/proxyless/student.pt --benchmark s3://bucket/bench/agedb_30.bin --out /tmp/report

Writes report.json, report.md and roc.png to --out (default <storage_path>/<name>/report).
The .bin sets use the flip test (--flip, default sum); IJB embeds on the Ray cluster.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orchestrator import cli, storage
from orchestrator.benchmarks.ijb import IjbOptions, IjbSet
from orchestrator.benchmarks.suite import BenchmarkPlan, run_benchmarks
from orchestrator.data import format as fmt
from orchestrator.data import pairs as pair_draw
from orchestrator.errors import UsageError
from orchestrator.evaluation import EvaluationReport, Flip, evaluate_students
from orchestrator.evaluation_report import write_report
from orchestrator.teacher.models import load_teacher_backbone
from orchestrator.train.checks import checked_teacher_width


def warn_duplicate_pairs(uri: str) -> None:
    """Pairs drawn with replacement (by versions before 2026-12) count twice in every metric
    and fold: say how many, once."""
    repeats = pair_draw.duplicate_pairs(fmt.read_pairs(uri, fmt.read_meta(uri)))
    if repeats:
        print(
            f"warning: {uri}: {repeats} verification pairs repeat an earlier pair (the same two "
            "images) and weigh twice in every metric; rebuild the pairs with "
            "jobs.prepare_dataset (pairs are now drawn without replacement)",
            file=sys.stderr,
            flush=True,
        )


def parse_students(items: Sequence[str]) -> dict[str, str]:
    """``--student NAME=URI`` flags: names unique and not ``teacher`` (the report's teacher
    row), each URI an existing file."""
    students: dict[str, str] = {}
    for item in items:
        name, sep, uri = item.partition("=")
        if not sep or not name or not uri:
            raise UsageError(f"--student expects NAME=URI, found {item!r}")
        if name == "teacher":
            raise UsageError(
                f"--student {item}: 'teacher' names the report's teacher row (teacher.backbone); "
                "give the student another name"
            )
        if name in students:
            raise UsageError(
                f"--student {name} is given twice ({students[name]} and {uri}): one name a student"
            )
        if not storage.exists(uri):
            raise FileNotFoundError(f"--student {name}: {uri} does not exist")
        if storage.isdir(uri):
            raise UsageError(f"--student {name}: {uri} is a directory, expected a student.pt file")
        students[name] = uri
    return students


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.evaluate", description=cli.description(__doc__)
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
    parser.add_argument(
        "--flip",
        nargs="?",
        const=Flip.SUM.value,
        choices=[f.value for f in Flip],
        help="flip test (image + mirror) for data.eval (default none; --flip alone: sum) "
        "and the .bin sets (default sum)",
    )
    parser.add_argument("--no-eval", action="store_true", help="skip data.eval (benchmarks only)")
    parser.add_argument(
        "--benchmark", action="append", default=[], metavar="BIN", help="a .bin set (repeatable)"
    )
    parser.add_argument("--ijb", default="", metavar="DIR", help="an IJB-B/IJB-C directory")
    parser.add_argument("--ijb-set", choices=[s.value for s in IjbSet], default=IjbSet.IJBC.value)
    parser.add_argument(
        "--ijb-flip", choices=[f.value for f in Flip], default=Flip.CONCAT.value,
        help="IJB features from image + mirror: concat (default), sum, none",
    )  # fmt: skip
    parser.add_argument(
        "--no-detector-score", action="store_true", help="IJB: do not weight faces by score"
    )
    parser.add_argument("--ijb-actors", type=int, default=1, help="IJB embedding actors")
    parser.add_argument("--ijb-batch", type=int, default=64, help="IJB faces per actor batch")
    parser.add_argument("--out", help="report directory")
    args = parser.parse_args(argv)
    config = cli.config_from_args(args)
    students = parse_students(args.student)
    if args.ijb_actors < 1 or args.ijb_batch < 1:
        raise UsageError(
            f"--ijb-actors and --ijb-batch must be >= 1, found {args.ijb_actors} and "
            f"{args.ijb_batch}"
        )
    if args.no_eval and not (args.benchmark or args.ijb):
        parser.error("--no-eval leaves nothing to evaluate: add --benchmark or --ijb")
    teacher_config = None if args.no_teacher else config.teacher
    plan = BenchmarkPlan(
        bins=tuple(args.benchmark),
        ijb_root=args.ijb,
        ijb_set=IjbSet(args.ijb_set),
        flip=Flip(args.flip or Flip.SUM.value),
        ijb=IjbOptions(
            flip=Flip(args.ijb_flip),
            detector_score=not args.no_detector_score,
            batch_size=args.ijb_batch,
            actors=args.ijb_actors,
        ),
        image_size=config.data.image_size,
    )
    if args.no_eval:
        result = EvaluationReport({"dataset": None, "teacher": None, "students": {}}, {})
    else:
        teacher = (
            None
            if teacher_config is None
            else load_teacher_backbone(teacher_config, image_size=config.data.image_size)
        )
        if teacher is not None:
            checked_teacher_width(teacher, config.teacher.backbone, config)
        flip = Flip(args.flip or Flip.NONE.value)
        warn_duplicate_pairs(config.data.eval)
        result = evaluate_students(config.data.eval, teacher, students, flip=flip)
    if plan.bins or plan.ijb_root:
        benchmarks, curves = run_benchmarks(plan, teacher=teacher_config, students=students)
        result.report["benchmarks"] = benchmarks
        result.curves.update(curves)
    out = args.out or storage.join(config.storage_path, config.name, "report")
    print(write_report(result, out))
    print(f"report: {out}/report.json, {out}/report.md, {out}/roc.png")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
