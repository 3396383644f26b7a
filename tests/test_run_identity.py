"""The run fingerprint (``run.json``): what it covers, and when a rerun is refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.config import (
    CompareConfig,
    DataConfig,
    ExperimentConfig,
    LossConfig,
    MarginConfig,
    RunConfig,
)
from orchestrator.runs import RunConflictError, claim_run, fingerprint, training_settings


def config(tmp_path: Path) -> ExperimentConfig:
    return ExperimentConfig(name="r", storage_path=str(tmp_path))


@pytest.mark.parametrize(
    "change",
    [
        {"compare": CompareConfig(seeds=(0, 1, 2), storage_path="elsewhere")},
        {"data": DataConfig(throttle_images_per_s=5.0)},
        {"run": RunConfig(log_every_s=1.0, keep_checkpoints=7, audit_ids=True)},
        {"name": "another"},
    ],
    ids=["compare", "throttle", "run bookkeeping", "name"],
)
def test_bookkeeping_settings_leave_the_fingerprint_alone(
    tmp_path: Path, change: dict[str, object]
) -> None:
    base = config(tmp_path)
    same = fingerprint(training_settings(base, "student"))
    assert fingerprint(training_settings(replace(base, **change), "student")) == same  # type: ignore[arg-type]


def test_loss_settings_of_other_methods_are_not_in_the_fingerprint_and_are_named(
    tmp_path: Path,
) -> None:
    from orchestrator.config import Method
    from orchestrator.runs import ineffective_settings

    base = config(tmp_path)
    same = fingerprint(training_settings(base, "student"))
    proxyless = replace(base, loss=LossConfig(l2_weight=3.0, kd_weight=2.0))
    assert fingerprint(training_settings(proxyless, "student")) == same
    assert ineffective_settings(proxyless, "student") == [
        "loss.l2_weight (loss.method proxyless)",
        "loss.kd_weight (loss.method proxyless)",
    ]
    l2 = replace(base, loss=LossConfig(method=Method.L2, l2_weight=3.0, kd_weight=2.0))
    other_l2 = replace(l2, loss=replace(l2.loss, l2_weight=1.0))
    assert fingerprint(training_settings(l2, "student")) != fingerprint(
        training_settings(other_l2, "student")
    ), "l2 reads l2_weight"
    assert ineffective_settings(l2, "student") == ["loss.kd_weight (loss.method l2)"]


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"loss": LossConfig(margin=MarginConfig(m=0.4))},
        {"run": RunConfig(shuffle_buffer=10)},
        {"run": RunConfig(sync_batchnorm=True)},
        {"data": DataConfig(crop_pad=2)},
        {"data": DataConfig(ordered=False)},
    ],
    ids=["seed", "loss", "shuffle buffer", "sync batchnorm", "augmentation", "ordered"],
)
def test_training_settings_change_the_fingerprint(
    tmp_path: Path, change: dict[str, object]
) -> None:
    base = config(tmp_path)
    same = fingerprint(training_settings(base, "student"))
    assert fingerprint(training_settings(replace(base, **change), "student")) != same  # type: ignore[arg-type]


def test_a_run_without_a_checkpoint_takes_new_settings_one_with_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = config(tmp_path)
    claim_run(first, "r", role="student")
    fixed = replace(first, data=replace(first.data, train="fixed/train"))
    claim_run(fixed, "r", role="student")  # the first attempt saved nothing: not trained
    assert "no checkpoint yet, so its settings are replaced" in capsys.readouterr().out
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    assert record["settings"]["data.train"] == "fixed/train"
    (tmp_path / "r" / "checkpoint_2026-12-05_00-00-00.000000").mkdir()
    with pytest.raises(RunConflictError, match=r"data.train: 'fixed/train' -> 'other'"):
        claim_run(replace(first, data=replace(first.data, train="other")), "r", role="student")


def test_ctrl_c_is_one_line_and_exit_130(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator import cli

    def interrupted(argv: object) -> int:
        raise KeyboardInterrupt

    assert cli.run(interrupted, []) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted:") and "resumes" in lines[0]


def test_an_interrupted_search_says_its_own_way_back(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator import cli
    from orchestrator.tune import SearchInterrupted

    def interrupted(argv: object) -> int:
        raise SearchInterrupted("the search at /x stopped; pass --resume")

    assert cli.run(interrupted, []) == 130
    said = capsys.readouterr().err.strip().splitlines()
    assert said == ["interrupted: the search at /x stopped; pass --resume"]
