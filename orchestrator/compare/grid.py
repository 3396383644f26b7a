"""The comparison grid: one Ray Tune trial per (method, seed) cell at one budget, resumed
cell by cell, then every finished cell evaluated on the same held-out set.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from orchestrator import storage
from orchestrator.compare.cells import (
    CROSS_MODEL,
    CROSS_MODEL_RANK1,
    IMAGES_PER_S,
    Cell,
    Comparison,
    compare_path,
    run_name,
)
from orchestrator.compare.report import summarize
from orchestrator.config import ExperimentConfig, to_dict, val_targets
from orchestrator.evaluation import evaluate_students
from orchestrator.formats.student import read_student_export
from orchestrator.metric_names import Metric, validation_key
from orchestrator.runs import (
    RUN_RECORD,
    absolute_paths,
    ensure_ray,
    fingerprint,
    run_dir,
    student_uri,
    training_settings,
)
from orchestrator.teacher.models import load_teacher_backbone
from orchestrator.tracking.parents import (
    close_parent,
    end_trial,
    numeric_leaves,
    open_parent,
    parent_id,
)
from orchestrator.tracking.runs import TrackedRun, end_failed
from orchestrator.train.checks import check_run_inputs
from orchestrator.train.launch import distill
from orchestrator.tune import (
    check_trial_fits,
    cluster_resources,
    fit_trials,
    trial_resources,
)
from orchestrator.tune_space import apply_params


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
    # ray.tune: heavy (about a second to import), imported where it is used
    from ray.tune.integration.ray_train import TuneReportCallback

    method, seed = cell_of(params)
    config = cell_config(base, method, seed)
    name = run_name(config, config.loss.method, config.seed)
    parent = parent_id(compare_path(config))
    distill(config, name, [TuneReportCallback()], tracking_parent=parent)


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
    base = to_dict(config)
    seed = config.compare.seeds[0]
    check_run_inputs([cell_config(base, method.value, seed) for method in config.compare.methods])


# --- the statistics -----------------------------------------------------------------------


# --- the grid and its results ---------------------------------------------------------------


def run_compare(config: ExperimentConfig, resume: bool = False) -> Comparison:
    """Train (or, with ``resume``, finish training) the grid, then evaluate and summarise."""
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
    parent = open_parent(config, path, kind="comparison")
    try:
        comparison = train_and_summarize(config, path, todo, concurrent, resume=resume)
    except BaseException as err:
        end_failed(parent, err)
        raise
    if parent is not None:
        close_comparison(config, parent, comparison)
    return comparison


def close_comparison(config: ExperimentConfig, parent: TrackedRun, comparison: Comparison) -> None:
    """The parent run gets the summary's files, and every method's mean, spread and
    interval to the baseline as metrics (``<column>/<method>/mean``, ...); every cell's
    run still open is ended by its outcome (:func:`end_trial`)."""
    data = json.loads(storage.read_text(storage.join(comparison.summary, "comparison.json")))
    files = sorted(storage.file_names(comparison.summary))
    close_parent(
        parent,
        metrics=numeric_leaves(data["tables"]),
        artifacts={f: storage.join(comparison.summary, f) for f in files},
        tags={"baseline": str(data["baseline"])},
    )
    for cell in comparison.cells:
        end_trial(parent, run_dir(config, cell.run), cell.status)


def train_and_summarize(
    config: ExperimentConfig, path: str, todo: list[str], concurrent: int, *, resume: bool
) -> Comparison:
    """Train the cells of ``todo`` (or finish a grid, with ``resume``), evaluate every cell
    and write the summary."""
    # ray.tune: heavy (about a second to import), imported where it is used
    from ray import tune as rt

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
