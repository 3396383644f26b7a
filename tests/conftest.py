from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.config import ExperimentConfig, SyntheticConfig
from orchestrator.data.prepare import SyntheticDatasets, write_synthetic
from orchestrator.objectstore import EmbeddedObjectStore
from tests.mlflow_server import MlflowServer

REPO = Path(__file__).resolve().parent.parent
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def tiny_synthetic_config(out: Path, seed: int = 0) -> SyntheticConfig:
    return SyntheticConfig(
        out=str(out),
        num_identities=6,
        eval_identities=20,
        images_per_identity=3,
        pairs_per_fold=4,
        seed=seed,
        shard_bytes=40_000,  # several shards even for this tiny set
    )


@pytest.fixture(scope="session", autouse=True)
def error_logs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The jobs' error logs (cli.error_log) of this session go under its temporary
    directory, not the machine's /tmp/proxylesskd-errors."""
    from orchestrator.cli import ERROR_LOG_DIR_ENV

    root = tmp_path_factory.mktemp("error-logs")
    saved = os.environ.get(ERROR_LOG_DIR_ENV)
    os.environ[ERROR_LOG_DIR_ENV] = str(root)
    yield root
    if saved is None:
        os.environ.pop(ERROR_LOG_DIR_ENV, None)
    else:
        os.environ[ERROR_LOG_DIR_ENV] = saved


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDatasets:
    return write_synthetic(tiny_synthetic_config(tmp_path_factory.mktemp("synthetic")))


BUCKET = "proxylesskd-test"


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedObjectStore]:
    """A real S3 server (SeaweedFS) on loopback for the whole session, with bucket
    ``BUCKET``. Its endpoint and credentials go into this process's AWS_* environment
    before Ray starts, so Ray's workers inherit them like on a cloud node."""
    store = EmbeddedObjectStore.start(tmp_path_factory.mktemp("objectstore"))
    store.create_bucket(BUCKET)
    saved = {k: os.environ.get(k) for k in store.endpoint.env()}
    os.environ.update(store.endpoint.env())
    yield store
    store.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def mlflow_server(
    tmp_path_factory: pytest.TempPathFactory, object_store: EmbeddedObjectStore
) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` on loopback for the session (SQLite, artifacts on the
    embedded S3 server); each test logs to an experiment or registered model of its own."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), object_store, BUCKET)
    server.start()
    yield server
    server.stop()


def mlflow_client(server: MlflowServer) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.uri)


def parent_statuses(server: MlflowServer, experiment: str, kind: str) -> list[str]:
    """The statuses of the parent runs (``tags.kind``: search or comparison) in
    ``experiment`` on ``server``."""
    mlflow = mlflow_client(server)
    found = mlflow.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    runs = mlflow.search_runs([found.experiment_id], f"tags.kind = '{kind}'")
    return [r.info.status for r in runs]


def _start_ray() -> None:
    """The jobs' own private cluster (token auth), sized like the CI machine."""
    from orchestrator.runs import start_private_cluster

    os.environ.pop("RAY_ADDRESS", None)
    start_private_cluster(num_cpus=2, log_to_driver=False)


@pytest.fixture(scope="session")
def ray_cluster(object_store: EmbeddedObjectStore) -> Iterator[None]:
    """One local Ray cluster for the whole session (2 CPUs, like the CI machine), started
    after the session's S3 server: Ray's processes take their environment when the
    cluster starts, so its workers inherit the store's ``AWS_*`` variables, like on a
    cloud node. (Started before the store, the cluster had to be restarted once for the
    tests that stream from S3.)"""
    import ray

    if not ray.is_initialized():
        _start_ray()
    yield
    ray.shutdown()


# Test tiers (make test-fast runs the first): a module or test may mark itself; otherwise a
# test that uses a Ray cluster fixture is `ray`, and everything else is `unit`.
TIERS = ("unit", "dist", "ray", "e2e")
# Ray settings for every cluster of the session (its own, the CLIs', `ray start --head`'s,
# the multi-node scenario's: they inherit this process's environment), each for the time
# the suite's ~50 tiny fits spend waiting on Ray rather than training:
SUITE_RAY_ENV = {
    # Ray Train's controller polls its workers every 2 s by default, so a fit's end is seen
    # up to two polls late: about 4 s of each tiny fit (21 s -> 17 s measured).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Each fit creates about ten actors (Train's controller, placement-group cleaner, sync
    # actor, workers, dataset manager, split coordinator...), each in a new worker process
    # when no idle one waits. The raylet prestarts workers and keeps up to 12 idle ones
    # (default: as many as CPUs, the rest killed after 1 s idle), so an actor often finds a
    # process already up. test_retrain.py + test_baselines_ray.py on the 2-core machine,
    # two runs each way, alternated: 216 and 219 s without, 197 and 195 s with.
    "RAY_enable_worker_prestart": "1",
    "RAY_num_workers_soft_limit": "12",
    "RAY_idle_worker_killing_time_threshold_ms": "600000",
}


def pytest_configure(config: pytest.Config) -> None:
    for key, value in SUITE_RAY_ENV.items():
        os.environ.setdefault(key, value)


RAY_FIXTURES = {"ray_cluster"}
SERVER_FIXTURES = {"mlflow_server", "object_store"}  # server processes of their own


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        used = set(getattr(item, "fixturenames", ()))
        if RAY_FIXTURES & used:
            item.add_marker(pytest.mark.ray)
        elif SERVER_FIXTURES & used:
            item.add_marker(pytest.mark.e2e)
        else:
            item.add_marker(pytest.mark.unit)


@dataclass(frozen=True)
class TrainSetup:
    base: ExperimentConfig
    classifier_weight: np.ndarray


def make_train_setup(root: Path | str, data: SyntheticDatasets, emb_dim: int = 16) -> TrainSetup:
    """A random teacher (backbone + classifier) for ``data``, and a config around them."""
    import torch

    from orchestrator.classifier import write_classifier
    from orchestrator.config import (
        Arch,
        DataConfig,
        DecodeAt,
        ExperimentConfig,
        OptimConfig,
        RunConfig,
        ScalingConfig,
        StudentConfig,
        TeacherConfig,
        TrackingConfig,
    )
    from orchestrator.data import format as fmt
    from orchestrator.models import build_backbone
    from orchestrator.storage import join
    from orchestrator.teacher.checkpoint import TeacherCheckpoint, save_teacher

    def at(name: str) -> str:
        return join(str(root), name)

    meta = fmt.read_meta(data.train_uri)
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(meta.num_classes, emb_dim))
    write_classifier(
        at("classifier"),
        weight,
        label_map_fingerprint=meta.label_map_fingerprint,
        source={"kind": "test"},
    )
    torch.manual_seed(0)
    backbone = build_backbone(Arch.TINY_IRESNET, emb_dim).state_dict()
    save_teacher(
        at("teacher.pt"),
        TeacherCheckpoint(
            Arch.TINY_IRESNET,
            emb_dim,
            112,
            backbone,
            torch.from_numpy(weight).float(),
            meta.label_map_fingerprint,
        ),
    )
    base = ExperimentConfig(
        name="t",
        storage_path=at("runs"),
        # Decoded in the Train workers: no decode actor pool to start every epoch. The
        # tests of the pool's own behaviour ask for DecodeAt.POOL.
        data=DataConfig(train=data.train_uri, eval=data.eval_uri, decode=DecodeAt.WORKER),
        student=StudentConfig(arch=Arch.TINY_MOBILEFACENET, emb_dim=emb_dim),
        teacher=TeacherConfig(
            arch=Arch.TINY_IRESNET,
            emb_dim=emb_dim,
            classifier=at("classifier"),
            backbone=at("teacher.pt"),
        ),
        optim=OptimConfig(lr=0.05, epochs=2, batch_size=8),
        teacher_optim=OptimConfig(lr=0.05, epochs=1, batch_size=8),
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=0.5),
        # lock_settle_s: the run lock's wait before it re-reads its claim, 0.2 s on this
        # local disk (test_run_lock and test_locks set their own).
        run=RunConfig(eval_every_epochs=0, log_every_s=5.0, shuffle_buffer=0, lock_settle_s=0.2),
        # Tracking is tested against a real MLflow server in test_tracking.py; elsewhere
        # each run would open its own SQLite database for nothing.
        tracking=TrackingConfig(enabled=False),
    )
    return TrainSetup(base, weight)


@pytest.fixture(scope="session")
def train_setup(
    tmp_path_factory: pytest.TempPathFactory, tiny_synthetic: SyntheticDatasets
) -> TrainSetup:
    return make_train_setup(tmp_path_factory.mktemp("teacher"), tiny_synthetic)


def assert_baseline_trained(
    config: ExperimentConfig, outcome: Any, classifier_shape: tuple[int, ...]
) -> None:
    """A baseline's finished run (``outcome``: a RunOutcome): a margin classifier of its
    own in the loss state, the teacher's W unused, and every convolution and linear weight
    of the student moved from its seeded start (an lr of 0, or a loss without gradient,
    would leave them where they were)."""
    import torch

    from orchestrator.models import build_backbone

    (own,) = [k for k in outcome.state.loss if k.endswith("classifier.weight")]
    assert tuple(outcome.state.loss[own].shape) == tuple(classifier_shape)
    assert outcome.state.classifier is None, "a baseline does not use the teacher's W"
    # BatchNorm biases are left out: one that a later BatchNorm re-centres gets a zero
    # gradient (measured: gdc.1.bias moved 8e-9).
    torch.manual_seed(config.seed)
    start = build_backbone(config.student.arch, config.student.emb_dim).state_dict()
    moved = {
        k: float((v - start[k]).abs().max())
        for k, v in outcome.state.student.items()
        if v.is_floating_point() and v.dim() >= 2
    }
    assert len(moved) > 10, sorted(moved)
    assert min(moved.values()) > 1e-5, sorted(moved.items(), key=lambda kv: kv[1])[:3]
    assert np.isfinite(outcome.metrics["loss"])


def clean_env() -> dict[str, str]:
    """The environment of a CLI subprocess that starts its own private Ray cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    return env


def run_ok(command: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a CLI subprocess that starts its own private Ray cluster; it must exit 0 (the
    tail of its output is the failure message)."""
    done = subprocess.run(
        command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def run_job_here(main: Callable[[Sequence[str] | None], int], argv: list[str]) -> str:
    """A job's CLI called in this process (``cli.run``, on the session's Ray cluster: no
    cluster of its own to start), where the subprocess is not what a test is about; it must
    exit 0. What it printed."""
    import contextlib
    import io

    from orchestrator import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.run(main, argv)
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


def interrupt_when(command: list[str], ready: Callable[[], object], what: str) -> str:
    """Run ``command`` (a Tune job) until ``ready()`` is truthy, then Ctrl-C it (Tune saves
    its state and stops; killed after 120 s if not); its output."""
    import signal
    import subprocess
    import time

    interrupted = subprocess.Popen(
        command,
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 400
    while not ready() and time.monotonic() < deadline:
        assert interrupted.poll() is None, interrupted.communicate()[0][-3000:]
        time.sleep(1)
    assert ready(), f"no {what} finished in time"
    interrupted.send_signal(signal.SIGINT)
    try:
        return interrupted.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        os.killpg(interrupted.pid, signal.SIGKILL)
        return interrupted.communicate()[0]


def registered_inside(run_dir: Path) -> list[tuple[int, int]]:
    """(epoch, step) of the checkpoints inside an epoch (0-based epoch) that Ray Train has
    registered for the run at ``run_dir``. A checkpoint directory is written before Train's
    controller collects it, and one whose worker dies first is never used: a test that
    kills a worker after a checkpoint waits for this."""
    import json

    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, ValueError):
        return []
    return [
        (r["metrics"]["epoch"] + 1, r["metrics"]["steps_in_epoch"])
        for r in snapshot["checkpoint_results"]
        if "steps_in_epoch" in r["metrics"]
    ]


def dataset_image_ids(uri: str) -> list[str]:
    """Every image id of a dataset, sorted (what one epoch must cover)."""
    from orchestrator.data import format as fmt

    meta = fmt.read_meta(uri)
    return sorted(
        str(i)
        for table in fmt.iter_shards(uri, meta, columns=["image_id"])
        for i in table.column("image_id").to_pylist()
    )


def kill_test_setup(root: Path, *, identities: int = 24, pairs_per_fold: int = 4) -> TrainSetup:
    """A training set long enough to interrupt (``identities`` x 8 images: 24 steps of 8 at
    the default) with 20 held-out identities, and a random teacher around it."""
    data = write_synthetic(
        SyntheticConfig(
            out=str(root / "data"),
            num_identities=identities,
            eval_identities=20,
            images_per_identity=8,
            pairs_per_fold=pairs_per_fold,
        )
    )
    return make_train_setup(root, data)
