"""Ray Tune search through the real CLI: a tiny grid (4 trials, 2 at a time, ASHA),
interrupted with Ctrl-C after the first trial finished, then resumed with --resume."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from jobs import distill as distill_job
from jobs import tune as tune_job
from orchestrator.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    FloatSearch,
    MarginType,
    OptimConfig,
    ScalingConfig,
    SearchAlgorithm,
    SearchSpace,
    TrackingConfig,
    TuneConfig,
    dump_yaml,
    from_dict,
    load_config,
)
from orchestrator.config.data import DecodeAt
from orchestrator.evaluation import evaluate_model, load_eval_set
from orchestrator.formats.student import load_student
from orchestrator.metric_names import Metric
from orchestrator.tune import trial_resources
from orchestrator.tune_space import param_space
from tests.conftest import (
    TrainSetup,
    interrupt_when,
    mlflow_client,
    parent_statuses,
    run_job_here,
)
from tests.mlflow_server import MlflowServer

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def search_config(setup: TrainSetup, root: Path, tracking_uri: str = "") -> Path:
    base = setup.base
    config = replace(
        base,
        name="search",
        tracking=TrackingConfig(enabled=bool(tracking_uri), uri=tracking_uri, experiment="tune"),
        storage_path=str(root / "runs"),
        data=replace(base.data, decode=DecodeAt.POOL, decode_actors=1, decode_cpus=0.25),
        scaling=ScalingConfig(num_workers=1, cpus_per_worker=0.25),
        optim=OptimConfig(lr=0.05, epochs=2, batch_size=8),
        teacher_optim=OptimConfig(lr=0.05, epochs=1, batch_size=8),
        tune=TuneConfig(
            search=SearchAlgorithm.GRID,
            metric=Metric.AUC,  # finer than 10-fold accuracy on 40 pairs: fewer ties for ASHA
            space=SearchSpace(
                margin_type=(MarginType.ARCFACE, MarginType.COSFACE),
                # Runs are reproducible, so each trial's validation AUC is too: at epoch 1
                # seed 1 scores 0.5625 (arcface) and 0.6575 (cosface), seed 2 0.3475 and
                # 0.43. Seed 2's trials start when a seed 1 trial has finished, and ASHA
                # (reduction factor 2) stops each below the median at that milestone.
                seed=(1, 2),
                scale=FloatSearch(values=(16.0,)),
            ),
            num_samples=1,
            grace_period=1,
            reduction_factor=2.0,
        ),
    )
    path = root / "search.yaml"
    path.write_text(dump_yaml(config))
    return path


def tune_cli(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.tune", "--config", str(config), *extra]


def students(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (root / "runs").glob("search-*_*/student.pt")}


@pytest.fixture(scope="module")
def search(
    train_setup: TrainSetup,
    tmp_path_factory: pytest.TempPathFactory,
    ray_cluster: None,
    mlflow_server: MlflowServer,
) -> dict:
    """The search through the real CLI, interrupted with Ctrl-C after its first trial (a
    process of its own), then resumed with the CLI called here, on the session's cluster;
    tracked on the session's MLflow server."""
    root = tmp_path_factory.mktemp("tune")
    config = search_config(train_setup, root, mlflow_server.uri)
    first_output = interrupt_when(tune_cli(config), lambda: students(root), "trial")
    finished_before = students(root)
    summary = root / "runs" / "tune" / "search" / "summary"
    interrupted = {
        "summarized": summary.exists(),
        "parents": parent_statuses(mlflow_server, "tune", "search"),
    }
    resumed = run_job_here(tune_job.main, ["--config", str(config), "--resume"])
    return {
        "root": root,
        "config": config,
        "finished_before": finished_before,
        "first_output": first_output,
        "interrupted": interrupted,
        "output": resumed,
        "summary": summary,
        "trials": json.loads((summary / "trials.json").read_text()),
    }


def test_an_interrupted_search_summarizes_nothing_and_says_how_to_resume(search: dict) -> None:
    # Tune returns from Ctrl-C as if done, its running trial read as ended: a summary then
    # would call that trial stopped and crown the one finished trial (seen: two runs tagged
    # best after the resume).
    assert search["interrupted"] == {"summarized": False, "parents": ["KILLED"]}
    first = search["first_output"]
    assert "interrupted: the search at " in first and "with --resume continues it" in first
    assert "best config:" not in first and "Traceback" not in first


def test_search_table_best_yaml_and_plot(search: dict, train_setup: TrainSetup) -> None:
    trials = search["trials"]
    assert len(trials) == 4  # 2 margin types x 2 seeds
    statuses = [t["status"] for t in trials]
    assert "stopped early" in statuses, statuses  # by ASHA, at epoch 1 or 2
    assert statuses.count("completed") >= 1 and "error" not in statuses
    for t in trials:
        # ASHA's milestones are epochs 1 and 2: a stopped trial ends at one of them.
        assert (t["epochs"] == 2) if t["status"] == "completed" else (t["epochs"] in (1, 2))
        assert {"loss.margin.type", "seed", "loss.margin.scale"} <= set(t["params"])
    # A completed trial's metric is the validation AUC of the student it exported.
    eval_set = load_eval_set(train_setup.base.data.eval)
    for t in trials:
        if t["status"] == "completed":
            student, _ = load_student(t["student"])
            assert t["metric"] == pytest.approx(evaluate_model(student, eval_set)["auc"], abs=1e-9)
    combos = {(t["params"]["loss.margin.type"], t["params"]["seed"]) for t in trials}
    assert combos == {(m, s) for m in ("arcface", "cosface") for s in (1, 2)}
    best = max((t for t in trials if t["status"] == "completed"), key=lambda t: t["metric"])
    table = (search["summary"] / "trials.md").read_text()
    assert f"{best['trial_id']} (best)" in table
    assert (search["summary"] / "trials.csv").read_text().count("\n") == 5
    png = (search["summary"] / "metric_vs_margin_scale.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # The best config is the base config with the best trial's values, loadable as is...
    best_yaml = search["summary"] / "best.yaml"
    loaded = load_config(best_yaml)
    assert loaded.loss.margin.type.value == best["params"]["loss.margin.type"]
    assert loaded.seed == best["params"]["seed"] and loaded.name == "search-best"
    assert best["student"] and Path(best["student"]).exists()
    assert str(best_yaml) in search["output"] and best["student"] in search["output"]
    # ... and jobs.distill trains from it unchanged.
    assert distill_job.main(["--config", str(best_yaml)]) == 0
    assert (Path(loaded.storage_path) / "search-best" / "student.pt").exists()


def test_the_search_is_one_parent_run_with_a_run_per_trial(
    search: dict, mlflow_server: MlflowServer
) -> None:
    mlflow = mlflow_client(mlflow_server)
    experiment = mlflow.get_experiment_by_name("tune").experiment_id
    parents = mlflow.search_runs([experiment], "tags.kind = 'search'")
    assert len(parents) == 1  # interrupted and resumed: still one
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = mlflow.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trials = search["trials"]
    # One child per trial, the interrupted one included once: every trial trained.
    names = sorted(c.info.run_name for c in children)
    assert names == sorted(f"search-{t['trial_id']}" for t in trials)
    best = max((t for t in trials if t["status"] == "completed"), key=lambda t: t["metric"])
    assert parent.data.tags["best_trial"] == best["trial_id"]
    tagged = [c.info.run_name for c in children if c.data.tags.get("best_trial") == "true"]
    status = {t["trial_id"]: t["status"] for t in trials}
    # ASHA's stopped trials never return to close their runs, or see the stop as a failure.
    for child in children:
        trial = child.info.run_name.removeprefix("search-")
        assert child.info.status == ("FINISHED" if status[trial] == "completed" else "KILLED")
    assert tagged == [f"search-{best['trial_id']}"]
    assert parent.data.metrics["best_val_auc"] == pytest.approx(best["metric"], abs=1e-12)
    local = mlflow.download_artifacts(
        parent.info.run_id, "summary/trials.json", str(search["root"])
    )
    assert Path(local).read_bytes() == (search["summary"] / "trials.json").read_bytes()


def checkpoint_times(run_dir: Path) -> list[datetime]:
    stamps = [p.name.removeprefix("checkpoint_") for p in run_dir.glob("checkpoint_2*")]
    return sorted(datetime.strptime(s, "%Y-%m-%d_%H-%M-%S.%f") for s in stamps)


def test_two_trials_ran_at_the_same_time(search: dict) -> None:
    assert "2 trial(s) at a time" in search["first_output"]
    spans = []
    for run_dir in (search["root"] / "runs").glob("search-*_*"):
        times = checkpoint_times(run_dir)
        if times and (run_dir / "run.json").exists():
            # From the trial's claim of its run (before training) to its last checkpoint.
            started = datetime.fromtimestamp((run_dir / "run.json").stat().st_mtime)
            spans.append((started, times[-1]))
    overlapping = [
        (a, b) for a in spans for b in spans if a < b and b[0] <= a[1]
    ]  # b started before a's last checkpoint
    assert overlapping, spans


def test_resume_does_not_rerun_finished_trials(search: dict) -> None:
    after = students(search["root"])
    for path, mtime in search["finished_before"].items():
        assert after[path] == mtime, f"{path} was trained again after --resume"
    assert len(after) == sum(t["status"] == "completed" for t in search["trials"])


@pytest.mark.unit  # pure: no subprocess, no Ray (module mark notwithstanding)
def test_search_space_and_resources() -> None:
    from ray import tune

    space = param_space(
        TuneConfig(
            space=SearchSpace(
                margin=FloatSearch(range=(0.2, 0.5)), lr=FloatSearch(values=(0.1, 0.01))
            )
        )
    )
    assert isinstance(space["loss.margin.m"], tune.search.sample.Float)
    assert space["optim.lr"].categories == [0.1, 0.01]
    base = load_config(None, ["scaling.num_workers=2", "scaling.cpus_per_worker=1.0"])
    base = replace(base, data=DataConfig(decode_actors=2, decode_cpus=0.5))
    # 2 workers x 1 CPU + 2 decode actors x 0.5 + one 0.5 read slot + 0.01 (the trial's
    # driver) = 3.51 CPUs a trial.
    plan = trial_resources(base, 16.0, 0.0)
    assert (plan.cpus, plan.concurrent) == (3.51, 4)
    gpu = replace(base, scaling=replace(base.scaling, use_gpu=True))
    assert trial_resources(gpu, 64.0, 4.0).concurrent == 2  # GPUs bind first
    with pytest.raises(ConfigError, match=r"tune\.margn_values: unknown key"):
        load_config(None, ["tune.margn_values=[0.3]"])
    with pytest.raises(ConfigError, match="grid search needs lists"):
        load_config(None, ["tune.search=grid", "tune.lr_range=[0.01,0.1]"])
    # The tune section serialises and loads back to the same config.
    assert from_dict(ExperimentConfig, yaml.safe_load(dump_yaml(base))) == base


def test_a_trial_larger_than_the_local_cluster_is_refused_at_once(
    train_setup: TrainSetup,
    tmp_path: Path,
    ray_cluster: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Measured before the check: such a trial started its workers and then waited 30
    minutes for decode actors that could never be scheduled. (The CLI called here, on the
    session's 2-CPU cluster: the search above is this job's subprocess test.)"""
    import os

    from orchestrator import cli

    config = search_config(train_setup, tmp_path)
    too_big = str((os.cpu_count() or 1) + 1)
    argv = ["--config", str(config), "--set", f"scaling.cpus_per_worker={too_big}"]
    assert cli.run(tune_job.main, argv) == 2
    err = capsys.readouterr().err
    assert "one trial of the search needs" in err, err[-2000:]
    assert "lower scaling.cpus_per_worker" in err
    assert not (tmp_path / "runs" / "tune").exists()  # nothing started, nothing to resume


@pytest.mark.unit  # pure: no subprocess, no Ray (module mark notwithstanding)
def test_trial_fit_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.errors import UsageError
    from orchestrator.tune import TrialResources, check_trial_fits

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    check_trial_fits(TrialResources(cpus=2.0, gpus=0.0, concurrent=1), (2.0, 0.0), "trial")
    with pytest.raises(UsageError, match=r"one trial needs 2\.51 CPUs .* has 2"):
        check_trial_fits(TrialResources(cpus=2.51, gpus=0.0, concurrent=1), (2.0, 0.0), "trial")
    with pytest.raises(UsageError, match=r"needs 4 GPUs .* has 1"):
        check_trial_fits(TrialResources(cpus=1.0, gpus=4.0, concurrent=1), (8.0, 1.0), "trial")
    # On a cluster of the user's own the autoscaler may still add nodes: no refusal.
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    check_trial_fits(TrialResources(cpus=64.0, gpus=8.0, concurrent=1), (2.0, 0.0), "trial")


@pytest.mark.unit  # pure: no subprocess, no Ray (module mark notwithstanding)
def test_a_trial_is_complete_with_its_last_epoch_reported_and_its_student(tmp_path: Path) -> None:
    """Tune's record of a trial (a real ``ray.tune.Result``) and the run's export decide its
    status. Tune stops a trial some time after ASHA decides: a run of short epochs can
    finish and export meanwhile; Tune then holds only the early epoch's report, and the
    trial counts as stopped (seen in the search above: stopped after epoch 1 of 2, the
    student written 5 s later)."""
    from ray.tune import Result

    from orchestrator.runs import student_uri
    from orchestrator.tune_summary import trial_row

    fields = {"name": "s", "storage_path": str(tmp_path), "optim": {"epochs": 2}}
    config = from_dict(ExperimentConfig, fields, "test")

    def row(trial: str, last_epoch: int, exported: bool, error: Exception | None = None) -> tuple:
        if exported:
            student = Path(student_uri(config, f"s-{trial}"))
            student.parent.mkdir(parents=True)
            student.write_bytes(b"a student")
        metrics = {"trial_id": trial, "epoch": last_epoch, "val_acc_10fold": 0.5 + last_epoch}
        result = Result(metrics=metrics, checkpoint=None, error=error, path=str(tmp_path / trial))
        got = trial_row(result, config)
        return got.status, got.epochs, got.metric, got.student

    done = student_uri(config, "s-t1")
    assert row("t1", 1, exported=True) == ("completed", 2, 1.5, done)
    assert row("t2", 0, exported=True) == ("stopped early", 1, 0.5, None)  # the race
    assert row("t3", 1, exported=False) == ("stopped early", 2, 1.5, None)  # stopped at the end
    assert row("t4", 0, exported=False) == ("stopped early", 1, 0.5, None)
    assert row("t5", 1, exported=True, error=RuntimeError("boom"))[0] == "error"
