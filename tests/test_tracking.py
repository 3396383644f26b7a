"""Runs mirrored in MLflow, read back from a real ``mlflow server`` (SQLite, artifacts on
the embedded S3 server) through ``MlflowClient``: params, per-epoch curves, artifacts, one
MLflow run per training run across resumes, and a server that dies in the middle of a run."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mlflow.exceptions import MlflowException

from jobs import export as export_job
from orchestrator import storage
from orchestrator.config import DataConfig, ExperimentConfig, TrackingConfig, redact_uri
from orchestrator.data.prepare import SyntheticDatasets
from orchestrator.runs import RUN_RECORD, run_dir
from orchestrator.tracking.client import Target, Tracker
from orchestrator.tracking.parents import close_parent, end_run, numeric_leaves, tag_run
from orchestrator.tracking.runs import SUMMARY_FILE, TrackedRun, close_run, config_params
from orchestrator.train.launch import distill
from tests.conftest import TrainSetup, mlflow_client
from tests.mlflow_server import MlflowServer, free_port
from tests.test_export import write_student


def tracked(
    setup: TrainSetup, tmp_path: Path, server: MlflowServer, **run: Any
) -> ExperimentConfig:
    base = setup.base
    return replace(
        base,
        storage_path=str(tmp_path / "runs"),
        run=replace(base.run, **run),
        tracking=TrackingConfig(uri=server.uri, experiment=f"test-{tmp_path.name}"),
    )


def summary_of(config: ExperimentConfig, name: str) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(run_dir(config, name), SUMMARY_FILE)))


def mlflow_run_id(config: ExperimentConfig, name: str) -> str:
    record = json.loads(storage.read_text(storage.join(run_dir(config, name), RUN_RECORD)))
    return str(record["mlflow"]["run_id"])


def curves(mlflow: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow.get_metric_history(run_id, key))


def expected_curve(summary: dict[str, Any], key: str) -> list[tuple[int, float]]:
    return sorted((int(e["step"]), e[key]) for e in summary["epochs"] if key in e)


def test_a_run_its_resume_and_their_curves_are_one_mlflow_run(
    train_setup: TrainSetup,
    tiny_synthetic: SyntheticDatasets,
    tmp_path: Path,
    mlflow_server: MlflowServer,
    ray_cluster: None,
) -> None:
    config = tracked(train_setup, tmp_path, mlflow_server, eval_every_epochs=1)
    config = replace(config, optim=replace(config.optim, epochs=1))
    distill(config, "r")
    first = mlflow_run_id(config, "r")
    longer = replace(config, optim=replace(config.optim, epochs=2))
    distill(longer, "r")  # extends the run: resumes after epoch 1
    run_id = mlflow_run_id(longer, "r")
    assert run_id == first

    mlflow = mlflow_client(mlflow_server)
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = mlflow.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one MLflow run for both attempts
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    # Params: the first attempt's config; the resume's changed setting is tagged.
    assert run.data.params == config_params(config)
    assert run.data.tags["param_changed.optim.epochs"] == "2"
    assert json.loads(run.data.tags["world_sizes"]) == [2, 2]
    assert json.loads(run.data.tags["resumed_at_epoch"]) == [1]
    assert run.data.tags["method"] == "proxyless"
    assert run.data.tags["classifier_checksum"].startswith("sha256:")

    summary = summary_of(longer, "r")
    assert [e["epoch"] for e in summary["epochs"]] == [0.0, 1.0]
    for key in ("loss", "lr", "samples_per_s", "input_wait_share", "val_auc"):
        assert curves(mlflow, run_id, key) == expected_curve(summary, key), key
        assert len(curves(mlflow, run_id, key)) == 2, key

    stored = storage.read_bytes(storage.join(run_dir(longer, "r"), SUMMARY_FILE))
    local = mlflow.download_artifacts(run_id, SUMMARY_FILE, str(tmp_path))
    assert Path(local).read_bytes() == stored

    # jobs.export --register: the exported files in the student's run, a model version.
    out = tmp_path / "export"
    student = storage.join(run_dir(longer, "r"), "student.pt")
    # The briefly trained student's embeddings are ~1e4 in size, beyond jobs.export's
    # absolute parity bound (a known limit of that check): a freshly made student of the
    # same data takes its place in the run.
    write_student(Path(student), tiny_synthetic)
    argv = ["--student", student, "--out", str(out), "--register", "face-r"]
    assert export_job.main([*argv, "--tracking-uri", mlflow_server.uri]) == 0
    [version] = mlflow.search_model_versions("name='face-r'")
    assert version.run_id == run_id and version.source == f"runs:/{run_id}/export"
    onnx = mlflow.download_artifacts(run_id, "export/student.onnx", str(tmp_path / "back"))
    assert Path(onnx).read_bytes() == (out / "student.onnx").read_bytes()


def test_a_server_that_dies_mid_run_costs_the_run_nothing_and_misses_no_epoch(
    train_setup: TrainSetup, tmp_path: Path, mlflow_server: MlflowServer, ray_cluster: None
) -> None:
    config = tracked(train_setup, tmp_path, mlflow_server)
    config = replace(
        config,
        optim=replace(config.optim, epochs=8),
        # About 3 s an epoch: the outage spans several epochs.
        data=replace(config.data, throttle_images_per_s=6.0),
        tracking=replace(config.tracking, timeout_s=1.0),
    )
    mlflow = mlflow_client(mlflow_server)
    outage: dict[str, float] = {}

    def kill_after_the_first_epoch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                run_id = mlflow_run_id(config, "outage")
                if mlflow.get_metric_history(run_id, "loss"):
                    break
            except (FileNotFoundError, KeyError, json.JSONDecodeError, MlflowException):
                pass  # not there yet, or the loaded server slow to answer: ask again
            time.sleep(0.2)
        mlflow_server.stop()
        outage["from"] = time.monotonic()
        time.sleep(4.0)
        mlflow_server.start()
        outage["to"] = time.monotonic()

    killer = threading.Thread(target=kill_after_the_first_epoch)
    killer.start()
    outcome = distill(config, "outage")
    killer.join(timeout=120)
    assert "to" in outage, "the server was never stopped"
    assert list(outcome.state.history.epochs_done) == list(range(8))

    run_id = mlflow_run_id(config, "outage")
    summary = summary_of(config, "outage")
    assert len(summary["epochs"]) == 8
    for key in ("loss", "lr", "samples_per_s"):
        # Every epoch once: those logged live, and those of the outage logged at the end.
        assert curves(mlflow, run_id, key) == expected_curve(summary, key), key
    assert mlflow.get_run(run_id).info.status == "FINISHED"


def test_a_storage_path_on_object_storage_without_a_uri_tracks_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.tracking.client import target_of

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = ExperimentConfig(storage_path="s3://bucket/runs", data=DataConfig())
    assert target_of(config) is None
    assert "tracking.uri and MLFLOW_TRACKING_URI are empty" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    from_env = target_of(config)
    assert from_env is not None and from_env.uri == "http://mlflow.internal:5000"
    given = replace(config, tracking=TrackingConfig(uri="https://other:443"))
    assert getattr(target_of(given), "uri", None) == "https://other:443"  # the config wins
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert target_of(replace(config, tracking=TrackingConfig(enabled=False))) is None
    local = replace(config, storage_path="/data/runs")
    target = target_of(local)
    assert target is not None and target.uri == "sqlite:////data/runs/mlflow.db"
    assert target.artifact_root == "file:///data/runs/mlartifacts"  # not ./mlruns
    assert Target("http://mlflow.internal:5000", "e").artifact_root is None
    assert target.experiment == config.name


def test_tracking_settings_are_checked_and_a_uri_s_secrets_never_shown() -> None:
    from orchestrator.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"tracking\.uri: expected an MLflow tracking URI") as err:
        from_dict(ExperimentConfig, {"tracking": {"uri": "ftp://alice:s3cret@host/x"}}, "c.yaml")
    assert "s3cret" not in str(err.value) and "alice:***@host" in str(err.value)
    with pytest.raises(ConfigError, match=r"tracking\.retries: must be in 1\.\.10"):
        from_dict(ExperimentConfig, {"tracking": {"retries": 0}}, "c.yaml")
    assert (
        redact_uri("https://alice:s3cret@mlflow.internal:5000/api?token=abc&x=1")
        == "https://alice:***@mlflow.internal:5000/api?token=***&x=1"
    )
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_a_failing_backend_is_tried_a_bounded_number_of_times_and_said_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = Target(f"http://bob:pa55word@127.0.0.1:{free_port()}", "x", timeout_s=0.2, retries=3)
    tracker = Tracker(target)
    tries: list[int] = []

    def failing(client: Any) -> str:
        tries.append(1)
        raise ConnectionError(f"cannot reach {target.uri}")

    seen: list[str | None] = []

    def failing_and_seeing(client: Any) -> str:
        seen.append(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT"))
        return failing(client)

    before = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")
    assert tracker.call("logging", failing_and_seeing) is None
    assert len(tries) == 3 and seen == ["0.2"] * 3  # bounded inside our calls...
    assert os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") == before  # ...and only there
    assert tracker.call("logging again", failing) is None  # resting: not tried at all
    assert len(tries) == 3 and tracker.failures == 2
    err = capsys.readouterr().err
    assert err.count("warning: tracking:") == 1  # one line, however many failures
    assert "pa55word" not in err and "bob:***@127.0.0.1" in err
    # A real client on a port where nothing listens: refused, never raised.
    fresh = Tracker(target)
    assert fresh.call("creating", lambda c: c.get_experiment_by_name("x")) is None
    err = capsys.readouterr().err
    assert "pa55word" not in err and "bob:***@127.0.0.1" in err
    run = TrackedRun(target, "0" * 32)
    close_run(
        run, name="r", curves=[{"epoch": 0.0, "step": 3.0, "loss": 1.0}], tags={}, artifacts={}
    )
    out = capsys.readouterr().out
    assert "epoch figures not logged to MLflow run" in out and "steps: all" in out
    assert "pa55word" not in out + capsys.readouterr().err


def test_numbers_of_a_summary_become_metric_names_mlflow_takes() -> None:
    data = {"acc": {"proxyless+l2": {"mean": 0.5, "n": 3, "significant": True, "why": "x"}}}
    assert numeric_leaves(data) == {"acc/proxyless_l2/mean": 0.5, "acc/proxyless_l2/n": 3.0}


def test_a_parent_closes_with_its_numbers_tags_and_leaves_ended_children_as_they_were(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    mlflow = mlflow_client(mlflow_server)
    experiment = mlflow.create_experiment(f"parents-{tmp_path.name}")
    parent, running, ended, stopped = (mlflow.create_run(experiment).info.run_id for _ in range(4))
    mlflow.set_terminated(ended, status="FINISHED", end_time=1_000)
    mlflow.set_terminated(stopped, status="FAILED", end_time=2_000)  # a stop seen as a failure
    run = TrackedRun(Target(mlflow_server.uri, f"parents-{tmp_path.name}"), parent)
    summary = tmp_path / "trials.json"
    summary.write_text("[1]")
    many = {f"t{i:03d}": str(i) for i in range(150)}  # more than one call holds
    close_parent(
        run,
        metrics={"best": 0.75, "none": float("nan")},
        artifacts={"summary/trials.json": str(summary)},
        tags=many,
    )
    tag_run(run, running, {"best_trial": "true"})
    end_run(run, running, "KILLED")
    end_run(run, ended, "KILLED")
    end_run(run, stopped, "KILLED", over=("RUNNING", "FAILED"))
    closed = mlflow.get_run(parent)
    assert closed.info.status == "FINISHED" and closed.data.metrics == {"best": 0.75}
    assert {k: v for k, v in closed.data.tags.items() if k in many} == many
    local = mlflow.download_artifacts(parent, "summary/trials.json", str(tmp_path / "dl"))
    assert Path(local).read_text() == "[1]"
    child = mlflow.get_run(running)
    assert child.info.status == "KILLED" and child.data.tags["best_trial"] == "true"
    finished = mlflow.get_run(ended).info  # an ended run keeps its status and end time
    assert (finished.status, finished.end_time) == ("FINISHED", 1_000)
    assert mlflow.get_run(stopped).info.status == "KILLED"
