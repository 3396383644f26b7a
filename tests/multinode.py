"""A training run on a Ray cluster of several nodes on this machine, losing one of them.

``python -m tests.multinode SCENARIO.json`` builds Ray's own multi-node test cluster
(``ray.cluster_utils.Cluster``: a head without CPUs for the driver and Train's controller,
and worker nodes of 1 CPU, each its own raylet and object store), runs ``distill`` on it
and, when the scenario asks, kills a worker node (its raylet and every process on it, as a
preemption does) once Ray Train has registered a checkpoint inside an epoch, then adds a
node back once the attempt without it has saved a checkpoint. It writes what happened to the scenario's
``report`` file; the assertions are the calling test's (tests/test_elastic.py).

It runs in a process of its own: a pytest process already holds the session's one-node
cluster, and a Ray driver connects to one cluster per process.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NODE_CPUS = 1  # a worker node holds one Train worker (0.75 CPU) and one read slot (0.25)
STORE_BYTES = 100 * 2**20  # each node's object store


@dataclass(frozen=True)
class Run:
    config: dict[str, Any]  # an ExperimentConfig as plain data
    kill: bool = False  # kill a worker node after a checkpoint inside an epoch
    add_back: bool = True  # and add one back once training resumed without it


@dataclass(frozen=True)
class Scenario:
    runs: list[dict[str, Any]]  # Run fields, one after the other on one cluster
    report: str  # where the JSON account goes (a list, one entry per run)
    worker_nodes: int = 2
    timeout_s: float = 420.0  # per run


class TestCluster:
    """A head without CPUs (the driver and Train's controller live there) and worker nodes
    of NODE_CPUS; node deaths are noticed within ~3 s (GCS health checks every 1 s, 3
    misses), where Ray's defaults take ~15 s."""

    def __init__(self, worker_nodes: int) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "object_store_memory": STORE_BYTES,
                "_system_config": {
                    "health_check_period_ms": 1000,
                    "health_check_failure_threshold": 3,
                },
            },
        )
        self.workers = [self.add() for _ in range(worker_nodes)]
        self.cluster.wait_for_nodes()

    def add(self) -> Any:
        return self.cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=STORE_BYTES)

    def kill_one(self) -> None:
        self.cluster.remove_node(self.workers.pop(), allow_graceful=False)

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


def resumed_checkpoints(run_dir: Path, attempt: int) -> list[float]:
    """The write times of the checkpoints saved by attempt ``attempt`` (0: the first) or a
    later one: what the run trained after it restarted that many times."""
    from orchestrator.formats.state import load_state

    times = []
    for path in run_dir.glob("checkpoint_*/state.pt"):
        try:
            attempts = len(load_state(str(path.parent)).history.world_sizes)
        except Exception:  # being written
            continue
        if attempts > attempt:
            times.append(path.stat().st_mtime)
    return sorted(times)


def wait_for(what: str, ready: Any, deadline: float, alive: Any) -> None:
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        if not alive():
            raise RuntimeError(f"the run ended while waiting for {what}")
        time.sleep(0.05)


def main(path: str) -> None:
    scenario = Scenario(**json.loads(Path(path).read_text()))
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    cluster = TestCluster(scenario.worker_nodes)
    os.environ["RAY_ADDRESS"] = cluster.cluster.address
    reports: list[dict[str, Any]] = []
    try:
        for run in scenario.runs:
            reports.append(one_run(cluster, Run(**run), scenario.timeout_s, path))
            Path(scenario.report).write_text(json.dumps(reports, indent=1))
            if reports[-1]["errors"]:
                break
    finally:
        cluster.shutdown()
    sys.exit(0 if all(not r["errors"] for r in reports) else 1)


def one_run(cluster: TestCluster, run: Run, timeout_s: float, source: str) -> dict[str, Any]:
    from orchestrator.config import ExperimentConfig
    from orchestrator.train.launch import distill
    from orchestrator.train.trainer import RunOutcome
    from orchestrator.typed_yaml import from_dict
    from tests.conftest import registered_inside

    config = from_dict(ExperimentConfig, run.config, source)
    events: dict[str, float] = {}
    outcome: list[RunOutcome] = []
    errors: list[str] = []

    def train() -> None:
        try:
            outcome.append(distill(config))
        except BaseException as err:  # reported to the test
            errors.append(f"{type(err).__name__}: {err}")

    events["started"] = time.time()
    thread = threading.Thread(target=train)
    thread.start()
    run_dir = Path(config.storage_path) / config.name
    deadline = time.monotonic() + timeout_s
    try:
        if run.kill:
            wait_for(
                "a checkpoint inside an epoch",
                lambda: registered_inside(run_dir),
                deadline,
                thread.is_alive,
            )
            events["killed"] = time.time()
            cluster.kill_one()
            print(f"[multinode] worker node killed after {registered_inside(run_dir)}", flush=True)
            wait_for(
                "a checkpoint of the attempt after the loss",
                lambda: resumed_checkpoints(run_dir, 1),
                deadline,
                thread.is_alive,
            )
            events["first_checkpoint_after_kill"] = resumed_checkpoints(run_dir, 1)[0]
            if run.add_back:
                cluster.workers.append(cluster.add())
                events["added_back"] = time.time()
                print("[multinode] a worker node added back", flush=True)
        thread.join(timeout=max(1.0, deadline - time.monotonic()))
        grown = resumed_checkpoints(run_dir, 2) if run.kill and run.add_back else []
        if grown:
            events["first_checkpoint_after_growth"] = grown[0]
    except (TimeoutError, RuntimeError) as err:
        errors.append(str(err))
    report: dict[str, Any] = {"name": config.name, "errors": errors, "events": events}
    if outcome:
        state = outcome[0].state
        report |= {
            "world_sizes": list(state.history.world_sizes),
            "epochs_done": list(state.history.epochs_done),
            "resumed_at": list(state.history.resumed_at),
            "resumed_at_step": list(state.history.resumed_steps),
            "metrics": {k: v for k, v in outcome[0].metrics.items() if _plain(v)},
        }
    elif thread.is_alive():
        errors.append(f"the run did not finish in {timeout_s:g}s")
        thread.join()  # a daemon thread would keep the cluster alive: wait for it
    return report


def _plain(value: Any) -> bool:
    return isinstance(value, int | float | str | bool)


if __name__ == "__main__":
    main(sys.argv[1])
