"""Export a distilled student to TorchScript and ONNX (dynamic batch), check both against
PyTorch with onnxruntime, and write a model card.

Locally:
    python -m jobs.export --student runs/demo/proxyless/student.pt --out runs/export/proxyless --report runs/demo/report.json
On a cluster:
    ray job submit --working-dir . -- python -m jobs.export --student s3://bucket/runs/mbf/student.pt --out s3://bucket/models/mbf

Writes student.torchscript.pt, student.onnx, model_card.json and model_card.md to --out.
With --register NAME they also become a new version of the registered model NAME in MLflow
(--tracking-uri, default $MLFLOW_TRACKING_URI), logged to the student's training run.
Fails (exit 1) when an exported output differs from PyTorch by more than 1e-4 (absolute)
or its cosine drops below 1 - 1e-6. The input is (batch, 3, H, W) RGB in [-1, 1].
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from orchestrator import cli, storage
from orchestrator.errors import UsageError
from orchestrator.export import (
    card_markdown,
    check_finite,
    check_parity,
    model_card,
    to_onnx,
    to_torchscript,
)
from orchestrator.formats.student import load_student
from orchestrator.tracking.client import Target
from orchestrator.tracking.registry import register_export


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.export", description=cli.description(__doc__)
    )
    parser.add_argument("--student", required=True, help="a student.pt from jobs.distill")
    parser.add_argument("--out", required=True, help="output directory or object-store URI")
    parser.add_argument("--report", help="a report.json from jobs.evaluate, for the card's metrics")
    parser.add_argument("--name", default="", help="the student's name in --report")
    parser.add_argument(
        "--register", default="", metavar="MODEL", help="register the export in MLflow as MODEL"
    )
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", ""),
        help="the MLflow tracking URI for --register (default: $MLFLOW_TRACKING_URI)",
    )
    args = parser.parse_args(argv)
    if args.register and not args.tracking_uri:
        raise UsageError("--register: needs --tracking-uri (or MLFLOW_TRACKING_URI)")
    if not storage.exists(args.student):
        raise FileNotFoundError(f"--student: {args.student} does not exist")
    model, export = load_student(args.student)
    size = export.image_size
    check_finite(model, image_size=size, where=args.student)
    torchscript, onnx = to_torchscript(model, size), to_onnx(model, size)
    parity = check_parity(model, torchscript=torchscript, onnx=onnx, image_size=size)
    metrics = None
    if args.report:
        students = json.loads(storage.read_text(args.report)).get("students", {})
        name = args.name or (next(iter(students)) if len(students) == 1 else "")
        if name not in students:
            raise UsageError(
                f"--report {args.report}: expected --name to be one of {sorted(students)}, "
                f"found {args.name!r}"
            )
        metrics = students[name]
    card = model_card(args.student, export, parity=parity, metrics=metrics)
    storage.makedirs(args.out)
    storage.write_bytes_atomic(storage.join(args.out, "student.torchscript.pt"), torchscript)
    storage.write_bytes_atomic(storage.join(args.out, "student.onnx"), onnx)
    storage.write_text_atomic(storage.join(args.out, "model_card.json"), json.dumps(card, indent=2))
    storage.write_text_atomic(storage.join(args.out, "model_card.md"), card_markdown(card))
    print(card_markdown(card))
    print(f"exported -> {args.out}: {', '.join(EXPORTED)}")
    if args.register:
        register(args.register, args.tracking_uri, student=args.student, out=args.out)
    return 0


EXPORTED = ("student.torchscript.pt", "student.onnx", "model_card.json", "model_card.md")


def register(model: str, uri: str, *, student: str, out: str) -> None:
    target = Target(uri=uri, experiment="exports", registered_model=model)
    version = register_export(target, student=student, out=out, files=EXPORTED)
    if version is not None:
        print(f"registered -> {model} version {version} at {target.shown}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
