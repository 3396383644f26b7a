"""The job entry points as a user runs them: real subprocesses, real exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_synthesize_with_overrides(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    result = run(
        "jobs.synthesize", "--config", "configs/demo.yaml",
        "--set", f"synthetic.out={out}", "--set", "synthetic.num_identities=3",
        "--set", "synthetic.eval_identities=20", "--set", "synthetic.images_per_identity=2",
        "--set", "synthetic.pairs_per_fold=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "train: 3 identities, 6 images" in result.stdout
    assert json.loads((out / "eval" / "dataset.json").read_text())["num_classes"] == 20


def test_config_typo_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    result = run(
        "jobs.synthesize", "--config", "configs/demo.yaml", "--set", "synthetic.num_identites=3"
    )
    assert result.returncode == 2
    assert (
        "error: configs/demo.yaml with --set: synthetic.num_identites: unknown key in SyntheticConfig (did you mean 'num_identities'?)"
        in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_prepare_dataset_missing_input(tmp_path: Path) -> None:
    result = run(
        "jobs.prepare_dataset", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")
    )
    assert result.returncode == 2 and "no such directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_build_classifier_needs_a_published_dataset(tmp_path: Path) -> None:
    result = run(
        "jobs.build_classifier",
        "checkpoint",
        "--teacher",
        "x.pt",
        "--dataset",
        str(tmp_path),
        "--out",
        str(tmp_path / "w"),
    )
    assert result.returncode == 2 and "dataset.json not found" in result.stderr


def test_every_job_docstring_shows_ray_job_submit() -> None:
    for path in sorted((REPO / "jobs").glob("*.py")):
        if path.name == "__init__.py":
            continue
        doc = path.read_text().split('"""')[1]
        assert "ray job submit --working-dir . -- python -m jobs." + path.stem in doc, path.name
