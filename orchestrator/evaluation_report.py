"""The evaluation report on disk (``jobs.evaluate``, ``jobs.demo``): report.json, report.md
and roc.png. It sits above evaluation and the benchmark suite, which it both renders."""

from __future__ import annotations

import json
from typing import Any

from orchestrator import storage
from orchestrator.benchmarks.suite import standard_table
from orchestrator.evaluation import EvaluationReport, Flip
from orchestrator.report import models_table, roc_plot


def write_report(result: EvaluationReport, out_dir: str) -> str:
    """report.json, report.md (tables) and roc.png into ``out_dir``; returns the tables."""
    storage.makedirs(out_dir)
    storage.write_text_atomic(
        storage.join(out_dir, "report.json"), json.dumps(result.report, indent=2)
    )
    rows: dict[str, dict[str, Any]] = {}
    if result.report["teacher"] is not None:
        rows["teacher"] = result.report["teacher"]
    rows.update(result.report["students"])
    sections = []
    # Each table says its flip test: the held-out set's default is none, the .bin sets' sum
    # (insightface's convention); --flip makes them the same.
    dataset = result.report["dataset"]
    if dataset is not None:
        flip = dataset.get("flip_test", Flip.NONE.value)
        sections.append(
            f"# Evaluation on {dataset['eval']} (flip test: {flip})\n\n{models_table(rows)}"
        )
    benchmarks = result.report.get("benchmarks")
    if benchmarks:
        flips = ", ".join(
            f"{name} {entry['flip']}" for name, entry in benchmarks.items() if "flip" in entry
        )
        title = f"# Standard benchmarks (flip test: {flips})" if flips else "# Standard benchmarks"
        sections.append(f"{title}\n\n{standard_table(benchmarks)}")
    text = "\n".join(sections)
    storage.write_text_atomic(storage.join(out_dir, "report.md"), text)
    roc_plot(result.curves, storage.join(out_dir, "roc.png"), "verification ROC")
    return text
