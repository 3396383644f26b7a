"""Benchmarks run on models: the ``.bin`` verification sets (and IJB, see
:mod:`orchestrator.benchmarks.ijb`), each model alone and cross-model, and the standard
table of a report (rows: teacher, students, cross-model; columns: each set)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from torch import nn

from orchestrator.benchmarks.ijb import IjbOptions, IjbSet, ModelSource, ijb_report, read_ijb_meta
from orchestrator.benchmarks.verification_bin import (
    VerificationBin,
    decode_bin,
    file_order_folds,
    read_bin,
)
from orchestrator.config import TeacherConfig
from orchestrator.data import format as fmt
from orchestrator.errors import UsageError
from orchestrator.evaluation import Flip, Pairs, embed_images, pair_verification
from orchestrator.formats.student import load_student
from orchestrator.report import fmt_value
from orchestrator.teacher.models import load_teacher_backbone


@dataclass(frozen=True)
class BinBenchmark:
    name: str
    uri: str
    images: npt.NDArray[np.uint8]  # (2N, S, S, 3)
    pairs: Pairs  # pair i: images 2i and 2i + 1, folds in file order


def bin_pairs(num_pairs: int, issame: npt.NDArray[np.bool_]) -> Pairs:
    rows = np.arange(num_pairs, dtype=np.int64)
    return Pairs(2 * rows, 2 * rows + 1, issame, file_order_folds(num_pairs))


def load_bin_benchmark(uri: str, *, image_size: int = 112) -> BinBenchmark:
    vb = read_bin(uri)
    print(f"[bench] {vb.name}: {vb.num_pairs} pairs from {uri}", flush=True)
    images = decode_bin(vb, uri, image_size)
    return BinBenchmark(vb.name, uri, images, bin_pairs(vb.num_pairs, vb.issame))


def bin_from_eval_set(uri: str) -> VerificationBin:
    """A Parquet eval set's pairs in insightface's layout: pairs ordered by fold (stable),
    each pair's two JPEGs byte for byte, so a set with equal folds keeps its folds."""
    meta = fmt.read_meta(uri)
    jpegs: dict[str, bytes] = {}
    for table in fmt.iter_shards(uri, meta, columns=["image_id", "image"]):
        ids, data = table.column("image_id").to_pylist(), table.column("image").to_pylist()
        jpegs.update(zip(ids, data, strict=True))
    pairs = fmt.read_pairs(uri, meta)
    order = np.argsort(np.asarray(pairs.column("fold")), kind="stable")
    a, b = pairs.column("image_id_a").to_pylist(), pairs.column("image_id_b").to_pylist()
    same = np.asarray(pairs.column("same"), dtype=bool)[order]
    images = [jpegs[ids[i]] for i in order for ids in (a, b)]
    return VerificationBin(uri.rstrip("/").rsplit("/", 1)[-1], tuple(images), same)


def bin_report(
    bench: BinBenchmark,
    *,
    teacher: nn.Module | None,
    students: dict[str, nn.Module],
    flip: Flip,
) -> dict[str, Any]:
    """Each model on ``bench``, and each student cross-model: the first image of every pair
    embedded by the teacher, the second by the student."""
    out: dict[str, Any] = {"uri": bench.uri, "num_pairs": int(bench.pairs.same.size)}
    out["teacher"], out["students"], out["cross_model"] = None, {}, {}
    label = f"embed {bench.name}"
    teacher_emb = None
    if teacher is not None:
        teacher_emb = embed_images(teacher, bench.images, flip=flip, label=f"{label} teacher")
        out["teacher"] = pair_verification(bench.pairs, teacher_emb)
    for name, model in students.items():
        emb = embed_images(model, bench.images, flip=flip, label=f"{label} {name}")
        out["students"][name] = pair_verification(bench.pairs, emb)
        if teacher_emb is not None and teacher_emb.shape[1] == emb.shape[1]:
            out["cross_model"][name] = pair_verification(bench.pairs, emb, teacher_emb)
    return out


IJB_TABLE_FARS = ("1e-5", "1e-4")


def standard_rows(benchmarks: dict[str, Any]) -> dict[str, dict[str, str]]:
    """rows (teacher, each student, each student cross-model) x columns (each ``.bin``
    set's accuracy, each IJB set's TAR at FAR 1e-5 and 1e-4)."""
    rows: dict[str, dict[str, str]] = {}

    def put(row: str, column: str, value: str) -> None:
        rows.setdefault(row, {})[column] = value

    for name, result in benchmarks.items():
        entries = [("teacher", result["teacher"])]
        entries += list(result["students"].items())
        entries += [(f"{n} cross", m) for n, m in result["cross_model"].items()]
        for row, metrics in entries:
            if metrics is None:
                continue
            if result.get("kind") == "ijb":
                for far in IJB_TABLE_FARS:
                    put(row, f"{name} TAR@{far}", fmt_value(metrics["tar_at_far"].get(far)))
            else:
                put(row, name, f"{metrics['acc_10fold']:.4f} ± {metrics['acc_10fold_std']:.4f}")
    return rows


def standard_table(benchmarks: dict[str, Any]) -> str:
    rows = standard_rows(benchmarks)
    columns: list[str] = []
    for cells in rows.values():
        columns += [c for c in cells if c not in columns]
    lines = ["| model | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for row, cells in rows.items():
        lines.append(f"| {row} | " + " | ".join(cells.get(c, "n/a") for c in columns) + " |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class BenchmarkPlan:
    """What ``jobs.evaluate`` runs beside (or instead of) ``data.eval``."""

    bins: tuple[str, ...] = ()  # .bin verification sets, local paths or URIs
    ijb_root: str = ""  # an IJB directory (meta/, loose_crop/)
    ijb_set: IjbSet = IjbSet.IJBC
    flip: Flip = Flip.SUM  # the .bin sets' flip test
    ijb: IjbOptions = field(default_factory=IjbOptions)
    image_size: int = 112


def run_benchmarks(
    plan: BenchmarkPlan, *, teacher: TeacherConfig | None, students: dict[str, str]
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Every set of ``plan`` on the teacher (None: none; any format) and the students
    (name -> a ``student.pt``): ``{set name: result}`` and the IJB ROC curves."""
    results: dict[str, Any] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if plan.bins:
        model = (
            None if teacher is None else load_teacher_backbone(teacher, image_size=plan.image_size)
        )
        models = {name: load_student(uri)[0] for name, uri in students.items()}
        for uri in plan.bins:
            bench = load_bin_benchmark(uri, image_size=plan.image_size)
            if bench.name in results:
                raise UsageError(f"--benchmark {uri}: a set named {bench.name} is given twice")
            results[bench.name] = {
                "kind": "bin",
                "flip": plan.flip.value,
                **bin_report(bench, teacher=model, students=models, flip=plan.flip),
            }
    if plan.ijb_root:
        meta = read_ijb_meta(plan.ijb_root, plan.ijb_set)
        print(
            f"[bench] {plan.ijb_set.value}: {len(meta.images)} faces, "
            f"{np.unique(meta.templates).size} templates, {meta.same.size} pairs",
            flush=True,
        )
        report, ijb_curves = ijb_report(
            meta,
            teacher=None if teacher is None else ModelSource("teacher", teacher.backbone, teacher),
            students={name: ModelSource("student", uri) for name, uri in students.items()},
            options=plan.ijb,
        )
        results[plan.ijb_set.value] = report
        curves.update(ijb_curves)
    return results, curves
