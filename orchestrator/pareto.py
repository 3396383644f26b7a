"""The Pareto front of a search with several objectives: the trials no other trial beats on
every objective at once, and what a user deploys from it (``summary/pareto.md|csv|json|png``
and, per front point, ``summary/front/<trial>.onnx`` and ``<trial>.yaml``).

The front is taken over the trials that trained to the end and exported their student
(a trial ASHA stopped was measured at an earlier epoch; a refused one never trained), from
the numbers each trial reported, except its timing: each completed trial's trained student
is exported to ONNX and timed again at the end, one after the other on the search's
driver, with nothing else of the search running (a trial timed its student while others
trained beside it), and beside a reference network, run for run: its time over the
reference's repeats on a shared machine, where its milliseconds drift. The latencies in
the tables are of the files the front points to.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from orchestrator import storage
from orchestrator.config import Constraint, ExperimentConfig, Goal, Objective, from_dict
from orchestrator.cost import (
    REFERENCE,
    Latency,
    Relative,
    latency_from,
    reference_graph,
    relative_from,
    time_beside,
    timed_metrics,
)
from orchestrator.export import to_onnx
from orchestrator.formats.student import load_student
from orchestrator.metric_names import LATENCY_MS, report_key, validation_key
from orchestrator.tables import csv_text, markdown_table, pyplot, save_figure
from orchestrator.tune_summary import IN_TRIAL, STUDENT_SHAPE, TrialRow, write_trial_config

FRONT_DIR = "front"


def objective_values(row: TrialRow, goals: list[Objective]) -> tuple[float, ...] | None:
    """The row's number for each objective, or None when one is missing."""
    values = [row.metrics.get(report_key(o.metric)) for o in goals]
    if any(v is None for v in values):
        return None
    return tuple(float(v) for v in values)  # type: ignore[arg-type]


def dominates(a: tuple[float, ...], b: tuple[float, ...], goals: list[Objective]) -> bool:
    """``a`` at least as good as ``b`` on every objective and better on one."""
    sign = [1.0 if o.goal is Goal.MAX else -1.0 for o in goals]
    better_or_equal = all(s * x >= s * y for s, x, y in zip(sign, a, b, strict=True))
    return better_or_equal and any(s * x > s * y for s, x, y in zip(sign, a, b, strict=True))


def non_dominated(points: Sequence[tuple[float, ...]], goals: list[Objective]) -> list[int]:
    """Indices of the points no other point dominates (ties all kept), in input order."""
    return [
        i
        for i, p in enumerate(points)
        if not any(dominates(q, p, goals) for j, q in enumerate(points) if j != i)
    ]


def keeps(row: TrialRow, constraints: tuple[Constraint, ...]) -> bool:
    """True when every bound holds on the row's numbers (a bound on an accuracy can only be
    judged after training; those on costs refused the trial before it)."""
    for c in constraints:
        value = row.metrics.get(report_key(c.metric))
        if value is not None and not c.holds(float(value)):
            return False
    return True


def front_rows(
    rows: list[TrialRow], goals: list[Objective], constraints: tuple[Constraint, ...] = ()
) -> list[TrialRow]:
    """The front among the trials that completed (trained to the end, student exported)
    within every constraint."""
    candidates = [r for r in rows if r.status == "completed" and keeps(r, constraints)]
    values = [objective_values(r, goals) for r in candidates]
    measured = [(r, v) for r, v in zip(candidates, values, strict=True) if v is not None]
    keep = non_dominated([v for _, v in measured], goals)
    return [measured[i][0] for i in keep]


@dataclass(frozen=True)
class FrontPoint:
    trial_id: str
    shape: str  # the student's point of the family
    accuracy: float  # the search's accuracy metric, as the trial reported it
    latency: Latency  # batch 1, timed again from onnx below
    serving: Latency  # tune.latency.serving_batch, likewise
    vs_reference: Relative | None  # batch 1's time over the reference network's
    macs: int
    params: int
    onnx_bytes: int
    margin: dict[str, Any]  # type, m, scale
    onnx: str  # the front student's ONNX export
    config: str  # its config: python -m jobs.distill --config <it>
    student: str  # its student.pt


def write_front(config: ExperimentConfig, rows: list[TrialRow], out: str) -> list[FrontPoint]:
    """The front's files under ``out`` (the search's summary directory)."""
    goals = config.tune.goals()
    front = front_rows(rows, goals, config.tune.constraints)
    points = [front_point(config, row, out) for row in front]
    points.sort(key=lambda p: p.latency.median_ms)
    metric = validation_key(config.tune.accuracy_metric())
    storage.write_text_atomic(storage.join(out, "pareto.md"), front_markdown(points, metric))
    storage.write_text_atomic(storage.join(out, "pareto.csv"), front_csv(points))
    storage.write_text_atomic(
        storage.join(out, "pareto.json"),
        json.dumps(
            {"objectives": [asdict(g) for g in goals], "front": [asdict(p) for p in points]},
            indent=2,
        ),
    )
    front_plot(rows, points, metric=metric, uri=storage.join(out, "pareto.png"))
    return points


def retime_completed(config: ExperimentConfig, rows: list[TrialRow]) -> list[TrialRow]:
    """Every completed trial's trained student exported and timed again, one after the
    other on this driver, with nothing of the search running (a trial timed its student
    while other trials trained beside it), each run beside one of the reference network
    (:class:`orchestrator.cost.Relative`). The trial's own numbers stay as
    ``<key>_in_trial``; the front and the tables use these."""
    done = [r for r in rows if r.status == "completed" and r.student is not None]
    if not done:
        return rows
    print(
        f"[tune] timing the {len(done)} trained student(s) again, one at a time, each beside "
        f"the reference network ({REFERENCE})",
        flush=True,
    )
    latency = config.tune.latency
    references: dict[int, bytes] = {}
    timed: dict[str, dict[str, float]] = {}
    for row in done:
        assert row.student is not None
        model, export = load_student(row.student)
        size = export.image_size
        graph = to_onnx(model, size)
        if size not in references:  # one export of the reference per input size
            references[size] = reference_graph(size)
        reference = references[size]
        one, one_vs = time_beside(graph, reference, image_size=size, batch=1, latency=latency)
        serving, serving_vs = time_beside(
            graph, reference, image_size=size, batch=latency.serving_batch, latency=latency
        )
        timed[row.trial_id] = timed_metrics(one, serving, len(graph), (one_vs, serving_vs))
    return [retimed(r, timed[r.trial_id]) if r.trial_id in timed else r for r in rows]


def retimed(row: TrialRow, timing: dict[str, float]) -> TrialRow:
    before = {f"{k}{IN_TRIAL}": row.metrics[k] for k in timing if k in row.metrics}
    return replace(row, metrics={**row.metrics, **before, **timing})


def front_point(config: ExperimentConfig, row: TrialRow, out: str) -> FrontPoint:
    """One front point's files: its trained student's ONNX export (the graph that was
    timed: the export is deterministic) and its config."""
    assert row.student is not None and row.metric is not None  # completed rows
    model, export = load_student(row.student)
    graph = to_onnx(model, export.image_size)
    onnx_uri = storage.join(out, FRONT_DIR, f"{row.trial_id}.onnx")
    storage.makedirs(storage.join(out, FRONT_DIR))
    storage.write_bytes_atomic(onnx_uri, graph)
    latency = config.tune.latency
    one = latency_from(row.metrics, "latency", 1, latency)
    serving = latency_from(row.metrics, "serving", latency.serving_batch, latency)
    vs_reference = relative_from(row.metrics, "latency", 1)
    yaml_uri = storage.join(out, FRONT_DIR, f"{row.trial_id}.yaml")
    header = (
        f"# Pareto front of search {config.name}: trial {row.trial_id}\n# student: {row.student}\n"
    )
    write_trial_config(config, row, yaml_uri, name=f"{config.name}-{row.trial_id}", header=header)
    trained = from_dict(ExperimentConfig, export.config, row.student)
    margin = trained.loss.margin
    shape = export.shape or trained.student.shape()
    return FrontPoint(
        trial_id=row.trial_id,
        shape=shape.label(),
        accuracy=row.metric,
        latency=one,
        serving=serving,
        vs_reference=vs_reference,
        macs=int(row.metrics["macs"]),
        params=int(row.metrics["params"]),
        onnx_bytes=len(graph),
        margin={"type": margin.type.value, "m": margin.m, "scale": margin.scale},
        onnx=onnx_uri,
        config=yaml_uri,
        student=row.student,
    )


def front_markdown(points: list[FrontPoint], metric: str) -> str:
    header = [
        "trial", "student", metric, "latency ms ± noise (p10-p90)", f"x {REFERENCE} ± noise",
        "serving ms", "MMACs", "M params", "ONNX MB", "margin", "scale", "config",
    ]  # fmt: skip
    rows = [
        [
            p.trial_id,
            p.shape,
            f"{p.accuracy:.4f}",
            f"{p.latency.median_ms:.3f} ± {100 * p.latency.noise:.1f}% "
            f"({p.latency.p10_ms:.3f}-{p.latency.p90_ms:.3f})",
            relative_cell(p.vs_reference),
            f"{p.serving.median_ms:.3f} (batch {p.serving.batch})",
            f"{p.macs / 1e6:.1f}",
            f"{p.params / 1e6:.3f}",
            f"{p.onnx_bytes / 1e6:.2f}",
            f"{p.margin['type']} {p.margin['m']:g}",
            f"{p.margin['scale']:g}",
            p.config,
        ]
        for p in points
    ]
    lines = markdown_table(header, rows)
    first = points[0].latency if points else None
    note = (
        ""
        if first is None
        else (
            f"\nLatency: onnxruntime on the CPU, {first.threads} thread(s); {first.rounds} "
            f"sessions of {first.runs} timed runs after a warm-up. The median of all runs ± "
            "its noise: the larger of the largest distance of one session's median from it "
            "and half the p10-p90 width; and p10-p90 of the runs. The milliseconds are what "
            "the student cost on this machine at that time: on a shared machine a core's "
            "speed drifts, and a measurement at another time can differ by more than the two "
            f"noises. `x {REFERENCE}`: each timed run was followed by one of that network "
            "(512-d, same input) in a session of its own, and this is the median of the "
            "pairs' ratios ± its noise, measured the same way: a new measurement of the ratio "
            "agrees within the two noises added.\n"
        )
    )
    return "\n".join(lines) + "\n" + note


def relative_cell(ratio: Relative | None) -> str:
    return "-" if ratio is None else f"{ratio.median:.3f} ± {100 * ratio.noise:.1f}%"


def front_csv(points: list[FrontPoint]) -> str:
    return csv_text(
        ["trial_id", "student", "accuracy", "latency_ms", "latency_noise", "latency_p10_ms", "latency_p90_ms",
         "latency_vs_ref", "latency_vs_ref_noise", "serving_latency_ms", "serving_batch", "macs", "params", "onnx_bytes",
         "margin_type", "margin", "scale", "onnx", "config"],
        (
            [p.trial_id, p.shape, p.accuracy, p.latency.median_ms, p.latency.noise, p.latency.p10_ms,
             p.latency.p90_ms, *relative_fields(p.vs_reference), p.serving.median_ms, p.serving.batch, p.macs, p.params,
             p.onnx_bytes, p.margin["type"], p.margin["m"], p.margin["scale"], p.onnx, p.config]
            for p in points
        ),
    )  # fmt: skip


def relative_fields(ratio: Relative | None) -> tuple[float | str, float | str]:
    return ("", "") if ratio is None else (ratio.median, ratio.noise)


def front_plot(rows: list[TrialRow], points: list[FrontPoint], *, metric: str, uri: str) -> None:
    """Accuracy against latency (batch 1, as each trial measured it), one point a trial
    labelled by its student; the front drawn through its points."""
    fig, ax = pyplot().subplots(figsize=(8, 5))
    on_front = {p.trial_id for p in points}
    measured = [r.metric for r in rows if r.metric is not None]
    # Trials with no accuracy (refused, never trained) sit along the bottom edge.
    low = min(measured, default=0.0) - 0.05 * (
        max(measured, default=1.0) - min(measured, default=0.0) or 1.0
    )
    for r in rows:
        latency, shape = r.metrics.get(LATENCY_MS), r.metrics.get(STUDENT_SHAPE, "")
        if latency is None:
            continue
        y = r.metric if r.metric is not None else low
        style = "o" if r.trial_id in on_front else ("x" if r.status == "refused" else ".")
        ax.plot([latency], [y], style, color="C1" if r.trial_id in on_front else "C0")
        ax.annotate(f"{r.trial_id[-5:]} {shape}", (latency, y), fontsize=7, alpha=0.8)
    front = sorted(
        (rows_by_id(rows)[p.trial_id] for p in points), key=lambda r: r.metrics[LATENCY_MS]
    )
    if front:
        ax.step(
            [r.metrics[LATENCY_MS] for r in front],
            [r.metric for r in front],
            where="post",
            color="C1",
            label="Pareto front",
        )
        ax.legend()
    ax.set_xlabel("latency, ms (batch 1, median)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.set_title("Each trial (x, along the bottom: refused by a constraint, never trained)")
    fig.tight_layout()
    save_figure(fig, uri)


def rows_by_id(rows: list[TrialRow]) -> dict[str, TrialRow]:
    return {r.trial_id: r for r in rows}
