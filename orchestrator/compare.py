"""Method comparisons with error bars: every method of ``compare.methods`` trained once per
seed of ``compare.seeds`` at one budget, as one Ray Tune grid, then evaluated on the same
held-out set and summarised with means, standard deviations and, for each method, the
paired difference to ``compare.baseline`` with a t confidence interval over seeds.

A seed fixes the student's initial weights, the batches of every rank and their
augmentation (``seed`` of the experiment; README "Reproducibility"), so method A and the
baseline at seed k see the same start and the same batches (tests/test_reproducible.py
checks the audits of two methods at one seed are identical): their difference at seed k is
a paired sample, and the interval of the mean difference is Student's t with n - 1 degrees
of freedom over the n seeds both completed.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from orchestrator import storage
from orchestrator.config import ExperimentConfig, Method, to_dict, val_targets
from orchestrator.metric_names import Metric, validation_key
from orchestrator.tune import (
    apply_params,
    check_trial_fits,
    cluster_resources,
    fit_trials,
    trial_resources,
)

SUMMARY_DIR = "summary"
CROSS_MODEL = "cross_model_acc_10fold"  # teacher gallery, student probes
CROSS_MODEL_RANK1 = "cross_model_rank1"  # the same search, rank-1 identification
TEACHER_ROW = "teacher"  # the reference row of each table (the teacher, one evaluation)
IMAGES_PER_S = "images_per_s"  # training rate, mean over the run's epochs


def compare_path(config: ExperimentConfig) -> str:
    root = config.compare.storage_path or storage.join(config.storage_path, "compare")
    return storage.join(root, config.name)


def run_name(config: ExperimentConfig, method: Method | str, seed: int) -> str:
    """The training run of one cell of the grid (its student: <storage>/<run>/student.pt)."""
    return f"{config.name}-{Method(method).value}-seed{seed}"


def cell_config(base: Mapping[str, Any], method: str, seed: int) -> ExperimentConfig:
    """The experiment config of one cell: the base with ``loss.method`` and ``seed`` set,
    checkpointed every epoch (so an interrupted cell resumes) with its own decode pool."""
    config = apply_params(base, {"loss.method": method, "seed": seed})
    return replace(
        config,
        run=replace(config.run, checkpoint_every_epochs=1, checkpoint_every_steps=0),
        data=replace(config.data, decode_actors=config.data.decode_actors or 1),
    )


def run_cell(params: dict[str, Any], base: dict[str, Any]) -> None:
    """The Tune function trainable: one full distillation run of (method, seed)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.train.launch import distill

    method, seed = cell_of(params)
    config = cell_config(base, method, seed)
    distill(config, run_name(config, config.loss.method, config.seed), [TuneReportCallback()])


def cell_of(params: Mapping[str, Any]) -> tuple[str, int]:
    """(method, seed) of a trial: ``cell`` "method:seed" (grids since 2026-12), or the
    separate keys of a grid written before."""
    if "cell" in params:
        method, _, seed = str(params["cell"]).rpartition(":")
        return method, int(seed)
    return str(params["loss.method"]), int(params["seed"])


def finished_cells(config: ExperimentConfig) -> set[tuple[str, int]]:
    """The cells whose run finished with exactly the settings this comparison trains them
    with (the run fingerprint, which leaves out the compare section, and every epoch):
    a comparison that grows (more seeds, more methods, other metrics) reuses them."""
    from orchestrator.formats.student import read_student_export
    from orchestrator.runs import RUN_RECORD, fingerprint, run_dir, student_uri, training_settings

    base = to_dict(config)
    done = set()
    for method in config.compare.methods:
        for seed in config.compare.seeds:
            cell = cell_config(base, method.value, seed)
            name = run_name(cell, method, seed)
            record, student = storage.join(run_dir(cell, name), RUN_RECORD), student_uri(cell, name)
            if not (storage.exists(record) and storage.exists(student)):
                continue
            recorded = json.loads(storage.read_text(record)).get("fingerprint")
            same = recorded == fingerprint(training_settings(cell, "student"))
            if same and len(read_student_export(student).epochs_done) >= cell.optim.epochs:
                done.add((method.value, seed))
    return done


def grid_path(path: str, *, resume: bool) -> str | None:
    """Where this invocation's Tune grid lives: a new ``grid-NNN`` under the comparison, or
    with ``resume`` the latest one (a comparison written before grids were numbered keeps
    its grid at ``path`` itself); None when there is none to resume."""
    grids = sorted(p.rsplit("/", 1)[-1] for p in storage.glob(path, "grid-*"))
    if resume:
        if grids:
            return storage.join(path, grids[-1])
        return path if storage.exists(storage.join(path, "tuner.pkl")) else None
    return storage.join(path, f"grid-{len(grids) + 1:03d}")


def check_cells(config: ExperimentConfig) -> None:
    """Every cell's config is valid before any trial starts (a method whose settings do not
    fit the experiment fails here, not after the others trained)."""
    from orchestrator.train.checks import check_run_inputs

    base = to_dict(config)
    seed = config.compare.seeds[0]
    check_run_inputs([cell_config(base, method.value, seed) for method in config.compare.methods])


# --- the statistics -----------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    mean: float
    std: float  # sample standard deviation (ddof 1); nan for one value
    n: int


def spread(values: Sequence[float]) -> Spread:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return Spread(math.nan, math.nan, 0)
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return Spread(float(array.mean()), std, int(array.size))


@dataclass(frozen=True)
class PairedInterval:
    """mean(a_k - b_k) over the seeds k both have, and its two-sided t interval."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (needs at least two pairs)."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def paired_interval(
    a: Mapping[int, float], b: Mapping[int, float], confidence: float
) -> PairedInterval:
    """Student's t interval of the mean paired difference a - b over the common seeds:
    mean(d) +- t_{(1+confidence)/2, n-1} * sd(d) / sqrt(n)."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    d = np.asarray([a[k] - b[k] for k in seeds], dtype=np.float64)
    n = int(d.size)
    if n == 0:
        return PairedInterval(math.nan, math.nan, math.nan, 0, confidence)
    mean = float(d.mean())
    if n == 1:
        return PairedInterval(mean, math.nan, math.nan, 1, confidence)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    return PairedInterval(mean, mean - half, mean + half, n, confidence)


def mean_interval(values: Sequence[float], confidence: float) -> tuple[float, float]:
    """The t interval of a mean (the plot's error bar); nan for fewer than two values."""
    from scipy import stats

    s = spread(values)
    if s.n < 2:
        return (math.nan, math.nan)
    half = float(stats.t.ppf((1 + confidence) / 2, s.n - 1)) * s.std / math.sqrt(s.n)
    return (s.mean - half, s.mean + half)


# --- the grid and its results ---------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    method: str
    seed: int
    run: str
    status: str  # completed | error | missing
    student: str | None
    metrics: dict[str, float | None]  # metric name -> value on the held-out set
    error: str | None = None


@dataclass(frozen=True)
class Comparison:
    cells: list[Cell]
    columns: list[str]  # the measured quantities, in table order
    report: str  # Markdown (report.md)
    summary: str  # URI of the summary directory


def run_compare(config: ExperimentConfig, resume: bool = False) -> Comparison:
    """Train (or, with ``resume``, finish training) the grid, then evaluate and summarise."""
    from ray import tune as rt

    from orchestrator.runs import absolute_paths, ensure_ray

    config = absolute_paths(config)
    check_cells(config)
    ensure_ray()
    path = compare_path(config)
    compare = config.compare
    resources = cluster_resources()
    plan = trial_resources(cell_config(to_dict(config), compare.baseline.value, 0), *resources)
    check_trial_fits(plan, resources, "run of the comparison")
    concurrent = compare.max_concurrent_trials or plan.concurrent
    print(
        f"[compare] {config.name}: {len(compare.methods)} method(s) x {len(compare.seeds)} "
        f"seed(s) = {len(compare.methods) * len(compare.seeds)} runs of {config.optim.epochs} "
        f"epoch(s), {concurrent} at a time ({plan.cpus:g} CPU each of {resources[0]:g}); "
        f"state in {path}",
        flush=True,
    )
    finished = finished_cells(config)
    todo = [
        f"{m.value}:{s}"
        for m in compare.methods
        for s in compare.seeds
        if (m.value, s) not in finished
    ]
    print(
        f"[compare] {len(finished)} run(s) finished already with these settings (reused), "
        f"{len(todo)} to train",
        flush=True,
    )
    grid_at = grid_path(path, resume=resume)
    if resume and grid_at is None:
        raise FileNotFoundError(f"--resume: no comparison to resume at {path}")
    results: list[Any] = []
    if todo or resume:
        assert grid_at is not None
        grid = fit_trials(
            run_cell,
            config,
            path=grid_at,
            space={"cell": rt.grid_search(todo)},
            tune_config=lambda: rt.TuneConfig(num_samples=1, max_concurrent_trials=concurrent),
            resume=resume,
            what="comparison",
        )
        results = [grid[i] for i in range(len(grid))]
    errors = {
        cell_of(r.config): storage.redact(str(r.error))[:500]
        for r in results
        if r.error is not None and r.config
    }
    extra = {cell_of(r.config): dict(r.metrics or {}) for r in results if r.config}
    cells, teacher = evaluate_cells(config, errors, extra)
    return summarize(config, cells, path, teacher=teacher)


def evaluate_cells(
    config: ExperimentConfig,
    errors: Mapping[tuple[str, int], str],
    trial_metrics: Mapping[tuple[str, int], Mapping[str, Any]],
) -> tuple[list[Cell], dict[str, float | None]]:
    """Every exported student of the grid on ``data.eval`` (with the teacher: cross-model
    accuracy for the students in its space), plus the trials' benchmark validations."""
    from orchestrator.evaluation import evaluate_students
    from orchestrator.runs import student_uri
    from orchestrator.teacher.models import load_teacher_backbone

    students: dict[str, str] = {}
    keys: dict[str, tuple[str, int]] = {}
    for method in config.compare.methods:
        for seed in config.compare.seeds:
            name = run_name(config, method, seed)
            uri = student_uri(config, name)
            if (method.value, seed) not in errors and storage.exists(uri):
                students[name], keys[name] = uri, (method.value, seed)
    teacher = load_teacher_backbone(config.teacher, image_size=config.data.image_size)
    full = evaluate_students(config.data.eval, teacher, students).report if students else {}
    report = full.get("students", {})
    reference = full.get("teacher") or {}
    teacher_row = {m: Metric(m).read(reference) for m in config.compare.metrics}
    benches = [validation_key(f"{name}_acc") for name in val_targets(config)]
    cells = []
    for method in config.compare.methods:
        for seed in config.compare.seeds:
            name = run_name(config, method, seed)
            key = (method.value, seed)
            if name not in report:
                status = "error" if key in errors else "missing"
                cells.append(Cell(method.value, seed, name, status, None, {}, errors.get(key)))
                continue
            entry = report[name]
            metrics: dict[str, float | None] = {
                m: Metric(m).read(entry) for m in config.compare.metrics
            }
            cross = entry.get("cross_model")
            metrics[CROSS_MODEL] = None if cross is None else float(cross["acc_10fold"])
            metrics[CROSS_MODEL_RANK1] = None if cross is None else float(cross["rank1"])
            rates = [e["samples_per_s"] for e in entry.get("throughput", [])]
            metrics[IMAGES_PER_S] = float(np.mean(rates)) if rates else None
            for bench in benches:
                value = trial_metrics.get(key, {}).get(bench)
                metrics[bench.removeprefix("val_")] = None if value is None else float(value)
            cells.append(Cell(method.value, seed, name, "completed", students[name], metrics))
    return cells, teacher_row


# --- the summary ----------------------------------------------------------------------------


def by_seed(cells: Sequence[Cell], method: str, column: str) -> dict[int, float]:
    return {
        c.seed: float(v)
        for c in cells
        if c.method == method and (v := c.metrics.get(column)) is not None and math.isfinite(v)
    }


def summarize(
    config: ExperimentConfig,
    cells: list[Cell],
    path: str,
    *,
    teacher: Mapping[str, float | None] | None = None,
) -> Comparison:
    """report.md, comparison.json, cells.csv and comparison.png under <path>/summary."""
    done = [c for c in cells if c.status == "completed"]
    if not done:
        raise RuntimeError(f"no run of comparison {config.name} completed; see {path}")
    columns = [m for m in config.compare.metrics]
    for cross in (CROSS_MODEL, CROSS_MODEL_RANK1):
        columns += [cross] if any(c.metrics.get(cross) is not None for c in done) else []
    skip = (*columns, CROSS_MODEL, CROSS_MODEL_RANK1, IMAGES_PER_S)
    columns += [k for k in done[0].metrics if k not in skip]
    columns.append(IMAGES_PER_S)
    out = storage.join(path, SUMMARY_DIR)
    storage.makedirs(out)
    data = summary_data(config, cells, columns)
    data[TEACHER_ROW] = dict(teacher or {})
    text = markdown(config, data)
    storage.write_text_atomic(storage.join(out, "report.md"), text)
    storage.write_text_atomic(storage.join(out, "comparison.json"), json.dumps(data, indent=2))
    storage.write_text_atomic(storage.join(out, "cells.csv"), as_csv(cells, columns))
    plot(config, cells, columns, storage.join(out, "comparison.png"))
    return Comparison(cells, columns, text, out)


def summary_data(config: ExperimentConfig, cells: list[Cell], columns: list[str]) -> dict[str, Any]:
    """Plain data of the whole comparison: per column, per method, the spread and the
    paired interval to the baseline."""
    compare = config.compare
    baseline = compare.baseline.value
    tables: dict[str, Any] = {}
    for column in columns:
        rows = {}
        base = by_seed(cells, baseline, column)
        for method in compare.methods:
            values = by_seed(cells, method.value, column)
            row: dict[str, Any] = {
                "values": {str(k): v for k, v in sorted(values.items())},
                **asdict(spread(list(values.values()))),
            }
            if method.value != baseline:
                interval = paired_interval(values, base, compare.confidence)
                row["vs_baseline"] = {**asdict(interval), "significant": interval.significant}
            rows[method.value] = row
        tables[column] = rows
    return {
        "name": config.name,
        "baseline": baseline,
        "confidence": compare.confidence,
        "interval": "paired Student t over seeds: mean(d) +- t_{(1+c)/2, n-1} sd(d) / sqrt(n)",
        "seeds": list(compare.seeds),
        "budget": {
            "epochs": config.optim.epochs,
            "global_batch": config.optim.batch_size,
            "lr": config.optim.lr,
            "student": config.student.arch.value,
            "train": config.data.train,
            "eval": config.data.eval,
        },
        "cells": [asdict(c) for c in cells],
        "tables": tables,
    }


def label(column: str) -> str:
    if column == CROSS_MODEL:
        return "cross-model acc_10fold (teacher gallery, student probes)"
    if column == CROSS_MODEL_RANK1:
        return "cross-model rank-1 (teacher gallery, student probes)"
    if column == IMAGES_PER_S:
        return "training images/s (mean over epochs)"
    return column


def fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown(config: ExperimentConfig, data: dict[str, Any]) -> str:
    compare, baseline = config.compare, data["baseline"]
    level = f"{compare.confidence:.0%}"
    budget = data["budget"]
    lines = [
        f"# Method comparison {config.name}",
        "",
        f"{len(compare.methods)} methods x {len(compare.seeds)} seeds {list(compare.seeds)} at "
        f"one budget: student {budget['student']}, {budget['epochs']} epoch(s), global batch "
        f"{budget['global_batch']}, lr {budget['lr']}; trained on {budget['train']}, evaluated "
        f"on {budget['eval']} (flip test: none, as in training's validation). Differences "
        f"are to `{baseline}` at the same seed; the interval "
        f"is the {level} paired t-interval over the seeds both completed (n - 1 degrees of "
        "freedom); a difference is significant when its interval excludes 0.",
        "",
    ]
    for column, rows in data["tables"].items():
        digits = 1 if column == IMAGES_PER_S else 4
        lines += [f"## {label(column)}", ""]
        lines += [
            f"| method | mean ± std | n | per seed | Δ vs {baseline} [{level} CI] | significant |",
            "|---|---|---|---|---|---|",
        ]
        reference = data.get(TEACHER_ROW, {}).get(column)
        if reference is not None:
            lines.append(f"| teacher (reference) | {fmt(reference, digits)} | 1 | - | - | - |")
        for method, row in rows.items():
            per_seed = ", ".join(f"{k}: {fmt(v, digits)}" for k, v in row["values"].items())
            vs = row.get("vs_baseline")
            diff = sig = "-"
            if vs is not None:
                diff = f"{fmt(vs['mean'], digits)} [{fmt(vs['low'], digits)}, {fmt(vs['high'], digits)}]"
                sig = "n/a" if vs["n"] < 2 else ("yes" if vs["significant"] else "no")
            spread_text = f"{fmt(row['mean'], digits)} ± {fmt(row['std'], digits)}"
            lines.append(f"| {method} | {spread_text} | {row['n']} | {per_seed} | {diff} | {sig} |")
        lines += ["", *verdicts(column, rows, baseline, level), ""]
    failed = [c for c in data["cells"] if c["status"] != "completed"]
    if failed:
        lines += ["## Runs that did not complete", ""]
        lines += [f"- {c['run']}: {c['status']} {c['error'] or ''}".rstrip() for c in failed]
        lines.append("")
    return "\n".join(lines)


def verdicts(column: str, rows: Mapping[str, Any], baseline: str, level: str) -> list[str]:
    """One sentence per method: better, worse or not distinguishable from the baseline."""
    out = []
    for method, row in rows.items():
        vs = row.get("vs_baseline")
        if vs is None:
            continue
        if vs["n"] < 2:
            out.append(f"- {method} vs {baseline}: {vs['n']} paired seed(s), no interval.")
        elif vs["significant"]:
            word = "higher" if vs["mean"] > 0 else "lower"
            out.append(
                f"- {method} is {word} than {baseline} on {label(column)} at the {level} level "
                f"(mean difference {vs['mean']:+.4g}, interval [{vs['low']:+.4g}, {vs['high']:+.4g}], "
                f"{vs['n']} seeds)."
            )
        else:
            out.append(
                f"- {method} and {baseline} are not distinguishable on {label(column)} at the "
                f"{level} level (mean difference {vs['mean']:+.4g}, interval "
                f"[{vs['low']:+.4g}, {vs['high']:+.4g}] contains 0, {vs['n']} seeds)."
            )
    return out


def as_csv(cells: Sequence[Cell], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "seed", "run", "status", *columns, "student"])
    for c in cells:
        writer.writerow(
            [c.method, c.seed, c.run, c.status, *(c.metrics.get(k) for k in columns), c.student]
        )
    return buffer.getvalue()


def plot(config: ExperimentConfig, cells: Sequence[Cell], columns: Sequence[str], uri: str) -> None:
    """One panel per measured column: each method's mean with its t interval (bar) and the
    seeds' values (dots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m.value for m in config.compare.methods]
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 4), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        for x, method in enumerate(methods):
            values = list(by_seed(cells, method, column).values())
            if not values:
                continue
            ax.scatter([x] * len(values), values, s=14, alpha=0.6, color="grey")
            mean = float(np.mean(values))
            low, high = mean_interval(values, config.compare.confidence)
            if math.isfinite(low):
                ax.errorbar([x], [mean], yerr=[[mean - low], [high - mean]], fmt="o", capsize=4)
            else:
                ax.plot([x], [mean], "o")
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_title(label(column), fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{config.name}: mean and {config.compare.confidence:.0%} t-interval over seeds "
        f"{list(config.compare.seeds)}"
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    storage.write_bytes_atomic(uri, buffer.getvalue())


__all__ = [
    "Cell",
    "Comparison",
    "PairedInterval",
    "cell_config",
    "compare_path",
    "paired_interval",
    "run_compare",
    "run_name",
    "spread",
]
