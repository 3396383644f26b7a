"""The demo (`make demo`): ProxylessKD end to end on synthetic identities, on a laptop.

    python -m jobs.demo [--config configs/demo.yaml] [--set ...] [--object-store]
    ray job submit --working-dir . -- python -m jobs.demo --config configs/demo.yaml

--object-store (`make demo STORE=s3`) starts an embedded S3 server (SeaweedFS on loopback,
data under runs/objectstore) and keeps the dataset, the checkpoints, the teacher and the
report on it, under s3://demo/: the same code path as a cloud bucket.

Phases: generate the synthetic dataset (reused when present), train the teacher on Ray
Train and export its classifier, distil three students at equal budget (`proxyless`,
`l2`, `scratch`), evaluate them all on held-out identities, print the table and write
report.json, report.md and roc.png to <storage_path> (runs/demo). Each run starts fresh: it
removes what an earlier demo made there (listed in <storage_path>/.proxylesskd-demo.json),
after checking every input, and nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from orchestrator import cli, storage
from orchestrator.config import ExperimentConfig, Method
from orchestrator.data.prepare import write_synthetic
from orchestrator.errors import UsageError
from orchestrator.evaluation import evaluate_students
from orchestrator.evaluation_report import write_report
from orchestrator.objectstore import EmbeddedObjectStore
from orchestrator.progress import format_seconds
from orchestrator.runs import (
    RUN_RECORD,
    absolute_paths,
    ensure_ray,
    fingerprint,
    student_uri,
    training_settings,
)
from orchestrator.teacher.models import load_teacher_backbone
from orchestrator.tracking.client import target_of, ui_command
from orchestrator.tracking.runs import attach
from orchestrator.train.checks import check_inputs
from orchestrator.train.launch import distill
from orchestrator.train.spec import Role
from orchestrator.train.teacher_job import train_teacher

DEMO_BUCKET = "demo"

METHODS = (Method.PROXYLESS, Method.L2, Method.SCRATCH)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.demo", description=cli.description(__doc__)
    )
    cli.add_config_args(parser)
    parser.set_defaults(config="configs/demo.yaml")
    parser.add_argument(
        "--methods",
        default=",".join(m.value for m in METHODS),
        help="students to distil, comma-separated",
    )
    parser.add_argument(
        "--object-store",
        action="store_true",
        help="keep data and checkpoints on an embedded S3 server (s3://demo/...)",
    )
    args = parser.parse_args(argv)
    config = cli.config_from_args(args)
    if args.object_store:
        with EmbeddedObjectStore.start("runs/objectstore") as store:
            os.environ.update(store.endpoint.env())  # before Ray starts: its workers inherit it
            store.create_bucket(DEMO_BUCKET)
            print(f"embedded object store: {store.endpoint.url}, bucket s3://{DEMO_BUCKET}")
            return run_demo(on_object_store(config), args.methods)
    return run_demo(config, args.methods)


def on_object_store(config: ExperimentConfig) -> ExperimentConfig:
    """The demo's local paths moved under ``s3://DEMO_BUCKET/``."""

    def moved(path: str) -> str:
        return (
            f"s3://{DEMO_BUCKET}/{path.removeprefix('runs/')}" if storage.is_local(path) else path
        )

    return replace(
        config,
        storage_path=moved(config.storage_path),
        data=replace(config.data, train=moved(config.data.train), eval=moved(config.data.eval)),
        synthetic=replace(config.synthetic, out=moved(config.synthetic.out)),
        teacher=replace(
            config.teacher,
            classifier=moved(config.teacher.classifier),
            backbone=moved(config.teacher.backbone),
        ),
    )


def parse_methods(method_names: str) -> list[Method]:
    known = ", ".join(m.value for m in Method)
    try:
        return [Method(m.strip()) for m in method_names.split(",")]
    except ValueError:
        raise UsageError(f"--methods {method_names!r}: expected names from {known}") from None


def run_demo(config: ExperimentConfig, method_names: str) -> int:
    methods = parse_methods(method_names)
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
    check_inputs(absolute_paths(config))  # every input is checked before anything is removed
    entries = ["teacher", *(m.value for m in methods), *REPORT_FILES]
    clear_previous_demo(config.storage_path, entries)  # a fresh demo (runs resume by name)
    ensure_ray()

    phase(f"2/4 teacher ({config.teacher.arch.value}, {config.teacher_optim.epochs} epochs)")
    record_made(config.storage_path, "teacher", expected=run_fingerprint(config, Role.TEACHER))
    train_teacher(config, "teacher")

    students = {}
    for i, method in enumerate(methods, 1):
        phase(
            f"3/4 student {i}/{len(methods)}: {method.value} ({config.student.arch.value}, {config.optim.epochs} epochs)"
        )
        run = replace(config, loss=replace(config.loss, method=method))
        expected = run_fingerprint(run, Role.STUDENT)
        record_made(config.storage_path, method.value, expected=expected)
        distill(run, method.value)
        students[method.value] = student_uri(run, method.value)

    phase("4/4 evaluation on held-out identities")
    result = evaluate_students(
        config.data.eval, load_teacher_backbone(absolute_paths(config).teacher), students
    )
    table = write_report(result, config.storage_path)
    for name in REPORT_FILES:
        record_made(config.storage_path, name)
    report = {name: storage.join(config.storage_path, name) for name in REPORT_FILES}
    for name in students:  # the report beside each student's curves in MLflow
        attach(config, name, report)
    print(table)
    print(verdict(result.report))
    print(
        "one seed each: for every method x 3 seeds with 95% intervals, run "
        "`python -m jobs.compare --config configs/demo.yaml --set data.decode_cpus=0.25` "
        "(README: Comparing methods)"
    )
    print(
        f"report: {config.storage_path}/report.json, report.md, roc.png  (total {format_seconds(time.monotonic() - started)})"
    )
    target = target_of(absolute_paths(config))
    if target is not None:
        print(f"runs in MLflow ({target.shown}); open the UI with:\n  {ui_command(target)}")
    return 0


MARKER = ".proxylesskd-demo.json"
REPORT_FILES = ("report.json", "report.md", "roc.png")


def fingerprint_of(root: str, name: str) -> str | None:
    """What lets a later demo recognise entry ``name`` under ``root`` as the one a demo
    made: a run's ``run.json`` fingerprint, a report file's sha256; None when absent."""
    uri = storage.join(root, name)
    if name in REPORT_FILES:
        return (
            "sha256:" + hashlib.sha256(storage.read_bytes(uri)).hexdigest()
            if storage.exists(uri)
            else None
        )
    record = storage.join(uri, RUN_RECORD)
    if not storage.exists(record):
        return None
    try:
        return str(json.loads(storage.read_text(record))["fingerprint"])
    except (ValueError, KeyError, TypeError):
        return None


def read_marker(root: str) -> dict[str, str]:
    """The entries an earlier demo made under ``root``, each with its fingerprint; names
    checked to stay inside ``root`` before anything is touched."""
    marker = storage.join(root, MARKER)
    if not storage.exists(marker):
        return {}
    try:
        entries = json.loads(storage.read_text(marker))["entries"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{marker}: not a jobs.demo marker; remove it by hand") from None
    if not isinstance(entries, dict):  # a list: the marker of a version that did not
        return {}  # record fingerprints; nothing of it can be recognised, so nothing goes
    for name in entries:
        storage.child(root, name, source=marker)
    return {str(k): str(v) for k, v in entries.items()}


def record_made(root: str, name: str, *, expected: str | None = None) -> None:
    """Add entry ``name`` to the marker with its fingerprint: the content it has now (after
    the demo made it), or ``expected``, the ``run.json`` fingerprint the run the demo is
    about to train will have (so that an interrupted demo's run is recognised, and a run
    that never started, or anything else put there, is not)."""
    entries = read_marker(root)
    found = expected or fingerprint_of(root, name)
    if found is None:
        return
    entries[name] = found
    storage.makedirs(root)
    storage.write_text_atomic(
        storage.join(root, MARKER), json.dumps({"entries": entries}, indent=2, sort_keys=True)
    )


def run_fingerprint(config: ExperimentConfig, role: Role) -> str:
    """The fingerprint ``run.json`` records for a run of ``config`` (what claim_run writes)."""
    return fingerprint(training_settings(absolute_paths(config), role.value))


def clear_previous_demo(root: str, entries: Sequence[str]) -> None:
    """Remove what an earlier demo made under ``root``: the entries its marker records
    (each recorded after it was made) whose content is still what it recorded. Anything
    else is left alone, and an entry this demo would write that is not recognisably a
    demo's (a run of the same name, a report the user edited) is an error: the demo would
    train over it or delete it."""
    made = read_marker(root)
    ours = {name for name, fp in made.items() if fingerprint_of(root, name) == fp}
    for name in entries:
        uri = storage.join(root, name)
        if name not in ours and storage.exists(uri):
            raise UsageError(
                f"{uri} exists and was not made by jobs.demo (or changed since): it would be "
                "trained over or deleted; remove it yourself or pass --set "
                "storage_path=<another directory>"
            )
    for name in sorted(ours):
        storage.remove_tree(storage.join(root, name))
    storage.makedirs(root)
    storage.write_text_atomic(storage.join(root, MARKER), json.dumps({"entries": {}}, indent=2))


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
