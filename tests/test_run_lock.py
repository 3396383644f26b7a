"""Two live runs of one name (real `jobs.distill` subprocesses, each with its own private
Ray cluster): one runs, the other exits 2 naming the lock's holder. In its own module so
that no other test's Ray cluster is alive beside the two (2 cores)."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.config import dump_yaml
from tests.conftest import REPO, TrainSetup
from tests.test_private_cluster import env_without_ray_address

pytestmark = pytest.mark.e2e


def test_two_live_runs_of_one_name_one_runs_the_other_exits_2(
    train_setup: TrainSetup, tmp_path: Path
) -> None:
    config = replace(
        train_setup.base,
        name="same",
        storage_path=str(tmp_path / "runs"),
        optim=replace(train_setup.base.optim, epochs=1),
    )
    path = tmp_path / "same.yaml"
    path.write_text(dump_yaml(config))
    command = [sys.executable, "-m", "jobs.distill", "--config", str(path)]
    runs = [
        subprocess.Popen(
            command,
            cwd=REPO,
            env=env_without_ray_address(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [r.communicate(timeout=500) for r in runs]
    codes = sorted(r.returncode for r in runs)
    assert codes == [0, 2], outputs
    refused = outputs[[r.returncode for r in runs].index(2)][1]
    assert re.search(r"error: .*\.locks/same\.json (is held by|was taken by) \S+", refused), refused
    assert (tmp_path / "runs" / "same" / "student.pt").exists()
    assert not (tmp_path / "runs" / ".locks" / "same.json").exists(), "released after the run"
