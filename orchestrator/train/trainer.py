"""Building and fitting the TorchTrainer for a run (its dataset, scaling, failure and
checkpoint settings), unwrapping what it returns, and the run's summary."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.config import (
    ExperimentConfig,
    to_dict,
)
from orchestrator.data.consumed import skip_dir
from orchestrator.data.ray_input import training_dataset
from orchestrator.errors import unwrapped_user_error
from orchestrator.formats.state import TrainingState, load_state
from orchestrator.metric_names import Metric
from orchestrator.runs import (
    ensure_ray,
    object_store_env,
    process_env,
    run_dir,
    storage_root,
)
from orchestrator.train.checks import input_plan
from orchestrator.train.resources import preflight
from orchestrator.train.spec import (
    TrainSpec,
)
from orchestrator.train.worker import train_loop_per_worker


@dataclass(frozen=True)
class RunOutcome:
    name: str
    checkpoint_path: str
    state: TrainingState
    metrics: dict[str, Any]
    wall_seconds: float


def fit(
    config: ExperimentConfig,
    spec: TrainSpec,
    *,
    name: str,
    callbacks: Sequence[Any] = (),
    dataset: Any = None,
) -> RunOutcome:
    """Run ``train_loop_per_worker`` on ``config.scaling.num_workers`` workers.

    Reusing ``name`` under the same storage path resumes from its latest checkpoint.
    ``callbacks`` go to Train's RunConfig (a Tune trial passes ``TuneReportCallback``).
    ``dataset`` replaces the Parquet input (a Ray Dataset with ``image``, ``label`` and
    ``image_id`` columns: ``bench/train_throughput.py`` feeds decoded images from memory).
    An input error raised in a worker (a corrupt image, a bad label) is re-raised here as
    itself, not inside Ray's wrappers.
    """
    ensure_ray()
    preflight(config)  # again: a Tune trial or a caller may reach fit directly
    trainer = torch_trainer(config, spec, name=name, callbacks=callbacks, dataset=dataset)
    started = time.monotonic()
    try:
        with controller_env(config):
            result = trainer.fit()
        if result.error is not None:
            raise result.error
    except Exception as err:  # Train V2 raises a failed run's error from fit()
        cause = unwrapped_user_error(err)
        if cause is not None:
            raise cause from None
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"run {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = load_state(directory)
    return RunOutcome(
        name, result.checkpoint.path, state, dict(result.metrics or {}), time.monotonic() - started
    )


WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@contextlib.contextmanager
def controller_env(config: ExperimentConfig) -> Iterator[None]:
    """The settings Ray Train's controller reads from its environment, which it takes from
    the driver's when ``fit`` creates it: this process's, for the length of the call."""
    with process_env(WORKER_START_TIMEOUT_ENV, f"{config.scaling.worker_start_timeout_s:g}"):
        yield


def run_dataset(config: ExperimentConfig, name: str) -> Any:
    """The run's Parquet input; with checkpoints inside epochs, read past the images a
    resumed epoch already trained (the run's skip directory)."""
    skip = skip_dir(run_dir(config, name)) if config.run.checkpoint_every_steps else None
    return training_dataset(config.data, input_plan(config), config.seed, skip_dir=skip)


def torch_trainer(
    config: ExperimentConfig,
    spec: TrainSpec,
    *,
    name: str,
    callbacks: Sequence[Any],
    dataset: Any = None,
) -> Any:
    # Train V2's classes (what ray.train.* resolves to at run time), named so types agree.
    from ray.data import ExecutionOptions

    # ray.train: heavy (about a second to import), imported where it is used
    from ray.train import DataConfig

    # ray.train: heavy (about a second to import), imported where it is used
    from ray.train.v2.api.config import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )

    # ray.train: heavy (about a second to import), imported where it is used
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(config), "spec": spec},
        scaling_config=ScalingConfig(
            num_workers=(config.scaling.min_workers, config.scaling.max_workers)
            if config.scaling.elastic
            else config.scaling.max_workers,
            elastic_resize_monitor_interval_s=config.scaling.resize_check_s,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": config.scaling.cpus_per_worker},
        ),
        datasets={"train": dataset if dataset is not None else run_dataset(config, name)},
        # Explicit ingest options: Train's defaults copy the deprecated
        # ExecutionOptions.exclude_resources (a RayDeprecationWarning on every run).
        # preserve_order makes the split of each epoch's rows over the workers a function of
        # the data alone (Ray's splitter then also ignores locality hints).
        dataset_config=DataConfig(
            execution_options=ExecutionOptions(preserve_order=config.data.ordered)
        ),
        run_config=RunConfig(
            name=name,
            callbacks=list(callbacks),
            storage_path=storage_root(config),
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.run.keep_checkpoints or None),
            # Our per-epoch lines are the progress a person reads: Train's own INFO lines
            # repeat them, and its print patch would print each of ours twice.
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={
                "env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **object_store_env(config)}
            },
        ),
    )


def trained_nothing(outcome: RunOutcome) -> bool:
    """A rerun of a finished run: its exports stay those of the run that trained them."""
    return outcome.metrics.get("epochs_this_attempt", 1) == 0


def summary(outcome: RunOutcome) -> dict[str, Any]:
    headline = (Metric.ACC_10FOLD, Metric.AUC, Metric.RANK1)
    keep = (
        "loss",
        "samples_per_s",
        "input_wait_share",
        "best_epoch",
        "val_nonfinite",
        *(m.validation_key for m in headline),
    )
    history = outcome.state.history
    return {
        "name": outcome.name,
        "checkpoint": outcome.checkpoint_path,
        "epochs_done": list(history.epochs_done),
        # Each attempt's worker count, and the epoch each restart resumed in.
        "world_sizes": list(history.world_sizes),
        "resumed_at": list(history.resumed_at),
        "train_seconds": round(history.train_seconds, 1),
        "throughput": [
            {"epoch": epoch, "samples_per_s": round(rate, 1), "input_wait_share": round(wait, 3)}
            for epoch, (rate, wait) in history.measured_throughput()
        ],
        # Each trained epoch's figures as the tracker logs them (exact, not rounded).
        "epochs": [dict(curve) for curve in history.curves],
        **{
            k: (round(v, 4) if isinstance(v, float) and np.isfinite(v) else v)
            for k, v in outcome.metrics.items()
            if k in keep
        },
    }
