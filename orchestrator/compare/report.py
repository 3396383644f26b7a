"""The comparison's report: the Markdown tables with a verdict per method, the CSV of every
cell and the PNG of means with their intervals (writers shared with tune:
:mod:`orchestrator.tables`)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from orchestrator import storage
from orchestrator.compare.cells import (
    CROSS_MODEL,
    CROSS_MODEL_RANK1,
    IMAGES_PER_S,
    SUMMARY_DIR,
    TEACHER_ROW,
    Cell,
    Comparison,
)
from orchestrator.compare.statistics import by_seed, mean_interval, summary_data
from orchestrator.config import ExperimentConfig
from orchestrator.tables import csv_text, markdown_table, pyplot, save_figure


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
        head = ["method", "mean ± std", "n", "per seed", f"Δ vs {baseline} [{level} CI]"]
        table = []
        reference = data.get(TEACHER_ROW, {}).get(column)
        if reference is not None:
            table.append(["teacher (reference)", fmt(reference, digits), "1", "-", "-", "-"])
        for method, row in rows.items():
            per_seed = ", ".join(f"{k}: {fmt(v, digits)}" for k, v in row["values"].items())
            vs = row.get("vs_baseline")
            diff = sig = "-"
            if vs is not None:
                diff = f"{fmt(vs['mean'], digits)} [{fmt(vs['low'], digits)}, {fmt(vs['high'], digits)}]"
                sig = "n/a" if vs["n"] < 2 else ("yes" if vs["significant"] else "no")
            spread_text = f"{fmt(row['mean'], digits)} ± {fmt(row['std'], digits)}"
            table.append([method, spread_text, str(row["n"]), per_seed, diff, sig])
        lines += markdown_table([*head, "significant"], table)
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
    return csv_text(
        ["method", "seed", "run", "status", *columns, "student"],
        (
            [c.method, c.seed, c.run, c.status, *(c.metrics.get(k) for k in columns), c.student]
            for c in cells
        ),
    )


def plot(config: ExperimentConfig, cells: Sequence[Cell], columns: Sequence[str], uri: str) -> None:
    """One panel per measured column: each method's mean with its t interval (bar) and the
    seeds' values (dots)."""
    methods = [m.value for m in config.compare.methods]
    fig, axes = pyplot().subplots(1, len(columns), figsize=(4.2 * len(columns), 4), squeeze=False)
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
    save_figure(fig, uri)


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
