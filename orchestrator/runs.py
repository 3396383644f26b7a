"""Where runs live and how a job gets its Ray cluster: the helpers that the training
driver, Tune and the retraining pipeline share (none of them is training itself)."""

from __future__ import annotations

import contextlib
import enum
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import ray
from ray._raylet import Config  # type: ignore[attr-defined]

from orchestrator import ray_hook, storage
from orchestrator.config import METHOD_LOSS_SETTINGS, ExperimentConfig, LossConfig, to_dict
from orchestrator.errors import UsageError
from orchestrator.formats.best import BEST_DIR
from orchestrator.formats.student import STUDENT_FILE
from orchestrator.locks import expiring_lock


def object_store_env(config: ExperimentConfig) -> dict[str, str]:
    """The ``AWS_*`` variables that point S3 clients at the config's endpoint and region."""
    return storage.endpoint_env(config.storage.endpoint_url, config.storage.region)


def use_object_store_config(config: ExperimentConfig) -> None:
    """Make the config's endpoint and region visible to this process's S3 clients."""
    storage.use_endpoint(config.storage.endpoint_url, config.storage.region)


@contextlib.contextmanager
def process_env(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the length of the block, then as it was (unset if
    it was unset): settings Ray reads from the environment of the process that calls it."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


# Every worker of a job's Ray cluster runs orchestrator.ray_hook.setup_worker first.
WORKER_SETUP = {"worker_process_setup_hook": "orchestrator.ray_hook.setup_worker"}


def ensure_ray() -> None:
    """The one way a job gets its Ray cluster, before anything touches Ray.

    With ``RAY_ADDRESS`` set (as inside ``ray job submit``), connect there. Otherwise start
    a private cluster for this process (:func:`start_private_cluster`), never a cluster
    found by auto-discovery (a stale ``/tmp/ray/ray_current_cluster`` or another user's
    ``ray start --head``).
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # Inside `ray job submit` Ray merges this with the job's own runtime_env (its
        # working_dir ships the package the hook lives in, as it ships the training loop).
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=WORKER_SETUP)
    else:
        start_private_cluster()
        print(f"[ray] private local cluster (token auth) at {gcs_address()}", flush=True)
    quiet_data_logs()
    quiet_worker_lines()


def start_private_cluster(**init_kwargs: Any) -> None:
    """A new local Ray cluster that only this process and its children can use.

    Ray 2.60 binds its gRPC servers (GCS, raylet, workers) to every interface whatever
    node address is asked for, so the cluster runs with Ray's token authentication and a
    fresh random token that exists only in this process's environment (inherited by the
    cluster's processes, written nowhere): a client elsewhere that reaches a port is
    refused. The dashboard listens on 127.0.0.1 only.
    """
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = process_token()
    # Nothing scrapes a private cluster's metrics: collecting them only costs a
    # harvester thread in every worker (one crashed once in a read task; see README).
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    # Ray Data's per-epoch INFO lines ("execution finished in ...") in every process.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    Config.initialize("")  # Ray reads RAY_AUTH_MODE once at import: make it see token mode
    # Every worker of the private cluster knows its cluster's address (ray_hook), so
    # Ray's own actors that look a cluster up (Train's PlacementGroupCleaner, through the
    # State API) find this one, not "multiple active Ray instances" when another Ray runs
    # on the host.
    # The hook also keeps a failed task's traceback from being echoed to the console
    # before the driver reports the failure (ray_hook.QUIET_RECORDS).
    ray.init(
        address="local", logging_level=logging.WARNING, runtime_env=WORKER_SETUP, **init_kwargs
    )


_TOKEN: list[str] = []


def process_token() -> str:
    """This process's private-cluster token: random, made once. A cluster restarted in the
    same process (after ``ray.shutdown()``) keeps it: Ray's client side reads the token once
    per process, so a new one would lock this process out of its own new cluster."""
    if not _TOKEN:
        _TOKEN.append(secrets.token_hex(32))
    return _TOKEN[0]


def gcs_address() -> str:

    return str(ray.get_runtime_context().gcs_address)


# Lines of workers' output, streamed to the driver, that tell a user nothing they can act
# on: Ray's core worker logs this at ERROR level for every actor that Ray Data and Ray
# Train create with their arguments in the object store (ray-project/ray#53727).
QUIET_WORKER_LINES = (
    re.compile(
        r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store and max_restarts > 0"
    ),
)


def quiet_worker_lines() -> None:
    """Drop :data:`QUIET_WORKER_LINES` from the worker output this driver prints.

    Ray 2.60 streams workers' stdout and stderr to the driver through one dispatcher
    (``ray._private.ray_logging.global_worker_stdstream_dispatcher``, handler
    ``ray_print_logs``); its handler is wrapped once. With another Ray the dispatcher may
    differ: then nothing is filtered."""
    try:
        # ray._private: optional, a private module of Ray that may move between releases.
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    with dispatcher._lock:
        handlers = list(dispatcher.handlers)
        for i, (name, handler) in enumerate(handlers):
            if name == "ray_print_logs" and not getattr(handler, "quiet_lines", False):
                handlers[i] = (name, filtered_handler(handler))
        dispatcher.handlers = handlers


def filtered_handler(handler: Any) -> Any:
    def handle(data: dict[str, Any]) -> None:
        lines = [
            line
            for line in data.get("lines", [])
            if not any(pattern.search(line) for pattern in QUIET_WORKER_LINES)
        ]
        if lines:
            handler({**data, "lines": lines})

    handle.quiet_lines = True  # type: ignore[attr-defined]
    return handle


def quiet_data_logs() -> None:
    """No per-epoch execution plans and progress bars from Ray Data in our output."""
    # ray.data: heavy (about a second to import), imported where it is used
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # this process's read planning
    ray_hook.quiet_ray_records()  # the Ray Data executions this process runs


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
        data=replace(
            config.data,
            train=fix(config.data.train),
            eval=fix(config.data.eval),
            val_dir=fix(config.data.val_dir),
        ),
        run=replace(
            config.run,
            val_targets=tuple(fix(t) if t.endswith(".bin") else t for t in config.run.val_targets),
        ),
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


def best_uri(config: ExperimentConfig, name: str) -> str:
    """``<run>/best``: the best validated state (``run.keep_best``) and its student export."""
    return storage.join(run_dir(config, name), BEST_DIR)


# --- run identity and the run lock -----------------------------------------------------

RUN_RECORD = "run.json"
# Entries of run.json that later attempts of the run keep: its MLflow run
# (orchestrator.tracking.runs), so that a resume continues it.
KEPT_ACROSS_ATTEMPTS = ("mlflow",)
LOCKS_DIR = ".locks"
# Settings that do not change what is trained: where things live, how it is scheduled,
# logged and checkpointed, how fast the input is decoded or throttled, the epoch count (a
# run is extended by resuming it with more epochs), and the sections of other jobs (a
# comparison or a search grows without retraining its finished runs). The classifier's
# location is left out too: its content is what counts, and every checkpoint records and
# checks its checksum.
NOT_TRAINING = (
    "name", "storage_path", "storage", "synthetic", "tune", "retrain", "compare", "scaling",
    "tracking",
    "run", "teacher.classifier",
    "optim.epochs", "teacher_optim.epochs", "data.decode_actors", "data.decode_cpus",
    "data.decode_batch", "data.decode", "data.decode_threads", "data.throttle_images_per_s",
    "sharding.mode", "sharding.auto_min_bytes", "sharding.chunk_size",
)  # fmt: skip
# Inside the sections left out above, the settings that do change what is trained.
TRAINING_AFTER_ALL = ("run.precision", "run.shuffle_buffer", "run.sync_batchnorm")


class RerunPolicy(enum.StrEnum):
    REFUSE = "refuse"  # a rerun with other training settings is an error (the default)
    RESUME_ANYWAY = "resume-anyway"  # continue the run with the new settings
    FORCE_NEW = "force-new"  # discard any old run of the name and train anew


class RunConflictError(UsageError):
    """A run of this name exists and was trained with other settings."""


def training_settings(config: ExperimentConfig, role: str) -> dict[str, Any]:
    """Every setting that changes what a run trains, by dotted key: not those of another
    job or of the other role, and not the loss settings of methods other than this run's
    (``Method.loss_settings``)."""
    flat = flatten(to_dict(config))
    other = "optim" if role == "teacher" else "teacher_optim"
    unused = [f"loss.{k}" for k in METHOD_LOSS_SETTINGS if k not in method_settings(config, role)]
    return {
        key: value
        for key, value in flat.items()
        if key in TRAINING_AFTER_ALL
        or not any(key == n or key.startswith(n + ".") for n in (*NOT_TRAINING, other, *unused))
    }


def method_settings(config: ExperimentConfig, role: str) -> tuple[str, ...]:
    """The method-specific loss keys a run of ``role`` reads (a teacher reads none)."""
    return () if role == "teacher" else config.loss.method.loss_settings


def ineffective_settings(config: ExperimentConfig, role: str) -> list[str]:
    """The method-specific loss settings given a non-default value that this run does not
    read (those of other methods), each with the method that ignores it."""
    loss, default = to_dict(config.loss), to_dict(LossConfig())
    return [
        f"loss.{k} (loss.method {config.loss.method.value})"
        for k in METHOD_LOSS_SETTINGS
        if k not in method_settings(config, role) and loss[k] != default[k]
    ]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def fingerprint(settings: dict[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def code_version() -> str:
    """The package version, and the git commit when run from a checkout."""
    try:
        version = importlib.metadata.version("proxylesskd-orchestrator")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)), check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


def claim_run(
    config: ExperimentConfig, name: str, *, role: str, policy: RerunPolicy = RerunPolicy.REFUSE
) -> None:
    """Record what run ``name`` trains (``<run>/run.json``), or check a rerun against the
    record: the same settings resume, others are refused unless ``policy`` says otherwise."""
    root = run_dir(config, name)
    uri = storage.join(root, RUN_RECORD)
    settings = training_settings(config, role)
    kept: dict[str, Any] = {}
    if policy is RerunPolicy.FORCE_NEW and storage.exists(root):
        print(f"[run] {name}: --force-new: removing the old run at {root}", flush=True)
        storage.remove_tree(root)
    elif storage.exists(uri):
        recorded = json.loads(storage.read_text(uri))
        kept = {k: recorded[k] for k in KEPT_ACROSS_ATTEMPTS if k in recorded}
        differs = recorded["fingerprint"] != fingerprint(settings)
        if differs and policy is RerunPolicy.REFUSE and not has_checkpoint(root):
            # It never saved a checkpoint: nothing was trained that the new settings could
            # contradict (e.g. it failed on its input, since fixed).
            print(f"[run] {name}: no checkpoint yet, so its settings are replaced", flush=True)
        elif differs and policy is RerunPolicy.REFUSE:
            raise RunConflictError(conflict_message(root, name, recorded["settings"], settings))
    record = {
        "name": name,
        "role": role,
        "fingerprint": fingerprint(settings),
        "settings": settings,
        "code_version": code_version(),
        **kept,
    }
    storage.makedirs(root)
    storage.write_text_atomic(uri, json.dumps(record, indent=2, sort_keys=True, default=str))


def has_checkpoint(root: str) -> bool:
    """Whether the run at ``root`` saved a checkpoint (Ray Train's ``checkpoint_*``)."""
    return bool(storage.glob(root, "checkpoint_*"))


def conflict_message(root: str, name: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:6])
    more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
    return (
        f"run {name!r} at {root} was trained with other settings ({changes}{more}): pass "
        "--name <new name> for a new run, --resume-anyway to continue this one with the new "
        "settings, or --force-new to discard it and train anew"
    )


def run_lock(config: ExperimentConfig, name: str) -> Any:
    """The run's expiring lock (``<storage_path>/.locks/<name>.json``): a second live run of
    the same name is refused, naming the holder. Kept alive by a heartbeat while held."""
    locks = storage.join(storage_root(config), LOCKS_DIR)
    storage.makedirs(locks)
    return expiring_lock(
        storage.join(locks, f"{name}.json"),
        ttl_s=config.run.lock_ttl_s,
        settle_s=config.run.lock_settle_s,
        heartbeat=True,
    )
