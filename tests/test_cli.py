"""The job entry points as a user runs them: real subprocesses, real exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator import classifier as clf
from orchestrator.data import format as fmt
from orchestrator.data.prepare import SyntheticDatasets
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


@pytest.mark.unit  # pure: no subprocess, no Ray (module mark notwithstanding)
def test_every_job_docstring_shows_ray_job_submit() -> None:
    for path in sorted((REPO / "jobs").glob("*.py")):
        if path.name == "__init__.py":
            continue
        doc = path.read_text().split('"""')[1]
        assert "ray job submit --working-dir . -- python -m jobs." + path.stem in doc, path.name


def test_build_classifier_failing_over_a_good_classifier_keeps_it(
    tmp_path: Path, tiny_synthetic: SyntheticDatasets
) -> None:
    meta = fmt.read_meta(tiny_synthetic.train_uri)
    out = tmp_path / "classifier"
    good = np.random.default_rng(0).normal(size=(meta.num_classes, 8))
    clf.write_classifier(
        str(out), good, label_map_fingerprint=meta.label_map_fingerprint, source={"kind": "test"}
    )
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    run_dir = tmp_path / "arcface"
    run_dir.mkdir()
    torch.save(torch.randn(3, 8), run_dir / "rank_0_softmax_weight.pt")  # 6 classes, 2 ranks
    torch.save(torch.randn(2, 8), run_dir / "rank_1_softmax_weight.pt")  # rank 1 should have 3
    result = run(
        "jobs.build_classifier", "arcface-torch", "--run-dir", str(run_dir),
        "--dataset", tiny_synthetic.train_uri, "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "rank 1 of 2 has 2 rows, but num_classes=6 gives that rank 3" in result.stderr
    assert all((out / name).read_bytes() == data for name, data in before.items())
    assert clf.read_meta(str(out)).num_classes == meta.num_classes


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_demo_checks_inputs_first_and_deletes_nothing_it_did_not_make(
    tmp_path: Path, tiny_synthetic: SyntheticDatasets
) -> None:
    root = tmp_path / "demo"
    (root / "my-student").mkdir(parents=True)
    (root / "my-student" / "student.pt").write_bytes(b"another run's student")
    before = tree(root)
    common = ["--set", f"storage_path={root}", "--set", f"data.eval={tiny_synthetic.eval_uri}"]
    bad = run("jobs.demo", *common, "--set", f"data.train={tmp_path / 'nothing'}")
    assert bad.returncode == 2 and "dataset.json not found" in bad.stderr, bad.stderr
    assert tree(root) == before, "a bad input deleted nothing"
    # A run of a name the demo trains, not made by a demo: refused, untouched.
    (root / "proxyless").mkdir()
    (root / "proxyless" / "keep.txt").write_text("mine")
    before = tree(root)
    clash = run("jobs.demo", *common, "--set", f"data.train={tiny_synthetic.train_uri}")
    assert clash.returncode == 2 and "was not made by jobs.demo" in clash.stderr, clash.stderr
    assert f"{root / 'proxyless'}" in clash.stderr and tree(root) == before
    typo = run("jobs.demo", *common, "--methods", "proxyless,scrach")
    assert typo.returncode == 2 and "expected names from proxyless, scratch" in typo.stderr


def test_names_and_shard_paths_stay_inside_their_roots(
    tmp_path: Path, tiny_synthetic: SyntheticDatasets
) -> None:
    storage_path = tmp_path / "a" / "b" / "runs"
    result = run(
        "jobs.distill", "--set", f"storage_path={storage_path}", "--name", "../../escaped-run"
    )
    assert result.returncode == 2 and "a single path component" in result.stderr, result.stderr
    assert not (tmp_path / "a" / "escaped-run").exists() and not storage_path.exists()
    result = run("jobs.synthesize", "--set", "name=../up")
    assert result.returncode == 2 and "name: must be a single path component" in result.stderr
    for bad in ("/etc/passwd", "../../outside.parquet", "s3://other/x.parquet"):
        copy = tmp_path / f"copy{abs(hash(bad))}"
        copy.mkdir()
        data = json.loads((Path(tiny_synthetic.train_uri) / "dataset.json").read_text())
        data["files"][0]["name"] = bad
        (copy / "dataset.json").write_text(json.dumps(data))
        with pytest.raises(fmt.DatasetError, match=r"is not a plain file name inside the dataset"):
            fmt.read_meta(str(copy))


@pytest.mark.unit  # pure: reads files, runs nothing
def test_help_is_a_whole_sentence_and_names_no_file_outside_the_repository() -> None:
    from orchestrator.cli import description

    doc = "First line of a\nsentence that goes on.\n\nSecond paragraph."
    assert description(doc) == "First line of a sentence that goes on."
    for path in [*(REPO / "jobs").glob("*.py"), *(REPO / "orchestrator").rglob("*.py")]:
        assert "DESIGN.md" not in path.read_text(), f"{path} sends users to a file they do not have"
