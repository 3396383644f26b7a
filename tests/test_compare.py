"""jobs.compare: the statistics against scipy/numpy, the report's words, and the real CLI
on tiny data (proxyless x 2 seeds, 1 epoch), interrupted with Ctrl-C after the first run
finished and resumed with --resume, then grown to proxyless and cckd x 3 seeds."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from jobs import compare as compare_job
from orchestrator.compare.cells import CROSS_MODEL, IMAGES_PER_S, Cell
from orchestrator.compare.report import markdown
from orchestrator.compare.statistics import paired_interval, spread, summary_data
from orchestrator.config import (
    CompareConfig,
    ConfigError,
    DataConfig,
    Method,
    OptimConfig,
    ScalingConfig,
    TrackingConfig,
    dump_yaml,
    load_config,
)
from tests.conftest import (
    TrainSetup,
    interrupt_when,
    mlflow_client,
    parent_statuses,
    run_job_here,
)
from tests.mlflow_server import MlflowServer


def test_paired_interval_is_scipys_paired_t_interval() -> None:
    rng = np.random.default_rng(0)
    a = {k: float(v) for k, v in enumerate(rng.normal(0.8, 0.02, size=5))}
    b = {k: float(v) for k, v in enumerate(rng.normal(0.78, 0.02, size=5))}
    b.pop(3)  # seed 3 did not complete for b: the pairs are the other four
    seeds = sorted(b)
    reference = stats.ttest_rel([a[k] for k in seeds], [b[k] for k in seeds])
    low, high = reference.confidence_interval(confidence_level=0.9)
    got = paired_interval(a, b, 0.9)
    assert got.n == 4
    assert got.mean == pytest.approx(np.mean([a[k] - b[k] for k in seeds]), rel=1e-12)
    assert (got.low, got.high) == (pytest.approx(low, rel=1e-10), pytest.approx(high, rel=1e-10))
    assert got.significant == (reference.pvalue < 0.1)
    one = paired_interval({0: 1.0}, {0: 0.5}, 0.95)
    assert one.n == 1 and np.isnan(one.low) and not one.significant


def test_spread_is_the_sample_standard_deviation() -> None:
    values = [0.91, 0.87, 0.95]
    s = spread(values)
    assert (s.mean, s.std, s.n) == (
        pytest.approx(np.mean(values)),
        pytest.approx(np.std(values, ddof=1)),
        3,
    )


def cells_for(values: dict[str, list[float]]) -> list[Cell]:
    return [
        Cell(method, seed, f"x-{method}-seed{seed}", "completed", "u", {"acc_10fold": v})
        for method, per_seed in values.items()
        for seed, v in enumerate(per_seed)
    ]


def test_report_says_which_differences_are_significant() -> None:
    config = load_config(
        None,
        [
            "name=x",
            "compare.methods=[proxyless,l2,scratch]",
            "compare.seeds=[0,1,2]",
            "compare.metrics=[acc_10fold]",
        ],
    )
    cells = cells_for(
        {
            "proxyless": [0.90, 0.91, 0.92],
            "l2": [0.80, 0.805, 0.81],  # 0.1 lower at every seed: significant
            "scratch": [0.95, 0.86, 0.92],  # noisy around proxyless: not significant
        }
    )
    data = summary_data(config, cells, ["acc_10fold"])
    l2 = data["tables"]["acc_10fold"]["l2"]["vs_baseline"]
    scratch = data["tables"]["acc_10fold"]["scratch"]["vs_baseline"]
    assert l2["significant"] and l2["high"] < 0
    assert not scratch["significant"] and scratch["low"] < 0 < scratch["high"]
    text = markdown(config, data)
    assert "teacher (reference)" not in text  # no teacher measured, no row
    data["teacher"] = {"acc_10fold": 0.93}
    text = markdown(config, data)
    assert "| teacher (reference) | 0.9300 | 1 | - | - | - |" in text
    assert "l2 is lower than proxyless on acc_10fold at the 95% level" in text
    assert "scratch and proxyless are not distinguishable on acc_10fold" in text


def test_compare_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"compare\.baseline: proxyless is not among"):
        load_config(None, ["compare.methods=[l2,scratch]"])
    with pytest.raises(ConfigError, match=r"compare\.seeds: a seed is named twice"):
        load_config(None, ["compare.seeds=[1,1]"])
    with pytest.raises(ConfigError, match=r"compare\.metrics: expected names from"):
        load_config(None, ["compare.metrics=[accuracy]"])
    assert CompareConfig().methods == tuple(Method)


# --- the real CLI ---------------------------------------------------------------------


def compare_cli(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.compare", "--config", str(config), *extra]


SEEDS = (3, 4, 5)


def students(root: Path) -> set[str]:
    return {str(p) for p in (root / "runs").glob("cmp-*-seed*/student.pt")}


@pytest.fixture(scope="module")
def comparison(
    train_setup: TrainSetup,
    tmp_path_factory: pytest.TempPathFactory,
    ray_cluster: None,
    mlflow_server: MlflowServer,
) -> dict:
    """1 method x 2 seeds, interrupted with Ctrl-C after its first run (the real CLI, a
    process of its own) and resumed (the CLI called here, on the session's cluster);
    tracked on the session's MLflow server."""
    root = tmp_path_factory.mktemp("compare")
    base = train_setup.base
    config = replace(
        base,
        name="cmp",
        storage_path=str(root / "runs"),
        data=replace(base.data, decode_actors=1, decode_cpus=0.25),
        scaling=ScalingConfig(num_workers=1, cpus_per_worker=0.25),
        optim=OptimConfig(lr=0.05, epochs=1, batch_size=8),
        compare=CompareConfig(methods=(Method.PROXYLESS,), seeds=(3, 4)),
        tracking=TrackingConfig(uri=mlflow_server.uri, experiment="compare"),
    )
    path = root / "compare.yaml"
    path.write_text(dump_yaml(config))
    first_output = interrupt_when(compare_cli(path), lambda: students(root), "run")
    interrupted = {
        "summarized": (root / "runs" / "compare" / "cmp" / "summary").exists(),
        "parents": parent_statuses(mlflow_server, "compare", "comparison"),
        "output": first_output,
    }
    resumed = run_job_here(compare_job.main, ["--config", str(path), "--resume"])
    finished = students(root)
    return {
        "root": root,
        "path": path,
        "interrupted": interrupted,
        "output": resumed,
        "mtimes": {p: Path(p).stat().st_mtime_ns for p in finished},
    }


@pytest.fixture(scope="module")
def grown(comparison: dict) -> dict:
    """The finished comparison grown to 2 methods x 3 seeds: a method and a seed more."""
    done = run_job_here(
        compare_job.main,
        [
            "--config", str(comparison["path"]),
            "--set", "compare.methods=[proxyless,cckd]",
            "--set", "compare.seeds=[3,4,5]",
        ],
    )  # fmt: skip
    summary = comparison["root"] / "runs" / "compare" / "cmp" / "summary"
    return {
        "output": done,
        "summary": summary,
        "students": students(comparison["root"]),
        "data": json.loads((summary / "comparison.json").read_text()),
        "cells": list(csv.DictReader((summary / "cells.csv").open())),
        "report": (summary / "report.md").read_text(),
        "png": (summary / "comparison.png").read_bytes(),
    }


@pytest.mark.slow
@pytest.mark.e2e
def test_an_interrupted_comparison_summarizes_nothing_and_says_how_to_resume(
    comparison: dict,
) -> None:
    # Tune returns from Ctrl-C as if done: a summary then would list the running cell as
    # missing and close the parent run as finished. (Both cells may train at once and end
    # together: the signal can also land after the fit, in the evaluation.)
    interrupted = comparison["interrupted"]
    assert interrupted["summarized"] is False and interrupted["parents"] == ["KILLED"]
    output = interrupted["output"]
    assert "\ninterrupted: " in output and "Traceback" not in output


@pytest.mark.slow
@pytest.mark.e2e
def test_compare_resume_keeps_the_runs_that_finished(comparison: dict) -> None:
    root = comparison["root"] / "runs"
    assert set(comparison["mtimes"]) == {
        str(root / f"cmp-proxyless-seed{s}" / "student.pt") for s in (3, 4)
    }
    assert "2/2 runs completed" in comparison["output"]
    for path, mtime in comparison["mtimes"].items():
        assert Path(path).stat().st_mtime_ns == mtime, f"{path} was trained again"


@pytest.mark.slow
@pytest.mark.e2e
def test_a_finished_comparison_grows_by_training_only_its_new_cells(
    comparison: dict, grown: dict
) -> None:
    """1 method x 2 seeds grown to 2 methods x 3 seeds: the two finished runs are reused
    (same training settings: the compare section is not part of a run's fingerprint),
    four train, and the report has n = 3 for each method. Then other metrics only:
    nothing trains."""
    output = grown["output"]
    assert "2 run(s) finished already with these settings (reused), 4 to train" in output
    for student, mtime in comparison["mtimes"].items():
        assert Path(student).stat().st_mtime_ns == mtime, f"{student} was trained again"
    assert len(grown["students"]) == 6
    assert grown["data"]["tables"]["acc_10fold"]["proxyless"]["n"] == 3
    assert grown["data"]["tables"]["acc_10fold"]["cckd"]["vs_baseline"]["n"] == 3
    # Our per-trial lines, not Tune's status tables.
    assert output.count("[comparison] trial ") >= 4 * 3  # started, an epoch, finished
    assert "Trial status" not in output and "╭" not in output
    again = run_job_here(
        compare_job.main,
        [
            "--config", str(comparison["path"]),
            "--set", "compare.methods=[proxyless,cckd]",
            "--set", "compare.seeds=[3,4,5]",
            "--set", "compare.metrics=[auc,rank1]",
        ],
    )  # fmt: skip
    assert "6 run(s) finished already with these settings (reused), 0 to train" in again
    data = json.loads((grown["summary"] / "comparison.json").read_text())
    assert "auc" in data["tables"] and "acc_10fold" not in data["tables"]


@pytest.mark.slow
@pytest.mark.e2e
def test_compare_cli_tables_intervals_and_plot(grown: dict) -> None:
    data = grown["data"]
    assert {(c["method"], c["seed"]) for c in data["cells"]} == {
        (m, s) for m in ("proxyless", "cckd") for s in SEEDS
    }
    assert all(c["status"] == "completed" for c in data["cells"])
    rows = grown["cells"]
    per = {(r["method"], int(r["seed"])): r for r in rows}
    widths: list[float] = []
    for column in ("acc_10fold", "auc", CROSS_MODEL, IMAGES_PER_S):
        table = data["tables"][column]
        for method in ("proxyless", "cckd"):
            values = [float(per[(method, s)][column]) for s in SEEDS]
            assert table[method]["mean"] == pytest.approx(np.mean(values), rel=1e-9)
            assert table[method]["std"] == pytest.approx(
                np.std(values, ddof=1), rel=1e-9, abs=1e-12
            )
        diffs = [
            float(per[("cckd", s)][column]) - float(per[("proxyless", s)][column]) for s in SEEDS
        ]
        vs = table["cckd"]["vs_baseline"]
        assert vs["n"] == len(SEEDS) and vs["mean"] == pytest.approx(
            np.mean(diffs), rel=1e-9, abs=1e-12
        )
        # Hand-derived: mean +- t_{0.975, n-1} * sd / sqrt(n), a zero-width interval when the
        # differences are equal (no branch that could skip the check).
        half = stats.t.ppf(0.975, df=len(SEEDS) - 1) * np.std(diffs, ddof=1) / np.sqrt(len(SEEDS))
        assert (vs["low"], vs["high"]) == (
            pytest.approx(np.mean(diffs) - half, abs=1e-12),
            pytest.approx(np.mean(diffs) + half, abs=1e-12),
        )
        widths.append(vs["high"] - vs["low"])
    assert max(widths) > 0, "at least one column has a proper interval (images/s differ)"
    # cckd lives in the teacher's space (student width = teacher width): cross-model numbers,
    # verification and rank-1 identification; the teacher's own row heads each table.
    assert all(per[(m, s)][CROSS_MODEL] != "" for m in ("proxyless", "cckd") for s in SEEDS)
    assert all(
        0 <= float(per[(m, s)]["cross_model_rank1"]) <= 1
        for m in ("proxyless", "cckd")
        for s in SEEDS
    )
    assert 0.0 <= data["teacher"]["acc_10fold"] <= 1.0
    assert f"| teacher (reference) | {data['teacher']['acc_10fold']:.4f} |" in grown["report"]
    report = grown["report"]
    assert "## acc_10fold" in report and "paired t-interval" in report
    assert "cckd" in report and ("not distinguishable" in report or "than proxyless" in report)
    png = grown["png"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "6/6 runs completed" in grown["output"]


@pytest.mark.slow
@pytest.mark.e2e
def test_the_comparison_is_one_parent_run_with_a_run_per_cell(
    grown: dict, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    mlflow = mlflow_client(mlflow_server)
    experiment = mlflow.get_experiment_by_name("compare").experiment_id
    parents = mlflow.search_runs([experiment], "tags.kind = 'comparison'")
    assert len(parents) == 1  # interrupted, resumed and grown: still one
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = mlflow.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(
        f"cmp-{m}-seed{s}" for m in ("proxyless", "cckd") for s in SEEDS
    )
    assert all(c.info.status == "FINISHED" for c in children)
    summary = grown["summary"]
    data = json.loads((summary / "comparison.json").read_text())
    cckd = data["tables"]["auc"]["cckd"]
    assert parent.data.metrics["auc/cckd/mean"] == cckd["mean"]
    assert parent.data.metrics["auc/cckd/vs_baseline/low"] == cckd["vs_baseline"]["low"]
    for name in ("comparison.json", "report.md", "comparison.png"):
        local = mlflow.download_artifacts(parent.info.run_id, name, str(tmp_path))
        assert Path(local).read_bytes() == (summary / name).read_bytes(), name


def test_every_cell_config_is_checked_before_training(tmp_path: Path) -> None:
    """A method that cannot run with the experiment's settings fails at once, naming it."""
    from orchestrator.compare.grid import check_cells

    config = load_config(
        None,
        [
            "loss.method=scratch",
            "compare.methods=[proxyless,scratch]",
            "student.emb_dim=128",
            "teacher.emb_dim=512",
        ],
    )
    config = replace(config, data=DataConfig(train=str(tmp_path), eval=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"method proxyless needs student\.emb_dim"):
        check_cells(config)


def test_cell_inputs_are_checked_once_however_many_methods(
    train_setup: TrainSetup, capsys: pytest.CaptureFixture[str]
) -> None:
    """The teacher that l2, cckd and proxyless+l2 all run per batch is loaded and checked
    once, not once per method (a large ONNX teacher takes a while to load)."""
    from orchestrator.compare.grid import check_cells

    methods = (Method.PROXYLESS, Method.L2, Method.CCKD, Method.PROXYLESS_L2)
    config = replace(train_setup.base, compare=CompareConfig(methods=methods, seeds=(0,)))
    capsys.readouterr()
    check_cells(config)
    assert capsys.readouterr().out.count("[teacher] ") == 1
