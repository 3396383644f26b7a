"""Where runs live and how a job gets its Ray cluster: the helpers that the training
driver, Tune and the retraining pipeline share (none of them is training itself)."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from orchestrator import storage
from orchestrator.artifacts import STUDENT_FILE
from orchestrator.config import ExperimentConfig


def object_store_env(config: ExperimentConfig) -> dict[str, str]:
    """The ``AWS_*`` variables that point S3 clients at the config's endpoint and region."""
    return storage.endpoint_env(config.storage.endpoint_url, config.storage.region)


def use_object_store_config(config: ExperimentConfig) -> None:
    """Make the config's endpoint and region visible to this process's S3 clients."""
    storage.use_endpoint(config.storage.endpoint_url, config.storage.region)


def ensure_ray() -> None:
    """Connect to ``RAY_ADDRESS`` (set inside ``ray job submit``), else start a local cluster."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # A private local cluster started by this process (auth is issue 19's work).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Nothing scrapes a private cluster's metrics: collecting them only costs a
        # harvester thread in every worker (one crashed once in a read task; see README).
        os.environ.setdefault("RAY_enable_metrics_collection", "0")
        # Ray Data's per-epoch INFO lines ("execution finished in ...") in every process.
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
        ray.init(address="local", logging_level=logging.WARNING)
    quiet_data_logs()


def quiet_data_logs() -> None:
    """No per-epoch execution plans and progress bars from Ray Data in our output."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # this process's read planning


def storage_root(config: ExperimentConfig) -> str:
    """Ray wants an absolute local path or a URI."""
    return (
        os.path.abspath(config.storage_path)
        if storage.is_local(config.storage_path)
        else config.storage_path
    )


def absolute_paths(config: ExperimentConfig) -> ExperimentConfig:
    """Local paths made absolute on the driver: Ray workers run in another directory."""

    def fix(path: str) -> str:
        return os.path.abspath(path) if path and storage.is_local(path) else path

    return replace(
        config,
        storage_path=fix(config.storage_path),
        data=replace(config.data, train=fix(config.data.train), eval=fix(config.data.eval)),
        teacher=replace(
            config.teacher,
            classifier=fix(config.teacher.classifier),
            backbone=fix(config.teacher.backbone),
        ),
    )


def run_dir(config: ExperimentConfig, name: str) -> str:
    """``<storage_path>/<name>``: Ray Train's checkpoints and our exports of run ``name``."""
    return storage.join(storage_root(config), name)


def student_uri(config: ExperimentConfig, name: str) -> str:
    return storage.join(run_dir(config, name), STUDENT_FILE)
