"""bench/suite_cpu.py: the per-file totals and the limit's arithmetic against hand-worked
numbers, and a real run of the script on two tests of known cost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO


@pytest.fixture
def suite_cpu(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import suite_cpu as module

    return module


def test_files_add_their_tests_and_the_limit_is_worked_out(suite_cpu: ModuleType) -> None:
    tests = [
        suite_cpu.CpuOfTest("tests/test_a.py::one", 10.0, 15.0),
        suite_cpu.CpuOfTest("tests/test_b.py::one", 100.0, 50.0),
        suite_cpu.CpuOfTest("tests/test_a.py::two[x]", 30.0, 45.0),
    ]
    files = suite_cpu.by_file(tests, cores=2)
    # the most CPU first: a (60 CPU s over 40 s), then b (50 over 100)
    assert [(f.path, f.tests, f.wall_s, f.busy_s) for f in files] == [
        ("tests/test_a.py", 2, 40.0, 60.0),
        ("tests/test_b.py", 1, 100.0, 50.0),
    ]
    assert files[0].share == pytest.approx(0.75) and files[0].idle_s == pytest.approx(20.0)
    assert files[1].share == pytest.approx(0.25) and files[1].idle_s == pytest.approx(150.0)
    totals = suite_cpu.bounds(files, cores=2, outside_s=100.0)
    # 140 s wall, 110 CPU s: 110 / 280 of the cores; 1,400 s of pytest allowed
    assert totals["wall_s"] == 140.0 and totals["busy_s"] == 110.0
    assert totals["share"] == pytest.approx(110 / 280)
    assert totals["least_wall_s"] == pytest.approx(55.0)
    assert totals["pytest_budget_s"] == 1400.0
    assert totals["busy_allowed_at_full_s"] == 2800.0
    assert totals["busy_allowed_at_share_s"] == pytest.approx(2800.0 * 110 / 280)


SPIN_AND_SLEEP = """
import time

def test_spin():
    end = time.process_time() + 0.5
    while time.process_time() < end:
        pass

def test_sleep():
    time.sleep(0.5)
"""


@pytest.mark.e2e
def test_the_script_measures_a_real_run(tmp_path: Path) -> None:
    """One file: a test that keeps a core busy for 0.5 s of its own CPU time and one that
    sleeps 0.5 s. The machine's busy seconds include the spin's (and whatever else ran)."""
    target = tmp_path / "test_known.py"
    target.write_text(SPIN_AND_SLEEP)
    result = subprocess.run(
        [sys.executable, "bench/suite_cpu.py", "--outside", "60", str(target)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["pytest_exit"] == 0 and len(record["files"]) == 1
    (row,) = record["files"]
    assert row["path"].endswith("test_known.py") and row["tests"] == 2
    assert row["wall_s"] >= 1.0 and row["busy_s"] >= 0.5
    assert row["busy_s"] <= row["wall_s"] * record["cores"]
    assert record["pytest_budget_s"] == 25 * 60 - 60
    assert "test_known.py" in result.stdout and "CPU s busy" in result.stdout
