"""What a search leaves: one row per trial (Markdown, CSV, JSON), the best config as a YAML
that ``jobs.distill`` takes as is, a plot of the metric against margin and scale, and, for
a search with costs, its Pareto front (:mod:`orchestrator.pareto`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from orchestrator import storage
from orchestrator.config import ExperimentConfig, dump_yaml, to_dict
from orchestrator.metric_names import COST_DETAIL, COST_METRICS, validation_key
from orchestrator.runs import student_uri
from orchestrator.tables import csv_text, markdown_table, pyplot, save_figure
from orchestrator.tune_space import apply_params, plain

SUMMARY_DIR = "summary"
# What a trial's report carries beside the metrics: why a trial was refused before it
# trained.
REFUSED_BY = "refused_by"
STUDENT_SHAPE = "student_shape"  # the trial's point of the student family, as a label
# A completed trial's timing as the trial measured it, beside the timing of its trained
# student again at the end of the search (orchestrator.pareto.retime_completed).
IN_TRIAL = "_in_trial"


@dataclass(frozen=True)
class TrialRow:
    trial_id: str
    status: str  # completed | stopped early | refused | error
    epochs: int  # where it stopped
    metric: float | None  # the search's accuracy (tune.metric, or the objectives' first)
    params: dict[str, Any]
    metrics: dict[str, Any]
    student: str | None  # the exported student (completed trials)
    error: str | None


@dataclass(frozen=True)
class SearchOutcome:
    rows: list[TrialRow]
    best: TrialRow
    best_yaml: str  # URI of the best config
    summary: str  # URI of the summary directory
    table: str  # the Markdown table
    front: tuple[Any, ...] = ()  # the Pareto front (orchestrator.pareto.FrontPoint)


def kept_metric(key: str) -> bool:
    return (
        key.startswith("val_")
        or key in ("loss", "epoch", REFUSED_BY, STUDENT_SHAPE)
        or key.removesuffix(IN_TRIAL) in COST_METRICS
        or key.removesuffix(IN_TRIAL) in COST_DETAIL
    )


def trial_row(result: Any, config: ExperimentConfig) -> TrialRow:
    metrics = dict(result.metrics or {})
    params = {k: plain(v) for k, v in (result.config or {}).items()}
    trial_id = str(metrics.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1])
    # Our reports carry the epoch index; Tune's iteration count restarts when a trial is
    # restored, so it is not the epoch.
    epochs = int(metrics["epoch"]) + 1 if "epoch" in metrics else 0
    metric = metrics.get(validation_key(config.tune.accuracy_metric()))
    # A trial is complete when Tune has the report of its last epoch and its run exported
    # the student. ASHA may stop a trial at any milestone, the last epoch included (then it
    # trained every epoch but ranked below the cutoff, and was stopped before its export).
    # Tune stops a trial after its decision: a run of short epochs can meanwhile finish and
    # export (seen: stopped at epoch 1 of 2, exported 5 s later). Its row would pair an
    # early epoch's metric with the last epoch's student, so it counts as stopped.
    exported = student_uri(config, f"{config.name}-{trial_id}")
    student: str | None = None
    if result.error is not None:
        status = "error"
    elif metrics.get(REFUSED_BY):
        status, metric = "refused", None  # never trained: its reported accuracy is a stand-in
    elif epochs == config.optim.epochs and storage.exists(exported):  # epochs: not searched
        status, student = "completed", exported
    else:
        status = "stopped early"
    return TrialRow(
        trial_id=trial_id,
        status=status,
        epochs=epochs,
        metric=None if metric is None else float(metric),
        params=params,
        metrics={k: v for k, v in metrics.items() if kept_metric(k)},
        student=student,
        error=None if result.error is None else storage.redact(str(result.error))[:500],
    )


def summarize(config: ExperimentConfig, rows: list[TrialRow], path: str) -> SearchOutcome:
    """Write the table (md/csv/json), the best config (YAML) and the plot."""
    metric = validation_key(config.tune.accuracy_metric())
    done = [r for r in rows if r.status == "completed" and r.metric is not None]
    if not done:
        raise RuntimeError(f"no trial of search {config.name} completed; see {path}")
    best = max(done, key=lambda r: r.metric if r.metric is not None else -math.inf)
    out = storage.join(path, SUMMARY_DIR)
    storage.makedirs(out)
    table = markdown(rows, metric, best)
    storage.write_text_atomic(storage.join(out, "trials.md"), table)
    storage.write_text_atomic(storage.join(out, "trials.csv"), as_csv(rows))
    storage.write_text_atomic(
        storage.join(out, "trials.json"), json.dumps([asdict(r) for r in rows], indent=2)
    )
    best_yaml = storage.join(out, "best.yaml")
    header = (
        f"# Best of search {config.name}: trial {best.trial_id}, "
        f"{metric} = {best.metric:.4f}\n# student: {best.student}\n"
    )
    write_trial_config(config, best, best_yaml, name=f"{config.name}-best", header=header)
    margin = config.loss.margin
    base = {"loss.margin.m": margin.m, "loss.margin.scale": margin.scale}
    plot(rows, metric=metric, base=base, uri=storage.join(out, "metric_vs_margin_scale.png"))
    return SearchOutcome(rows, best, best_yaml, out, table)


def write_trial_config(
    config: ExperimentConfig, row: TrialRow, uri: str, *, name: str, header: str
) -> None:
    """The base config with ``row``'s values, named ``name``: ``jobs.distill`` takes it."""
    trial = replace(apply_params(to_dict(config), row.params), name=name)
    storage.write_text_atomic(uri, header + dump_yaml(trial))


def cost_columns(rows: list[TrialRow]) -> list[str]:
    return [k for k in COST_METRICS if any(k in r.metrics for r in rows)]


def markdown(rows: list[TrialRow], metric: str, best: TrialRow) -> str:
    keys = sorted({k for r in rows for k in r.params})
    costs = cost_columns(rows)
    table = []
    for r in sorted(rows, key=lambda r: -(r.metric if r.metric is not None else -math.inf)):
        value = "n/a" if r.metric is None else f"{r.metric:.4f}"
        cells = [r.trial_id + (" (best)" if r is best else ""), r.status, str(r.epochs), value]
        cells += [format_value(r.metrics.get(k)) for k in costs]
        table.append(cells + [format_value(r.params.get(k)) for k in keys])
    header = ["trial", "status", "epochs", metric, *costs, *keys]
    return "\n".join(markdown_table(header, table)) + "\n"


def format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def as_csv(rows: list[TrialRow]) -> str:
    params = sorted({k for r in rows for k in r.params})
    metrics = sorted({k for r in rows for k in r.metrics})
    return csv_text(
        ["trial_id", "status", "epochs", "metric", *params, *metrics, "student"],
        (
            [r.trial_id, r.status, r.epochs, r.metric]
            + [r.params.get(k) for k in params]
            + [r.metrics.get(k) for k in metrics]
            + [r.student]
            for r in rows
        ),
    )


def plot(rows: list[TrialRow], *, metric: str, base: dict[str, float], uri: str) -> None:
    """The metric against margin (colour: margin type) and against scale, one dot a trial;
    a key that was not searched is drawn at the base config's value."""
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4), sharey=True)
    measured = [r for r in rows if r.metric is not None]
    for ax, key, label in (
        (axes[0], "loss.margin.m", "margin m"),
        (axes[1], "loss.margin.scale", "scale s"),
    ):
        groups: dict[str, list[TrialRow]] = {}
        for r in measured:
            groups.setdefault(str(r.params.get("loss.margin.type", "base")), []).append(r)
        for kind, members in sorted(groups.items()):
            xs = [r.params.get(key, base[key]) for r in members]
            ax.scatter(xs, [r.metric for r in members], label=kind)
        searched = any(key in r.params for r in rows)
        ax.set_xlabel(label + ("" if searched else f" (not searched: {base[key]:g})"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[0].legend(title="margin type")
    fig.suptitle(f"{metric} at the last reported epoch of each trial")
    fig.tight_layout()
    save_figure(fig, uri)
