"""Scheduled retraining with a promotion gate (``python -m jobs.retrain``).

One run: take the newest dataset snapshot, distil a student on it (unless one exists),
evaluate it next to the champion on a fixed benchmark, promote it if it is better by the
configured margin, record the decision. Every step is idempotent per snapshot, so a run
that crashed anywhere is completed by the next one without retraining and without a
second promotion.

The registry (a directory or object-store prefix)::

    champion.json            the pointer: the current champion (replaced atomically)
    champions/NNNNNN.json    every champion ever promoted, in order (kept)
    candidates/<fp>.json     a snapshot's trained, evaluated candidate
    history.jsonl            one line per decision: promoted / rejected / skipped, metrics
    lock.json                held by the running pipeline; expires after lock_ttl_s

Snapshots are identified by the sha256 of their ``dataset.json`` (it lists every shard, the
image count and the label-map fingerprint).
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from orchestrator import storage
from orchestrator.config import (
    BENCHMARK_METRIC,
    ConfigError,
    ExperimentConfig,
    Metric,
    RetrainConfig,
    val_targets,
)
from orchestrator.data import format as fmt
from orchestrator.locks import LockHeldError, expiring_lock

CHAMPION = "champion.json"
LOCK = "lock.json"
HISTORY = "history.jsonl"


class Outcome(enum.IntEnum):
    """The exit code of ``jobs.retrain``: what happened, for the scheduler."""

    PROMOTED = 0
    REJECTED = 10  # trained and evaluated, not better than the champion by the margin
    SKIPPED = 11  # the newest snapshot was already decided
    NO_SNAPSHOT = 12  # nothing published under the snapshot prefix
    LOCKED = 13  # another run holds the registry lock


@dataclass(frozen=True)
class Snapshot:
    uri: str
    fingerprint: str  # sha256 of dataset.json

    @property
    def short(self) -> str:
        return self.fingerprint.removeprefix("sha256:")[:12]


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    snapshot: Snapshot | None
    metrics: dict[str, Any]
    message: str


def newest_snapshot(prefix: str) -> Snapshot | None:
    """The snapshot whose ``dataset.json`` was published last (it is written last, so its
    time is the snapshot's completion time)."""
    found = storage.glob(prefix, f"*/{fmt.META_FILE}")
    if not found:
        return None
    fs, _ = storage.filesystem(prefix)
    with storage.object_errors(prefix, "listing"):
        latest = max(found, key=lambda p: (fs.modified(p).timestamp(), p))
    uri = storage.join(prefix, latest.rstrip("/").split("/")[-2])
    text = storage.read_bytes(storage.join(uri, fmt.META_FILE))
    fmt.read_meta(uri)  # complete and readable
    return Snapshot(uri, "sha256:" + hashlib.sha256(text).hexdigest())


def read_json(uri: str) -> Any:
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def history(registry: str) -> list[dict[str, Any]]:
    uri = storage.join(registry, HISTORY)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def append_history(registry: str, entry: dict[str, Any]) -> None:
    """Read, append, write back: safe because only the lock holder writes."""
    uri = storage.join(registry, HISTORY)
    old = storage.read_text(uri) if storage.exists(uri) else ""
    storage.write_text_atomic(uri, old + json.dumps(entry, sort_keys=True) + "\n")


@contextmanager
def registry_lock(registry: str, retrain: RetrainConfig) -> Iterator[str]:
    """Hold ``lock.json`` for the whole run (:func:`orchestrator.locks.expiring_lock`): a
    lock older than ``lock_ttl_s`` (a crashed run) is taken over."""
    storage.makedirs(registry)
    uri = storage.join(registry, LOCK)
    with expiring_lock(uri, ttl_s=retrain.lock_ttl_s, settle_s=retrain.lock_settle_s) as owner:
        yield owner


def check(retrain: RetrainConfig) -> None:
    """Settings present and the benchmark readable, before anything is trained."""
    for key in ("snapshots", "benchmark", "registry"):
        if not getattr(retrain, key):
            raise ConfigError(f"retrain.{key}: must be set for jobs.retrain")
    fmt.read_pairs(retrain.benchmark, fmt.read_meta(retrain.benchmark))


def run(config: ExperimentConfig) -> Decision:
    """One scheduled run; the decision says what happened and why."""
    retrain = config.retrain
    check(retrain)
    snapshot = newest_snapshot(retrain.snapshots)
    if snapshot is None:
        return Decision(
            Outcome.NO_SNAPSHOT, None, {}, f"no dataset.json under {retrain.snapshots}/*/"
        )
    try:
        with registry_lock(retrain.registry, retrain):
            return decide(config, snapshot)
    except LockHeldError as err:
        return Decision(Outcome.LOCKED, snapshot, {}, f"another run is in progress: {err}")


def decide(config: ExperimentConfig, snapshot: Snapshot) -> Decision:
    registry = config.retrain.registry
    champion = read_json(storage.join(registry, CHAMPION))
    decided = [h for h in history(registry) if h["fingerprint"] == snapshot.fingerprint]
    final = [h for h in decided if h["decision"] in ("promoted", "rejected")]
    if champion is not None and champion["fingerprint"] == snapshot.fingerprint and not final:
        # A crash after the pointer moved and before the history line: complete the record.
        record(
            registry,
            snapshot,
            decision="promoted",
            metrics=champion["metrics"],
            why="recorded after a crash",
        )
        final = [{"decision": "promoted"}]
    if final:
        message = f"snapshot {snapshot.uri} ({snapshot.short}) was already {final[-1]['decision']}"
        record(registry, snapshot, decision="skipped", metrics={}, why=message)
        return Decision(Outcome.SKIPPED, snapshot, {}, message)
    candidate = train_and_evaluate(config, snapshot, champion)
    metric, margin = config.retrain.metric, config.retrain.min_improvement
    new = candidate["metrics"][metric]
    old = None if champion is None else candidate["champion_metrics"].get(metric)
    if old is None or new >= old + margin:
        promote(registry, snapshot, candidate)
        why = "no champion yet" if old is None else f"{metric} {new:.4f} >= {old:.4f} + {margin}"
        record(
            registry,
            snapshot,
            decision="promoted",
            metrics=candidate["metrics"],
            why=why,
            champion_value=old,
        )
        return Decision(Outcome.PROMOTED, snapshot, candidate["metrics"], f"promoted: {why}")
    why = f"{metric} {new:.4f} < champion {old:.4f} + {margin}"
    record(
        registry,
        snapshot,
        decision="rejected",
        metrics=candidate["metrics"],
        why=why,
        champion_value=old,
    )
    return Decision(Outcome.REJECTED, snapshot, candidate["metrics"], f"rejected: {why}")


def candidate_config(config: ExperimentConfig, snapshot: Snapshot) -> ExperimentConfig:
    return replace(
        config,
        name=f"retrain-{snapshot.short}",
        data=replace(config.data, train=snapshot.uri, eval=config.retrain.benchmark),
    )


def train_and_evaluate(
    config: ExperimentConfig, snapshot: Snapshot, champion: dict[str, Any] | None
) -> dict[str, Any]:
    """The snapshot's candidate: trained unless its student exists, evaluated on the
    benchmark next to the champion. Saved in the registry before any decision."""
    from orchestrator.benchmarks.ijb import IjbSet
    from orchestrator.benchmarks.suite import BenchmarkPlan, run_benchmarks
    from orchestrator.evaluation import evaluate_students
    from orchestrator.runs import student_uri
    from orchestrator.train.launch import distill

    run_config = candidate_config(config, snapshot)
    student = student_uri(run_config, run_config.name)
    if storage.exists(student):
        print(f"[retrain] {student} exists: not training again", flush=True)
    else:
        print(f"[retrain] distilling on {snapshot.uri} ({snapshot.short})", flush=True)
        distill(run_config)
    students = {"candidate": student}
    if champion is not None and storage.exists(champion["student"]):
        students["champion"] = champion["student"]
    report = evaluate_students(config.retrain.benchmark, None, students).report
    targets = val_targets(config)
    benchmarks: dict[str, Any] = {}
    if targets or config.retrain.ijb:  # the .bin sets (<name>_acc) and IJB (TAR@FAR)
        plan = BenchmarkPlan(
            bins=tuple(targets.values()),
            ijb_root=config.retrain.ijb,
            ijb_set=IjbSet(config.retrain.ijb_set),
            image_size=config.data.image_size,
        )
        benchmarks, _ = run_benchmarks(plan, teacher=None, students=students)

    def metrics_of(model: str) -> dict[str, Any]:
        values = summary_metrics(report["students"].get(model, {}))
        for name, result in benchmarks.items():
            entry = result["students"].get(model)
            if entry is None:
                continue
            if result.get("kind") == "ijb":
                for far, tar in entry["tar_at_far"].items():
                    if tar is not None:
                        values[f"{name}_tar_at_far_{far}"] = tar
            else:
                values[name + BENCHMARK_METRIC] = entry["acc_10fold"]
        return values

    candidate = {
        "fingerprint": snapshot.fingerprint,
        "snapshot": snapshot.uri,
        "student": student,
        "benchmark": config.retrain.benchmark,
        "val_targets": targets,
        "metrics": metrics_of("candidate"),
        "champion_metrics": metrics_of("champion"),
    }
    uri = storage.join(config.retrain.registry, "candidates", f"{snapshot.short}.json")
    storage.write_text_atomic(uri, json.dumps(candidate, indent=2))
    return candidate


def summary_metrics(entry: dict[str, Any]) -> dict[str, Any]:
    """Every :class:`Metric` the report measured for one model, and its EER."""
    values = {m.value: m.read(entry) for m in Metric} | {"eer": entry.get("eer")}
    return {k: v for k, v in values.items() if v is not None}


def promote(registry: str, snapshot: Snapshot, candidate: dict[str, Any]) -> None:
    """Keep the new champion's record, then move the pointer (one atomic write)."""
    count = len(storage.glob(storage.join(registry, "champions"), "*.json"))
    entry = {
        "version": count + 1,
        "fingerprint": snapshot.fingerprint,
        "snapshot": snapshot.uri,
        "student": candidate["student"],
        "metrics": candidate["metrics"],
        "promoted_at": time.time(),
    }
    storage.makedirs(storage.join(registry, "champions"))
    champions = storage.join(registry, "champions", f"{count + 1:06d}.json")
    storage.write_text_atomic(champions, json.dumps(entry, indent=2))
    storage.write_text_atomic(storage.join(registry, CHAMPION), json.dumps(entry, indent=2))


def record(
    registry: str,
    snapshot: Snapshot,
    *,
    decision: str,
    metrics: dict[str, Any],
    why: str,
    champion_value: float | None = None,
) -> None:
    append_history(
        registry,
        {
            "time": time.time(),
            "fingerprint": snapshot.fingerprint,
            "snapshot": snapshot.uri,
            "decision": decision,
            "metrics": metrics,
            "champion_value": champion_value,
            "why": why,
        },
    )
