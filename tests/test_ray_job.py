"""`ray job submit` against a real `ray start --head`, exactly as a user runs it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from orchestrator.config import to_dict
from orchestrator.evaluation import evaluate_model, load_eval_set
from orchestrator.formats.student import load_student
from tests.conftest import REPO, TrainSetup
from tests.test_hostile_inputs import corrupt_copy, train_setup_data

pytestmark = pytest.mark.e2e

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_env() -> dict[str, str]:
    """Like a cluster node: this environment's `python` (with the project installed) first
    on PATH, token auth off (a throwaway local cluster), no inherited RAY_ADDRESS."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    return env


@dataclass(frozen=True)
class Head:
    dashboard: str  # the job server, http://127.0.0.1:<port>
    gcs: str  # what RAY_ADDRESS names, 127.0.0.1:<port>


@pytest.fixture(scope="module")
def shared_head() -> Iterator[Head]:
    """One separate Ray head node on free ports for this module's jobs (each its own
    submission id and run name). The preflight test, which reports autoscaler limits into
    its GCS, runs last."""
    with running_head() as head:
        yield head


@pytest.fixture
def head_node(shared_head: Head) -> str:
    """The shared head's job-server address."""
    return shared_head.dashboard


@contextlib.contextmanager
def running_head() -> Iterator[Head]:
    env = cluster_env()
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: unix socket paths
    dashboard, gcs = free_port(), free_port()
    args = [
        RAY, "start", "--head", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1",
        f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--temp-dir={temp_dir}", "--include-dashboard=true",
    ]  # fmt: skip
    head = subprocess.Popen(
        args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the job server did not come up"
            time.sleep(1)
        yield Head(address, f"127.0.0.1:{gcs}")
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=15)
        # Ray daemons that left the process group still name this head's private temp dir.
        subprocess.run(["pkill", "-9", "-f", temp_dir], check=False)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_submitted_job_with_a_corrupt_image_fails_with_one_error_line(
    head_node: str, train_setup: TrainSetup, tmp_path: Path
) -> None:
    """`ray job submit` of jobs.distill (configs/demo.yaml and --set, as a user runs it) on
    a training set with a corrupt JPEG: one error line in the job's log, and none of the
    tracebacks Ray's workers would echo (the setup hook the driver puts in the job's
    runtime_env drops them on the cluster's workers too). A submitted job that succeeds is
    the resubmission below."""
    base = to_dict(train_setup.base)
    broken = corrupt_copy(train_setup_data(train_setup), tmp_path / "corrupt")
    overrides = {
        "name": "corrupt",
        "storage_path": str(tmp_path / "runs"),
        "data.train": broken,
        "data.eval": base["data"]["eval"],
        "student.arch": "tiny_mobilefacenet",
        "student.emb_dim": 16,
        "teacher.emb_dim": 16,
        "teacher.classifier": base["teacher"]["classifier"],
        "teacher.backbone": base["teacher"]["backbone"],
        "optim.epochs": 1,
        "optim.batch_size": 8,
        "run.eval_every_epochs": 0,
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    subprocess.run(
        [RAY, "job", "submit", "--address", head_node, "--submission-id", "corrupt-test", "--working-dir", ".",
         "--", "python", "-m", "jobs.distill", "--config", "configs/demo.yaml", *sets],
        cwd=REPO, env=cluster_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert JobSubmissionClient(head_node).get_job_status("corrupt-test") == JobStatus.FAILED
    logs = JobSubmissionClient(head_node).get_job_logs("corrupt-test")
    errors = [line for line in logs.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cannot decode JPEG (300 bytes)" in errors[0], logs[-3000:]
    assert "Traceback" not in logs and "Error in training function" not in logs, logs[-3000:]


def test_a_job_whose_driver_died_resumes_its_run_when_submitted_again(
    tmp_path: Path, shared_head: Head
) -> None:
    """The driver of a `ray job submit` run is killed (SIGKILL, as a lost head process or an
    OOM kill does) after a checkpoint inside its first epoch; the job fails. The same
    command submitted again (`ray job submit`, as a user runs it) resumes that run by its
    name, inside the epoch, and the audit holds every image of every epoch exactly once.
    The job reports the validation numbers of the student it exported and is tracked in
    an SQLite database beside the runs, no server needed."""
    from orchestrator.config import (
        DecodeAt,
        OptimConfig,
        RunConfig,
        ScalingConfig,
        TrackingConfig,
        dump_yaml,
    )
    from tests.conftest import dataset_image_ids, kill_test_setup, registered_inside

    setup = kill_test_setup(tmp_path)
    config = replace(
        setup.base,
        name="resubmitted",
        data=replace(setup.base.data, decode=DecodeAt.WORKER, decode_cpus=0.25,
                     throttle_images_per_s=60.0),
        optim=OptimConfig(lr=0.05, epochs=2, batch_size=8),  # 24 steps an epoch
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=0.5),
        run=RunConfig(eval_every_epochs=0, shuffle_buffer=0, checkpoint_every_steps=4,
                      keep_checkpoints=0, audit_ids=True),
        tracking=TrackingConfig(),  # the default: SQLite beside the runs
    )  # fmt: skip
    path = tmp_path / "resubmitted.yaml"
    path.write_text(dump_yaml(config))
    run_dir = Path(config.storage_path) / "resubmitted"
    command = ["python", "-m", "jobs.distill", "--config", str(path)]

    env = cluster_env()
    head = shared_head
    # The module's head, shared with the other jobs
    client = JobSubmissionClient(head.dashboard)
    client.submit_job(entrypoint=" ".join(command), submission_id="first",
                      runtime_env={"working_dir": str(REPO)})  # fmt: skip
    deadline = time.monotonic() + 300
    while not [step for epoch, step in registered_inside(run_dir) if epoch == 0]:
        status = client.get_job_status("first")
        assert not status.is_terminal(), client.get_job_logs("first")[-3000:]
        assert time.monotonic() < deadline, "no checkpoint inside the epoch registered"
        time.sleep(0.05)
    driver = client.get_job_info("first").driver_info
    assert driver is not None
    os.kill(int(driver.pid), signal.SIGKILL)
    while not client.get_job_status("first").is_terminal():
        assert time.monotonic() < deadline, "the job outlived its driver"
        time.sleep(0.5)
    assert client.get_job_status("first") == JobStatus.FAILED
    assert not (run_dir / "student.pt").exists()
    again = subprocess.run(
        [RAY, "job", "submit", "--address", head.dashboard, "--submission-id", "second",
         "--working-dir", ".", "--", *command],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert client.get_job_status("second") == JobStatus.SUCCEEDED, (
        again.stdout[-3000:] + again.stderr[-3000:]
    )
    logs = client.get_job_logs("second")
    summary = json.loads(
        [line for line in logs.splitlines() if line.startswith('{"name": "resubmitted"')][-1]
    )
    assert summary["epochs_done"] == [0, 1] and summary["resumed_at"] == [0], summary
    # The validation numbers the job reported are those of the student it exported.
    student, _ = load_student(str(run_dir / "student.pt"))
    again_measured = evaluate_model(student, load_eval_set(config.data.eval))
    assert summary["val_acc_10fold"] == pytest.approx(
        round(again_measured["acc_10fold"], 4), abs=1e-9
    )
    assert summary["val_auc"] == pytest.approx(round(again_measured["auc"], 4), abs=1e-9)
    # The resubmitted driver continued the killed driver's MLflow run: one run, each epoch
    # logged once.
    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=f"sqlite:///{config.storage_path}/mlflow.db")
    experiment = mlflow.get_experiment_by_name("resubmitted")
    assert experiment is not None
    [run] = mlflow.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and json.loads(run.data.tags["resumed_at_epoch"]) == [0]
    assert run.info.run_name == "resubmitted"
    # Its artifacts beside the database, not in the job's working directory.
    stored = Path(config.storage_path) / "mlartifacts" / run.info.run_id / "artifacts"
    assert run.info.artifact_uri == f"file://{stored}"
    assert (stored / "summary.json").read_bytes() == (run_dir / "summary.json").read_bytes()
    # The first job opened the MLflow run and said so; the second continued it.
    assert f"[tracking] resubmitted: MLflow run {run.info.run_id}" in client.get_job_logs("first")
    assert f"[tracking] resubmitted: continuing MLflow run {run.info.run_id}" in logs
    loss = [(m.step, m.value) for m in mlflow.get_metric_history(run.info.run_id, "loss")]
    assert loss == [(int(e["step"]), e["loss"]) for e in summary["epochs"]] and len(loss) == 2
    all_ids = dataset_image_ids(config.data.train)
    for epoch in (0, 1):
        trained = [
            i
            for part in sorted((run_dir / "audit").glob(f"epoch-{epoch:04d}-rank-*.txt"))
            for i in part.read_text().split()
        ]
        print(f"epoch {epoch}: {len(trained) - len(set(trained))} trained twice, "
              f"{len(set(all_ids) - set(trained))} never")  # fmt: skip
        assert sorted(trained) == all_ids, f"epoch {epoch}"
    assert (run_dir / "student.pt").exists()


# The record a cloud autoscaler reports to the GCS (ReportClusterConfig): a 2-CPU head and
# at most two 4-CPU, 1-GPU workers. No autoscaler can launch nodes here, so this test
# reports the record itself, into a real head's GCS, through Ray's own GCS client.
REPORT_LIMITS = """
import ray
from ray.core.generated import autoscaler_pb2
ray.init()
config = autoscaler_pb2.ClusterConfig()
head = config.node_group_configs.add(name="head", max_count=1)
head.resources["CPU"] = 2
gpu = config.node_group_configs.add(name="gpu", max_count=2)
gpu.resources["CPU"] = 4
gpu.resources["GPU"] = 1
ray._private.worker.global_worker.gcs_client.report_cluster_config(config.SerializeToString())
print(ray._private.state.state.get_max_resources_from_cluster_config())
"""


def test_preflight_reads_the_autoscalers_limits_and_waits_bounded(
    train_setup: TrainSetup, tmp_path: Path, shared_head: Head
) -> None:
    """On a cluster reached by RAY_ADDRESS: a run above the autoscaler's limits is refused
    at once; one within them but above what is up now waits scaling.resources_wait_s, with
    a line saying so, then is refused; neither leaves a run behind."""
    base = to_dict(train_setup.base)
    storage = tmp_path / "runs"
    head = shared_head
    # The shared head (this test runs last: the limits stay in its GCS)
    env = {**cluster_env(), "RAY_ADDRESS": head.gcs}
    reported = subprocess.run(
        [sys.executable, "-c", REPORT_LIMITS], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert reported.returncode == 0, reported.stderr[-2000:]
    assert "'GPU': 2" in reported.stdout and "'CPU': 10" in reported.stdout, reported.stdout

    def distill(name: str, workers: int, wait_s: float) -> subprocess.CompletedProcess[str]:
        overrides = {
            "name": name,
            "storage_path": str(storage),
            "data.train": base["data"]["train"],
            "data.eval": base["data"]["eval"],
            "teacher.classifier": base["teacher"]["classifier"],
            "teacher.backbone": base["teacher"]["backbone"],
            "student.emb_dim": 16,
            "teacher.emb_dim": 16,
            "optim.batch_size": 12,
            "teacher_optim.batch_size": 12,
            "scaling.num_workers": workers,
            "scaling.use_gpu": "true",
            "scaling.resources_wait_s": wait_s,
        }
        sets = [arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}")]
        return subprocess.run(
            [sys.executable, "-m", "jobs.distill", "--config", "configs/demo.yaml", *sets],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    # 3 GPU workers: above the limits (2 GPUs at most); refused without the 600 s wait.
    never = distill("above-limits", 3, 600)
    assert never.returncode == 2, never.stderr[-2000:]
    assert "the autoscaler's limits allow 2 GPU(s): it can never be scheduled" in never.stderr
    assert "waiting" not in never.stdout
    # 2 GPU workers: within the limits, none up: a bounded wait, then a clear refusal.
    later = distill("within-limits", 2, 3)
    assert later.returncode == 2, later.stderr[-2000:]
    assert "[ray] waiting up to 3s for the cluster to grow" in later.stdout, later.stdout
    assert "not there after waiting 3s (scaling.resources_wait_s)" in later.stderr
    assert not (storage / "above-limits").exists() and not (storage / "within-limits").exists()
