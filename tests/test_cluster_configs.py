"""The cluster definitions: every launcher YAML through the Ray autoscaler's own config
preparation and schema validation (the schema ships in the Ray wheel), a broken copy
rejected, and the KubeRay manifests' structure and versions."""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from jsonschema.exceptions import ValidationError

from orchestrator.config import load_config
from orchestrator.data.ray_input import decode_plan
from tests.conftest import REPO

CLUSTER = REPO / "cluster"
LAUNCHER_YAMLS = sorted(CLUSTER.glob("*.yaml"))
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
PYTHON = f"py{sys.version_info.major}{sys.version_info.minor}"


def validate(config: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_there_are_aws_gcp_and_onprem_definitions() -> None:
    assert {p.name for p in LAUNCHER_YAMLS} >= {"aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_is_valid_for_this_ray(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    validate(config)
    text = path.read_text()
    assert "aws_secret_access_key" not in text.lower() and "private_key_id" not in text
    if config["provider"]["type"] in ("aws", "gcp"):
        image = config["docker"]["image"]
        assert image == f"rayproject/ray:{ray.__version__}-{PYTHON}-gpu"
        assert any("--shm-size" in option for option in config["docker"]["run_options"])
        assert "pip install -e /home/ray/proxylesskd" in " ".join(config["setup_commands"])
        types = config["available_node_types"]
        market = [
            t
            for t in types.values()
            if "spot" in str(t["node_config"]) or "preemptible" in str(t["node_config"])
        ]
        assert market and len(market) < len(types) - 1  # spot/preemptible plus on-demand
        assert config["head_node_type"] in types


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda c: c.update(max_wokers=4), "max_wokers"),  # a typo in a key
        (lambda c: c.update(head_node_type="nope"), "head_node_type"),
        (lambda c: c["available_node_types"]["g5_spot"].update(min_workers="two"), "two"),
    ],
    ids=["typo", "unknown-head-type", "wrong-type"],
)
def test_broken_copies_are_rejected(breakage: Any, expected: str) -> None:
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    breakage(config)
    # Ray's schema check raises jsonschema's ValidationError; its head-type check ValueError.
    with pytest.raises((ValidationError, ValueError), match=expected):
        validate(config)


def pinned_ray_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'"ray\[[^\]]*\]==([0-9.*]+)"', text)
    assert match, "pyproject.toml pins ray"
    return match.group(1)


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests_match_the_pinned_versions(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    pinned = pinned_ray_version().rstrip(".*")
    assert ray.__version__.startswith(pinned)
    for doc in docs:
        if doc["kind"] == "CronJob":
            check_cronjob(doc)
            continue
        assert doc["apiVersion"] == "ray.io/v1"
        assert doc["kind"] in ("RayCluster", "RayJob", "RayCronJob")
        spec = cluster_spec(doc)
        assert spec["rayVersion"] == ray.__version__
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                assert f"ray{ray.__version__}-{PYTHON}" in container["image"]
        gpus = [
            c["resources"]["limits"].get("nvidia.com/gpu")
            for g in spec["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]
        ]
        assert all(gpus)
        if doc["kind"] in ("RayJob", "RayCronJob"):
            entrypoint = job_spec(doc)["entrypoint"]
            assert entrypoint.startswith("python -m jobs.")
            module = entrypoint.split()[2]
            assert (REPO / (module.replace(".", "/") + ".py")).exists()


def check_cronjob(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "batch/v1"
    spec = doc["spec"]
    assert len(spec["schedule"].split()) == 5 and spec["concurrencyPolicy"] == "Forbid"
    (container,) = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert f"ray{ray.__version__}-{PYTHON}" in container["image"]
    command = container["command"]
    module = command[command.index("-m") + 1]
    assert command[:3] == ["ray", "job", "submit"] and module == "jobs.retrain"
    assert (REPO / (module.replace(".", "/") + ".py")).exists()
    assert (REPO / command[command.index("--config") + 1]).exists()


def test_there_is_a_scheduled_retraining_manifest() -> None:
    kinds = {d["kind"] for p in KUBERAY for d in yaml.safe_load_all(p.read_text()) if d}
    assert {"RayCluster", "RayJob", "CronJob", "RayCronJob"} <= kinds


def job_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayJob spec of a RayJob, or of each run of a RayCronJob."""
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "RayCluster" else job_spec(doc)["rayClusterSpec"]


def quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@dataclass(frozen=True)
class Pods:
    """What the Ray cluster of a manifest holds at most: worker pods of each group."""

    pods: tuple[tuple[int, float, float], ...]  # (count, CPUs, GPUs) per worker group

    @classmethod
    def of(cls, spec: dict[str, Any], bound: str = "maxReplicas") -> Pods:
        """At most (``maxReplicas``) or at least (``minReplicas``: what a spot group may
        shrink to)."""
        groups = []
        for group in spec["workerGroupSpecs"]:
            (container,) = group["template"]["spec"]["containers"]
            limits = container["resources"]["limits"]
            count = int(group.get(bound, group.get("replicas", 0)))
            gpus = quantity(limits.get("nvidia.com/gpu", 0))
            groups.append((count, quantity(limits["cpu"]), gpus))
        return cls(tuple(groups))

    @property
    def cpus(self) -> float:
        return sum(n * cpu for n, cpu, _ in self.pods)

    def train_workers(self, cpus_per_worker: float, use_gpu: bool) -> int:
        """How many Train workers fit, one GPU (if used) and cpus_per_worker each."""
        total = 0
        for n, cpu, gpu in self.pods:
            per_pod = int(cpu // cpus_per_worker)
            total += n * (min(per_pod, int(gpu)) if use_gpu else per_pod)
        return total


def submitted_jobs(bound: str = "maxReplicas") -> list[tuple[str, str, Pods]]:
    """(manifest, config path, cluster) for every job a KubeRay manifest runs: a RayJob's or
    RayCronJob's entrypoint on its own cluster, a CronJob's `ray job submit` on the
    RayCluster of raycluster.yaml (its pods at ``bound``)."""
    docs = [(p.name, d) for p in KUBERAY for d in yaml.safe_load_all(p.read_text()) if d]
    (shared,) = [d for _, d in docs if d["kind"] == "RayCluster"]
    jobs = []
    for name, doc in docs:
        if doc["kind"] in ("RayJob", "RayCronJob"):
            words = job_spec(doc)["entrypoint"].split()
            config = words[words.index("--config") + 1]
            jobs.append((name, config, Pods.of(cluster_spec(doc), bound)))
        elif doc["kind"] == "CronJob":
            (container,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
            words = container["command"]
            config = words[words.index("--config") + 1]
            jobs.append((name, config, Pods.of(shared["spec"], bound)))
    return jobs


def test_every_kuberay_job_fits_the_cluster_it_runs_on() -> None:
    """The worker pods hold scaling.num_workers Train workers (a GPU and cpus_per_worker
    each) plus the decode pool beside them: otherwise the job can never be scheduled."""
    jobs = submitted_jobs()
    assert {name for name, _, _ in jobs} >= {"rayjob-distill.yaml", "retrain-cronjob.yaml"}
    for name, config_path, pods in jobs:
        config = load_config(REPO / config_path)
        scaling = config.scaling
        fits = pods.train_workers(scaling.cpus_per_worker, scaling.use_gpu)
        assert fits >= scaling.max_workers, (
            f"{name}: {config_path} needs {scaling.max_workers} workers, the pods hold {fits}"
        )
        plan = decode_plan(config.data, scaling, pods.cpus)
        needed = scaling.max_workers * scaling.cpus_per_worker + plan.cpus
        assert needed <= pods.cpus, f"{name}: needs {needed} CPUs, the pods have {pods.cpus}"


def test_the_spot_worker_groups_are_the_elastic_range_of_their_jobs() -> None:
    """A RayJob's GPU group may shrink to minReplicas pods: they still hold the config's
    minimum of Train workers, and its maxReplicas pods hold no fewer than the maximum. The
    shipped production config is elastic over them."""
    for (name, config_path, least), (_, _, most) in zip(
        submitted_jobs("minReplicas"), submitted_jobs("maxReplicas"), strict=True
    ):
        scaling = load_config(REPO / config_path).scaling
        fewest = least.train_workers(scaling.cpus_per_worker, scaling.use_gpu)
        widest = most.train_workers(scaling.cpus_per_worker, scaling.use_gpu)
        if name in ("rayjob-distill.yaml", "retrain-raycronjob.yaml"):
            assert scaling.elastic, f"{name}: {config_path} has a fixed worker count"
            assert fewest == scaling.min_workers, (name, fewest, scaling.num_workers)
        assert widest >= scaling.max_workers, (name, widest, scaling.num_workers)
