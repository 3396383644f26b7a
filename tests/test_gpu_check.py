"""bench/gpu_check.py cannot rot while no GPU is at hand: it runs here on CPU at small
shapes, with Ray, simplejpeg, pyarrow, fsspec and PyYAML made unimportable (a bare GPU box
may have only torch)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e

BLOCKED = ("ray", "simplejpeg", "pyarrow", "fsspec", "s3fs", "yaml")

RUN_BLOCKED = f"""
import runpy, sys
class Block:
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("gpu_check must not import " + name)
sys.meta_path.insert(0, Block())
sys.argv = ["bench/gpu_check.py", "--device", "cpu", "--quick"]
runpy.run_path("bench/gpu_check.py", run_name="__main__")
"""


def test_gpu_check_quick_on_cpu_with_only_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", RUN_BLOCKED], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["parity_ok"] is True and record["full_shapes"] is False
    assert set(record["parity"]) == {"dense_fp32", "sharded_fp32", "dense_bf16", "sharded_bf16"}
    for name, errors in record["parity"].items():
        loss_tol, grad_tol = (1e-5, 1e-4) if name.endswith("fp32") else (1e-2, 2e-2)
        assert errors["loss_rel_err"] <= loss_tol and errors["grad_rel_err"] <= grad_tol, name
    assert set(record["step"]) == {"frozen", "trainable", "backbone_only", "frozen_sampled_0.1"}
    assert all(row["images_per_s"] > 0 for row in record["step"].values())
    assert all(row["ratio_to_bound"] > 0 for row in record["loss_alone"].values())
    assert "| dense_fp32 |" in result.stdout and "2. training step" in result.stdout


def test_gpu_check_without_a_gpu_says_so() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = subprocess.run(
        [sys.executable, "bench/gpu_check.py"], cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "no CUDA device here (try --device cpu)" in result.stderr
