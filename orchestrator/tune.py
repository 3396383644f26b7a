"""Hyperparameter search with Ray Tune: margin type and value, scale, the student (a named
architecture or any point of its family), learning rate, embedding-KD weight.

Every trial is a full Ray Train run (Train V2's supported pattern: a Tune function
trainable that builds and fits a TorchTrainer with ``TuneReportCallback``, the trial id in
the run name). ASHA stops weak trials at epoch milestones on a validation verification
metric. With costs among the objectives or constraints, each trial first measures its
student (parameters, MACs, ONNX latency: :mod:`orchestrator.trial_cost`) and one that
breaks a constraint never trains; several objectives make a Pareto-front search (Optuna's
multi-objective TPE). At the end: a table of all trials (Markdown, CSV, JSON), the best config as a
YAML that ``jobs.distill`` takes as is, the best student's URI, a plot of the metric
against margin and scale, and the front (:mod:`orchestrator.pareto`).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from dataclasses import dataclass, replace
from typing import Any

import ray

from orchestrator import storage
from orchestrator.config import (
    ConfigError,
    ExperimentConfig,
    SearchAlgorithm,
    TuneConfig,
    to_dict,
)
from orchestrator.data.ray_input import configured_plan
from orchestrator.errors import UsageError
from orchestrator.metric_names import report_key, validation_key
from orchestrator.pareto import retime_completed, write_front
from orchestrator.runs import absolute_paths, ensure_ray, process_env, run_dir
from orchestrator.tracking.parents import close_parent, end_trial, open_parent, parent_id, tag_run
from orchestrator.tracking.runs import TrackedRun, end_failed, tracked_run_id
from orchestrator.train.checks import check_run_inputs
from orchestrator.train.launch import distill
from orchestrator.trial_cost import judge_cost, with_cost
from orchestrator.tune_progress import TrialProgress
from orchestrator.tune_space import apply_params, param_space
from orchestrator.tune_summary import SearchOutcome, summarize, trial_row

TRIAL_DRIVER_CPU = 0.01


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
    """The Tune function trainable: one full distillation run, reported to Tune per epoch.
    A search with costs first measures the trial's student (:mod:`orchestrator.trial_cost`):
    one that breaks a constraint reports its cost once and never trains."""
    # ray.tune: heavy (about a second to import), imported where it is used
    import ray.tune

    config = trial_config(apply_params(base, params))
    name = f"{config.name}-{ray.tune.get_context().get_trial_id()}"
    extra: dict[str, Any] = {}
    if config.tune.measures_cost():
        verdict = judge_cost(config)
        print(
            f"[tune] {name}: {verdict.shape}, {verdict.cost.macs / 1e6:.1f} MMACs, "
            f"{verdict.cost.params / 1e6:.3f} M params, "
            f"{verdict.cost.latency.median_ms:.3f} ms at batch 1"
            + (f"; refused, never trained: {'; '.join(verdict.broken)}" if verdict.broken else ""),
            flush=True,
        )
        if verdict.broken:
            ray.tune.report(verdict.refusal(config))
            return
        extra = verdict.metrics()
    parent = parent_id(search_path(config))
    distill(config, name, callbacks=[with_cost(extra)], tracking_parent=parent)


def search_path(config: ExperimentConfig) -> str:
    root = config.tune.storage_path or storage.join(config.storage_path, "tune")
    return storage.join(root, config.name)


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
    searcher = search_algorithm(config)
    print(
        f"[tune] {config.name}: {describe_search(config)}, "
        f"{plan.concurrent} trial(s) at a time ({plan.cpus:g} CPU each of {resources[0]:g}); "
        f"state in {path}",
        flush=True,
    )

    def tune_config() -> Any:
        # The searcher holds its objectives and ASHA the accuracy (Tune refuses a metric
        # given twice).
        return rt.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler(config),
            num_samples=config.tune.num_samples,
            max_concurrent_trials=plan.concurrent,
        )

    parent = open_parent(config, path, kind="search")
    try:
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
        if config.tune.measures_cost():
            rows = retime_completed(config, rows)
        outcome = summarize(config, rows, path)
        if has_front(config):
            outcome = replace(outcome, front=tuple(write_front(config, rows, outcome.summary)))
    except BaseException as err:
        end_failed(parent, err)
        raise
    if parent is not None:
        close_search(config, parent, outcome)
    return outcome


def close_search(config: ExperimentConfig, parent: TrackedRun, outcome: SearchOutcome) -> None:
    """The parent run gets the summary's files, the best trial's metric, and the best
    trial's own run is tagged."""
    best = outcome.best
    files = storage.file_names(outcome.summary)
    close_parent(
        parent,
        metrics={f"best_{accuracy_key(config)}": best.metric or float("nan")},
        artifacts={f"summary/{f}": storage.join(outcome.summary, f) for f in sorted(files)},
        tags={"best_trial": best.trial_id, "trials": str(len(outcome.rows))},
    )
    for row in outcome.rows:
        root = run_dir(config, f"{config.name}-{row.trial_id}")
        if row is best and (child := tracked_run_id(root)) is not None:
            tag_run(parent, child, {"best_trial": "true"})
        end_trial(parent, root, row.status)


def has_front(config: ExperimentConfig) -> bool:
    """A search of several objectives, or of one under cost constraints."""
    return len(config.tune.goals()) > 1 or config.tune.measures_cost()


def accuracy_key(config: ExperimentConfig) -> str:
    return validation_key(config.tune.accuracy_metric())


def describe_search(config: ExperimentConfig) -> str:
    goals = ", ".join(f"{o.goal.value} {o.metric}" for o in config.tune.goals())
    bounds = "; ".join(c.describe() for c in config.tune.constraints)
    kind = effective_search(config.tune).value
    if kind == SearchAlgorithm.OPTUNA.value and len(config.tune.goals()) > 1:
        kind += " (multi-objective TPE, a Pareto front)"
    return f"{kind} search, {goals}" + (f", keeping {bounds}" if bounds else "")


def effective_search(tune: TuneConfig) -> SearchAlgorithm:
    """The search that runs: several objectives turn the default random draws into
    Optuna's multi-objective search; a grid stays a grid."""
    if tune.search is SearchAlgorithm.RANDOM and len(tune.goals()) > 1:
        return SearchAlgorithm.OPTUNA
    return tune.search


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
    driver = {"CPU": TRIAL_DRIVER_CPU}
    if config.tune.latency_target:  # where the trial's student is timed
        driver[config.tune.latency_target] = TRIAL_DRIVER_CPU
    trainable = rt.with_resources(trainable, driver)
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
                    TrialProgress(what, metric=accuracy_key(config), epochs=config.optim.epochs)
                ],
                failure_config=ray.tune.FailureConfig(max_failures=0),
            ),
        )
    with classic_tune_output():
        return fit_unless_interrupted(tuner, f"the {what} at {path}")


TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"  # Tune's documented switch for its handler


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C reached Tune during a fit: Tune stopped the trials, saved its state, and
    returned as if the fit had ended."""


def fit_unless_interrupted(tuner: Any, what: str) -> Any:
    """``tuner.fit()``, raising :class:`SearchInterrupted` where Tune caught Ctrl-C: it
    returns its partial grid then, and its running trials read as ended, so a summary of it
    would call them stopped. Tune's handler puts back the one it found when it catches the
    signal, and is left in place when it does not: whichever is in place after the fit
    tells, and the one we found is put back either way."""
    found = signal.getsignal(signal.SIGINT)  # None: set outside Python, cannot be put back
    watching = (
        found is not None
        and threading.current_thread() is threading.main_thread()
        and not int(os.environ.get(TUNE_SIGINT_ENV, "0") or 0)
    )
    try:
        grid = tuner.fit()
    finally:
        caught = watching and signal.getsignal(signal.SIGINT) is found
        if watching:
            signal.signal(signal.SIGINT, found)
    if caught:
        raise SearchInterrupted(
            f"{what} stopped; Tune kept its state and the finished trials: the same "
            "command with --resume continues it"
        )
    return grid


NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"


def classic_tune_output() -> contextlib.AbstractContextManager[None]:
    """Tune's reporter of before 2.5 for the length of a run: at ``verbose=0`` it prints
    nothing, where the newer one (Ray 2.60's default) still prints a configuration table at
    the start and the trial-status table at the end. Our TrialProgress lines report."""
    return process_env(NEW_OUTPUT_ENV, "0")


def cluster_resources() -> tuple[float, float]:

    total = ray.cluster_resources()
    return float(total.get("CPU", 1.0)), float(total.get("GPU", 0.0))


def search_algorithm(config: ExperimentConfig) -> Any:
    """Tune's searcher: None (Tune's variant generator: random draws, or the full grid), or
    Optuna's TPE seeded by the config's seed, over one objective or several (MOTPE: its
    trials approach the Pareto front). Optuna's NSGA-II sampler would be the other choice;
    in Optuna 5 it holds a lock and Tune cannot save it with the search's state."""
    tune = config.tune
    if effective_search(tune) is not SearchAlgorithm.OPTUNA:
        return None
    # ray.tune's Optuna searcher: heavy (optuna imports sqlalchemy), imported where it is used
    from ray.tune.search.optuna import OptunaSearch

    goals = tune.goals()
    if len(goals) == 1:
        return OptunaSearch(metric=accuracy_key(config), mode="max", seed=config.seed)
    return OptunaSearch(
        metric=[report_key(o.metric) for o in goals],
        mode=[o.goal.value for o in goals],
        seed=config.seed,
    )


def scheduler(config: ExperimentConfig) -> Any:
    if not config.tune.early_stopping:
        return None
    # ray.tune: heavy (about a second to import), imported where it is used
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        metric=accuracy_key(config),
        mode="max",
        time_attr="training_iteration",
        max_t=config.optim.epochs,
        grace_period=min(config.tune.grace_period, config.optim.epochs),
        reduction_factor=config.tune.reduction_factor,
        # A trial that reaches the last epoch ends by itself (and exports its student);
        # ASHA's default would stop it at max_t, before the export.
        stop_last_trials=False,
    )
