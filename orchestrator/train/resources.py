"""Can the cluster ever hold a run? The preflight check before any worker is started.

Ray Train retries a worker group that cannot be placed forever (a
``WorkerGroupStartupTimeoutError`` every minute), so the driver compares what a run asks
for with what the cluster has now and, where an autoscaler says so, the most it can grow
to. Where the limits come from, in order:

1. the cluster config an autoscaler reports to the GCS (``ClusterConfig``: node groups
   with their resources and ``max_count``; the record Ray Train's own check reads);
2. on the head node of a ``ray up`` cluster, the launcher's ``~/ray_bootstrap_config.yaml``
   (``available_node_types`` with their resources and ``max_workers``);
3. none: a private cluster is what it is; a cluster reached by ``RAY_ADDRESS`` may still
   grow (nodes joining by hand, KubeRay), so there the driver waits, bounded.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import ray
import yaml
from ray._private import state

from orchestrator.config import ExperimentConfig
from orchestrator.data.ray_input import configured_plan
from orchestrator.errors import UsageError

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
POLL_S = 5.0


class ResourceError(UsageError):
    """The run asks for more than the cluster can ever give it (or gave it in time)."""


@dataclass(frozen=True)
class ClusterSize:
    cpus: float
    gpus: float
    node_cpus: float  # the largest node's
    node_gpus: float

    @classmethod
    def now(cls) -> ClusterSize:

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        return cls(
            cpus=sum(n.get("CPU", 0.0) for n in nodes),
            gpus=sum(n.get("GPU", 0.0) for n in nodes),
            node_cpus=max((n.get("CPU", 0.0) for n in nodes), default=0.0),
            node_gpus=max((n.get("GPU", 0.0) for n in nodes), default=0.0),
        )


@dataclass(frozen=True)
class NodeGroup:
    cpus: float
    gpus: float
    max_count: float  # math.inf: unbounded


def size_of(groups: list[NodeGroup], *, cap: dict[str, float] | None = None) -> ClusterSize:
    """The largest cluster ``groups`` can make (every group at its ``max_count``), within
    ``cap``'s per-resource totals."""
    cap = cap or {}
    live = [g for g in groups if g.max_count > 0]

    def total(field: str) -> float:
        amount = sum((getattr(g, field) * g.max_count if getattr(g, field) else 0.0) for g in live)
        return min(amount, cap.get(field, math.inf))

    return ClusterSize(
        cpus=total("cpus"),
        gpus=total("gpus"),
        node_cpus=max((g.cpus for g in live), default=0.0),
        node_gpus=max((g.gpus for g in live), default=0.0),
    )


def reported_limits() -> ClusterSize | None:
    """From the ``ClusterConfig`` an autoscaler reported to the GCS (None: none reported)."""
    config = state.state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    groups = [
        NodeGroup(
            cpus=float(g.resources.get("CPU", 0)),
            gpus=float(g.resources.get("GPU", 0)),
            max_count=math.inf if g.max_count == -1 else float(g.max_count),
        )
        for g in config.node_group_configs
    ]
    cap = {
        field: float(config.max_resources[key])
        for key, field in (("CPU", "cpus"), ("GPU", "gpus"))
        if key in config.max_resources
    }
    return size_of(groups, cap=cap)


def launcher_limits(launcher: dict[str, Any]) -> ClusterSize | None:
    """From a cluster launcher config (``available_node_types`` with ``max_workers`` each,
    the global ``max_workers``, ``head_node_type``); None when a node type's CPU count is
    not written down (the launcher fills those in for cloud instance types in the
    bootstrap copy on the head node)."""
    types = launcher.get("available_node_types") or {}
    head_type = launcher.get("head_node_type")
    heads, workers = [], []
    for name, node in types.items():
        resources = node.get("resources") or {}
        if "CPU" not in resources:
            return None
        group = NodeGroup(
            cpus=float(resources["CPU"]),
            gpus=float(resources.get("GPU", 0)),
            max_count=float(node.get("max_workers", 0)),
        )
        if name == head_type:
            heads.append(replace(group, max_count=1.0))
        workers.append(group)  # the head's type may add worker nodes of its own kind
    if not workers:
        return None
    size = size_of(heads + workers)
    cap = launcher.get("max_workers")  # worker nodes in all, whatever their type
    if cap is None:
        return size
    head = size_of(heads)
    return replace(
        size,
        cpus=min(size.cpus, head.cpus + float(cap) * max(w.cpus for w in workers)),
        gpus=min(size.gpus, head.gpus + float(cap) * max(w.gpus for w in workers)),
    )


def bootstrap_limits(path: str = BOOTSTRAP_CONFIG) -> ClusterSize | None:
    where = os.path.expanduser(path)
    if not os.path.exists(where):
        return None

    with open(where) as handle:
        launcher = yaml.safe_load(handle) or {}
    return launcher_limits(launcher) if isinstance(launcher, dict) else None


def autoscaler_limits() -> ClusterSize | None:
    return reported_limits() or bootstrap_limits()


def shortfall(
    config: ExperimentConfig, size: ClusterSize, *, has: str = "the cluster has"
) -> str | None:
    """Why the run's workers (a GPU each if used, ``cpus_per_worker`` each; an elastic run
    needs its ``min`` workers to start) and the smallest decode pool (one actor and one read
    slot; the read slot alone when the workers decode) cannot be placed on ``size``; None if
    they can."""
    scaling = config.scaling
    workers = scaling.min_workers
    decode = configured_plan(replace(config.data, decode_actors=1)).cpus
    cpus = workers * scaling.cpus_per_worker + decode
    least = "at least " if scaling.elastic else ""
    asked = (
        f"scaling asks for {least}{workers} worker(s) x {scaling.cpus_per_worker:g} CPU"
        f"{' + 1 GPU' if scaling.use_gpu else ''} and the decode pool {decode:g} CPU"
    )
    if scaling.use_gpu and size.gpus < workers:
        return f"{asked}: {has} {size.gpus:g} GPU(s)"
    if cpus > size.cpus + 1e-9:
        return f"{asked} = {cpus:g} CPU: {has} {size.cpus:g}"
    if scaling.cpus_per_worker > size.node_cpus + 1e-9:
        return f"{asked}: no node has more than {size.node_cpus:g} CPU for one worker"
    return None


def preflight(config: ExperimentConfig) -> None:
    """Refuse a run that can never be scheduled, at once; wait up to
    ``scaling.resources_wait_s`` for one that could be once the cluster grows."""
    why = shortfall(config, ClusterSize.now())
    if why is None:
        return
    if not os.environ.get("RAY_ADDRESS"):  # our private cluster: it will not grow
        raise ResourceError(f"{why}: it can never be scheduled; {ADVICE}")
    limits = autoscaler_limits()
    if limits is not None:
        never = shortfall(config, limits, has="the autoscaler's limits allow")
        if never is not None:
            raise ResourceError(f"{never}: it can never be scheduled; {ADVICE}")
    wait_for_capacity(config, why)


ADVICE = (
    "lower scaling.num_workers / cpus_per_worker, set scaling.use_gpu as the cluster "
    "allows, or add nodes"
)


def wait_for_capacity(config: ExperimentConfig, why: str) -> None:
    wait = config.scaling.resources_wait_s
    print(f"[ray] waiting up to {wait:g}s for the cluster to grow: {why}", flush=True)
    deadline = time.monotonic() + wait
    while (why_now := shortfall(config, ClusterSize.now())) is not None:
        if time.monotonic() >= deadline:
            raise ResourceError(
                f"{why_now}: not there after waiting {wait:g}s (scaling.resources_wait_s); {ADVICE}"
            )
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
    print("[ray] the cluster has grown enough: starting", flush=True)
