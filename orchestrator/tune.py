"""Hyperparameter search with Ray Tune: margin type and value, scale, student
architecture, learning rate, embedding-KD weight.

Every trial is a full Ray Train run (Train V2's supported pattern: a Tune function
trainable that builds and fits a TorchTrainer with ``TuneReportCallback``, the trial id in
the run name). ASHA stops weak trials at epoch milestones on a validation verification
metric. At the end: a table of all trials (Markdown, CSV, JSON), the best config as a YAML
that ``jobs.distill`` takes as is, the best student's URI and a plot of the metric against
margin and scale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import ray

from orchestrator import storage
from orchestrator.config import (
    ConfigError,
    ExperimentConfig,
    FloatSearch,
    SearchAlgorithm,
    SearchSpace,
    TuneConfig,
    dump_yaml,
    from_dict,
    to_dict,
)
from orchestrator.data.ray_input import configured_plan
from orchestrator.errors import UsageError
from orchestrator.metric_names import validation_key
from orchestrator.runs import absolute_paths, ensure_ray, process_env, student_uri
from orchestrator.tables import csv_text, markdown_table, pyplot, save_figure
from orchestrator.train.checks import check_run_inputs
from orchestrator.train.launch import distill
from orchestrator.tune_progress import TrialProgress

SUMMARY_DIR = "summary"
TRIAL_DRIVER_CPU = 0.01


def plain(value: Any) -> Any:
    return value.value if hasattr(value, "value") else value


def param_space(tune: TuneConfig) -> dict[str, Any]:
    """Tune domains keyed by the experiment config key each one sets (``loss.margin.m``,
    ...: the ``sets`` metadata of :class:`SearchSpace`'s fields)."""
    # ray.tune: heavy (about a second to import), imported where it is used
    from ray import tune as rt

    grid = tune.search is SearchAlgorithm.GRID
    space: dict[str, Any] = {}
    for f in dataclasses.fields(SearchSpace):
        entry, key = getattr(tune.space, f.name), f.metadata["sets"]
        values = entry.values if isinstance(entry, FloatSearch) else entry
        if values:
            choices = [plain(v) for v in values]
            space[key] = rt.grid_search(choices) if grid else rt.choice(choices)
        elif isinstance(entry, FloatSearch) and entry.range:
            low, high = entry.range
            space[key] = rt.loguniform(low, high) if f.metadata["log"] else rt.uniform(low, high)
    if not space:
        raise ConfigError(
            "tune.space: nothing to search; give at least one entry values or a range"
        )
    return space


def apply_params(base: Mapping[str, Any], params: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment config ``base`` (plain data) with each dotted key set."""
    data = json.loads(json.dumps(base))  # a deep copy of plain data
    for key, value in params.items():
        node = data
        *sections, last = key.split(".")
        for section in sections:
            node = node[section]
        node[last] = value
    return from_dict(ExperimentConfig, data, "tune trial")


def trial_config(config: ExperimentConfig) -> ExperimentConfig:
    """What every trial runs: evaluated and checkpointed after each epoch and only then (ASHA
    compares epochs and counts reports as them), with a decode pool of its own size instead
    of one sized to the whole cluster."""
    return replace(
        config,
        run=replace(
            config.run, eval_every_epochs=1, checkpoint_every_epochs=1, checkpoint_every_steps=0
        ),
        data=replace(config.data, decode_actors=config.data.decode_actors or 1),
    )


@dataclass(frozen=True)
class TrialResources:
    cpus: float  # Train workers + decode actors + a read slot
    gpus: float
    concurrent: int


def trial_resources(
    config: ExperimentConfig, cluster_cpus: float, cluster_gpus: float
) -> TrialResources:
    """How much one trial holds, and how many trials the cluster runs at once: never more
    than fit (a trial beyond that would start a driver that waits, idle, for workers)."""
    scaling, data = config.scaling, config.data
    pipeline = configured_plan(data)
    cpus = scaling.max_workers * scaling.cpus_per_worker + pipeline.cpus + TRIAL_DRIVER_CPU
    gpus = float(scaling.max_workers) if scaling.use_gpu else 0.0
    fits = math.floor(cluster_cpus / cpus + 1e-9)
    if gpus:
        fits = min(fits, math.floor(cluster_gpus / gpus + 1e-9))
    concurrent = config.tune.max_concurrent_trials or max(1, fits)
    return TrialResources(cpus, gpus, concurrent)


def check_trial_fits(plan: TrialResources, cluster: tuple[float, float], what: str) -> None:
    """Refuse, before anything starts, a trial larger than the local cluster. Measured: such
    a trial starts its Train workers, never gets its decode actors scheduled, and Ray Data
    times out after 30 minutes. On a cluster of our own (``RAY_ADDRESS``) the autoscaler
    may still add the nodes, so the check is left to it."""
    cpus, gpus = cluster
    if os.environ.get("RAY_ADDRESS"):
        return
    if plan.cpus > cpus + 1e-9:
        raise UsageError(
            f"one {what} needs {plan.cpus:g} CPUs (scaling.num_workers x "
            f"scaling.cpus_per_worker + data.decode_actors x data.decode_cpus), the local "
            f"cluster has {cpus:g}: lower scaling.cpus_per_worker or data.decode_cpus"
        )
    if plan.gpus > gpus + 1e-9:
        raise UsageError(
            f"one {what} needs {plan.gpus:g} GPUs (scaling.num_workers with "
            f"scaling.use_gpu), the local cluster has {gpus:g}: lower scaling.num_workers "
            f"or set scaling.use_gpu=false"
        )


def run_trial(params: dict[str, Any], base: dict[str, Any]) -> None:
    """The Tune function trainable: one full distillation run, reported to Tune per epoch."""
    # ray.tune: heavy (about a second to import), imported where it is used
    import ray.tune

    # ray.tune: heavy (about a second to import), imported where it is used
    from ray.tune.integration.ray_train import TuneReportCallback

    config = trial_config(apply_params(base, params))
    name = f"{config.name}-{ray.tune.get_context().get_trial_id()}"
    distill(config, name, callbacks=[TuneReportCallback()])


def search_path(config: ExperimentConfig) -> str:
    root = config.tune.storage_path or storage.join(config.storage_path, "tune")
    return storage.join(root, config.name)


@dataclass(frozen=True)
class TrialRow:
    trial_id: str
    status: str  # completed | stopped early | error
    epochs: int  # where it stopped
    metric: float | None
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


def run_search(config: ExperimentConfig, resume: bool = False) -> SearchOutcome:
    """Run (or, with ``resume``, continue) the search of ``config.tune``."""
    # ray.tune: heavy (about a second to import), imported where it is used
    from ray import tune as rt

    config = absolute_paths(config)
    check_run_inputs([config])  # every trial shares the data, the classifier and the teacher
    ensure_ray()
    path = search_path(config)
    resources = cluster_resources()
    plan = trial_resources(trial_config(config), *resources)
    check_trial_fits(plan, resources, "trial of the search")
    print(
        f"[tune] {config.name}: {config.tune.search.value} search, metric {validation_key(config.tune.metric)}, "
        f"{plan.concurrent} trial(s) at a time ({plan.cpus:g} CPU each of {resources[0]:g}); "
        f"state in {path}",
        flush=True,
    )

    def tune_config() -> Any:
        return rt.TuneConfig(
            metric=validation_key(config.tune.metric),
            mode="max",
            search_alg=search_algorithm(config.tune),
            scheduler=scheduler(config),
            num_samples=config.tune.num_samples,
            max_concurrent_trials=plan.concurrent,
        )

    grid = fit_trials(
        run_trial,
        config,
        path=path,
        space=param_space(config.tune),
        tune_config=tune_config,
        resume=resume,
        what="search",
    )
    rows = [trial_row(grid[i], config) for i in range(len(grid))]
    return summarize(config, rows, path)


def fit_trials(
    trial: Any,
    config: ExperimentConfig,
    *,
    path: str,
    space: dict[str, Any],
    tune_config: Any,
    resume: bool,
    what: str,
) -> Any:
    """Run (or, with ``resume``, continue) Tune trials of the function ``trial(params,
    base)`` over ``space``, state in ``path``; Tune's ResultGrid. ``tune_config``: a
    callable making the TuneConfig (a restored search keeps its own)."""
    # ray.tune: heavy (about a second to import), imported where it is used
    from ray import tune as rt

    trainable = rt.with_parameters(trial, base=to_dict(config))
    # The trial's driver only waits on its TorchTrainer: Train reserves the real resources
    # (Tune refuses an empty request, hence a token share).
    trainable = rt.with_resources(trainable, {"CPU": TRIAL_DRIVER_CPU})
    if resume:
        if not rt.Tuner.can_restore(path):
            raise FileNotFoundError(f"--resume: no {what} to resume at {path}")
        tuner = rt.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        if storage.exists(storage.join(path, "tuner.pkl")):
            raise ConfigError(
                f"a {what} named {config.name!r} already exists at {path}: pass --resume to "
                "continue it, or choose another name"
            )
        tuner = rt.Tuner(
            trainable,
            param_space=space,
            tune_config=tune_config(),
            run_config=rt.RunConfig(
                name=path.rstrip("/").rsplit("/", 1)[1],
                storage_path=path.rstrip("/").rsplit("/", 1)[0],
                # Our progress lines (TrialProgress) instead of Tune's status tables.
                verbose=0,
                callbacks=[
                    TrialProgress(
                        what, metric=validation_key(config.tune.metric), epochs=config.optim.epochs
                    )
                ],
                failure_config=ray.tune.FailureConfig(max_failures=0),
            ),
        )
    with classic_tune_output():
        return tuner.fit()


NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"


def classic_tune_output() -> contextlib.AbstractContextManager[None]:
    """Tune's reporter of before 2.5 for the length of a run: at ``verbose=0`` it prints
    nothing, where the newer one (Ray 2.60's default) still prints a configuration table at
    the start and the trial-status table at the end. Our TrialProgress lines report."""
    return process_env(NEW_OUTPUT_ENV, "0")


def cluster_resources() -> tuple[float, float]:

    total = ray.cluster_resources()
    return float(total.get("CPU", 1.0)), float(total.get("GPU", 0.0))


def search_algorithm(tune: TuneConfig) -> Any:
    if tune.search is not SearchAlgorithm.OPTUNA:
        return None  # Tune's variant generator: random draws, or the full grid
    try:
        # ray.tune: heavy (about a second to import), imported where it is used
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as err:  # the module imports optuna
        raise ConfigError(f"tune.search: optuna needs `pip install optuna` ({err})") from None
    return OptunaSearch()


def scheduler(config: ExperimentConfig) -> Any:
    if not config.tune.early_stopping:
        return None
    # ray.tune: heavy (about a second to import), imported where it is used
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=config.optim.epochs,
        grace_period=min(config.tune.grace_period, config.optim.epochs),
        reduction_factor=config.tune.reduction_factor,
        # A trial that reaches the last epoch ends by itself (and exports its student);
        # ASHA's default would stop it at max_t, before the export.
        stop_last_trials=False,
    )


def trial_row(result: Any, config: ExperimentConfig) -> TrialRow:

    metrics = dict(result.metrics or {})
    params = {k: plain(v) for k, v in (result.config or {}).items()}
    trial_id = str(metrics.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1])
    # Our reports carry the epoch index; Tune's iteration count restarts when a trial is
    # restored, so it is not the epoch.
    epochs = int(metrics["epoch"]) + 1 if "epoch" in metrics else 0
    metric = metrics.get(validation_key(config.tune.metric))
    # A trial is complete when its run returned and exported the student. ASHA may stop a
    # trial at any milestone, the last epoch included (then it trained every epoch but
    # ranked below the cutoff, and was stopped before its export).
    exported = student_uri(config, f"{config.name}-{trial_id}")
    student: str | None = None
    if result.error is not None:
        status = "error"
    elif storage.exists(exported):
        status, student = "completed", exported
    else:
        status = "stopped early"
    kept = {k: v for k, v in metrics.items() if k.startswith("val_") or k in ("loss", "epoch")}
    return TrialRow(
        trial_id=trial_id,
        status=status,
        epochs=epochs,
        metric=None if metric is None else float(metric),
        params=params,
        metrics=kept,
        student=student,
        error=None if result.error is None else storage.redact(str(result.error))[:500],
    )


def summarize(config: ExperimentConfig, rows: list[TrialRow], path: str) -> SearchOutcome:
    """Write the table (md/csv/json), the best config (YAML) and the plot."""
    done = [r for r in rows if r.status == "completed" and r.metric is not None]
    if not done:
        raise RuntimeError(f"no trial of search {config.name} completed; see {path}")
    best = max(done, key=lambda r: r.metric if r.metric is not None else -math.inf)
    out = storage.join(path, SUMMARY_DIR)
    storage.makedirs(out)
    table = markdown(rows, validation_key(config.tune.metric), best)
    storage.write_text_atomic(storage.join(out, "trials.md"), table)
    storage.write_text_atomic(storage.join(out, "trials.csv"), as_csv(rows))
    storage.write_text_atomic(
        storage.join(out, "trials.json"), json.dumps([asdict(r) for r in rows], indent=2)
    )
    best_config = replace(apply_params(to_dict(config), best.params), name=f"{config.name}-best")
    best_yaml = storage.join(out, "best.yaml")
    header = (
        f"# Best of search {config.name}: trial {best.trial_id}, "
        f"{validation_key(config.tune.metric)} = {best.metric:.4f}\n# student: {best.student}\n"
    )
    storage.write_text_atomic(best_yaml, header + dump_yaml(best_config))
    margin = config.loss.margin
    base = {"loss.margin.m": margin.m, "loss.margin.scale": margin.scale}
    plot(
        rows,
        metric=validation_key(config.tune.metric),
        base=base,
        uri=storage.join(out, "metric_vs_margin_scale.png"),
    )
    return SearchOutcome(rows, best, best_yaml, out, table)


def markdown(rows: list[TrialRow], metric: str, best: TrialRow) -> str:
    keys = sorted({k for r in rows for k in r.params})
    table = []
    for r in sorted(rows, key=lambda r: -(r.metric if r.metric is not None else -math.inf)):
        value = "n/a" if r.metric is None else f"{r.metric:.4f}"
        cells = [r.trial_id + (" (best)" if r is best else ""), r.status, str(r.epochs), value]
        table.append(cells + [format_value(r.params.get(k)) for k in keys])
    return "\n".join(markdown_table(["trial", "status", "epochs", metric, *keys], table)) + "\n"


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
