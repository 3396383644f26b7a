"""The preflight's view of how large a cluster can grow (``orchestrator.train.resources``),
from the cluster launcher configs this project ships."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.config import ExperimentConfig, OptimConfig, ScalingConfig
from orchestrator.train.resources import ClusterSize, NodeGroup, launcher_limits, shortfall, size_of
from tests.conftest import REPO

# What `ray up` writes into the bootstrap copy for these instance types (vCPUs, GPUs).
FILLED = {"g5.4xlarge": (16, 1), "p4d.24xlarge": (96, 8), "m5.2xlarge": (0, 0)}


def filled_aws() -> dict[str, Any]:
    launcher = yaml.safe_load((Path(REPO) / "cluster" / "aws-gpu.yaml").read_text())
    filled = copy.deepcopy(launcher)
    for node in filled["available_node_types"].values():
        cpus, gpus = FILLED[node["node_config"]["InstanceType"]]
        node["resources"] = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    filled["head_node_type"] = "head"
    return filled


def test_launcher_limits_of_the_aws_cluster_file() -> None:
    launcher = yaml.safe_load((Path(REPO) / "cluster" / "aws-gpu.yaml").read_text())
    # As shipped, the worker types leave their resources to the launcher: no limits known.
    assert launcher_limits(launcher) is None
    filled = filled_aws()
    # 8 + 4 g5 (16 CPU, 1 GPU) and 2 p4d (96 CPU, 8 GPU) workers, a 0-CPU head.
    assert launcher_limits(filled) == ClusterSize(
        cpus=8 * 16 + 4 * 16 + 2 * 96, gpus=8 + 4 + 2 * 8, node_cpus=96, node_gpus=8
    )
    # The global max_workers caps the worker nodes: 3 nodes of at most 96 CPU / 8 GPU.
    filled["max_workers"] = 3
    limits = launcher_limits(filled)
    assert limits is not None and (limits.cpus, limits.gpus) == (3 * 96, 3 * 8)


def test_size_of_node_groups_with_caps_and_unbounded_groups() -> None:
    groups = [NodeGroup(4, 1, 2), NodeGroup(2, 0, 0), NodeGroup(8, 0, 1)]
    assert size_of(groups) == ClusterSize(cpus=16, gpus=2, node_cpus=8, node_gpus=1)
    assert size_of(groups, cap={"cpus": 10}).cpus == 10
    assert size_of([NodeGroup(4, 1, float("inf"))]).gpus == float("inf")


@pytest.mark.parametrize(
    ("scaling", "expected"),
    [
        (ScalingConfig(num_workers=29, use_gpu=True), "allow 28 GPU"),
        (ScalingConfig(num_workers=1, cpus_per_worker=97), "no node has more than 96 CPU"),
        (ScalingConfig(num_workers=4, cpus_per_worker=96), "= 385 CPU: the autoscaler's"),
        (ScalingConfig(num_workers=28, use_gpu=True, cpus_per_worker=8), None),
        # Elastic: the run starts once its minimum fits; the maximum may exceed the cluster.
        (ScalingConfig(num_workers=(20, 32), use_gpu=True, cpus_per_worker=8), None),
        (ScalingConfig(num_workers=(29, 32), use_gpu=True), "at least 29 worker(s)"),
    ],
)
def test_shortfall_against_autoscaler_limits(scaling: ScalingConfig, expected: str | None) -> None:
    limits = launcher_limits(filled_aws())
    assert limits is not None
    batch = OptimConfig(batch_size=4 * math.lcm(*scaling.world_sizes))
    config = ExperimentConfig(scaling=scaling, optim=batch, teacher_optim=batch)
    why = shortfall(config, limits, has="the autoscaler's limits allow")
    if expected is None:
        assert why is None
    else:
        assert why is not None and expected in why, why


def test_a_per_worker_batch_below_batchnorms_minimum_is_warned_about() -> None:
    from orchestrator.train.checks import BATCHNORM_MIN_LOCAL, small_batch_warning

    assert BATCHNORM_MIN_LOCAL == 4
    line = small_batch_warning(6, ScalingConfig(num_workers=(1, 3)), key="optim.batch_size")
    assert line is not None and line.startswith("warning: optim.batch_size=6 over 3 workers")
    assert "is 2 images per worker" in line and "raise optim.batch_size to at least 12" in line
    assert small_batch_warning(12, ScalingConfig(num_workers=3), key="optim.batch_size") is None
    assert small_batch_warning(8, ScalingConfig(num_workers=2), key="x") is None
    assert "x=7 over 2 workers is 3 images" in str(
        small_batch_warning(7, ScalingConfig(2), key="x")
    )
