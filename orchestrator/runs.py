"""Where runs live and how a job gets its Ray cluster: the helpers that the training
driver, Tune and the retraining pipeline share (none of them is training itself)."""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import replace
from typing import Any

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
    """The one way a job gets its Ray cluster, before anything touches Ray.

    With ``RAY_ADDRESS`` set (as inside ``ray job submit``), connect there. Otherwise start
    a private cluster for this process (:func:`start_private_cluster`), never a cluster
    found by auto-discovery (a stale ``/tmp/ray/ray_current_cluster`` or another user's
    ``ray start --head``).
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        start_private_cluster()
        print(f"[ray] private local cluster (token auth) at {gcs_address()}", flush=True)
    quiet_data_logs()


def start_private_cluster(**init_kwargs: Any) -> None:
    """A new local Ray cluster that only this process and its children can use.

    Ray 2.60 binds its gRPC servers (GCS, raylet, workers) to every interface whatever
    node address is asked for, so the cluster runs with Ray's token authentication and a
    fresh random token that exists only in this process's environment (inherited by the
    cluster's processes, written nowhere): a client elsewhere that reaches a port is
    refused. The dashboard listens on 127.0.0.1 only.
    """
    import ray
    from ray._raylet import Config  # type: ignore[attr-defined]

    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # Nothing scrapes a private cluster's metrics: collecting them only costs a
    # harvester thread in every worker (one crashed once in a read task; see README).
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    # Ray Data's per-epoch INFO lines ("execution finished in ...") in every process.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    Config.initialize("")  # Ray reads RAY_AUTH_MODE once at import: make it see token mode
    ray.init(address="local", logging_level=logging.WARNING, **init_kwargs)


def gcs_address() -> str:
    import ray

    return str(ray.get_runtime_context().gcs_address)


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
