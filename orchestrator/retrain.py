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
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from orchestrator import storage
from orchestrator.benchmarks.ijb import IjbSet
from orchestrator.benchmarks.suite import BenchmarkPlan, run_benchmarks
from orchestrator.config import ConfigError, ExperimentConfig, RetrainConfig, val_targets
from orchestrator.data import format as fmt
from orchestrator.errors import MissingMetricError
from orchestrator.evaluation import evaluate_students
from orchestrator.locks import LockHeldError, expiring_lock
from orchestrator.metric_names import BENCHMARK_METRIC, Metric
from orchestrator.runs import student_uri
from orchestrator.storage import StorageError
from orchestrator.tracking.registry import mirror_registry
from orchestrator.train.launch import distill

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
    fingerprint = fmt.dataset_fingerprint(uri)
    fmt.read_meta(uri)  # complete and readable
    return Snapshot(uri, fingerprint)


# The keys every registry record must have, with their types: a record that lacks one,
# or is not JSON, is refused naming the file (and line), before anything is decided.
CHAMPION_KEYS: dict[str, type] = {"student": str, "fingerprint": str, "metrics": dict}
HISTORY_KEYS: dict[str, type] = {"fingerprint": str, "decision": str}


def registry_record(text: str, where: str, keys: dict[str, type]) -> Any:
    """One registry record parsed from ``text`` and checked for ``keys``."""
    try:
        record = json.loads(text)
    except ValueError as err:
        raise StorageError(f"{where}: not valid JSON ({err}); the registry is damaged") from None
    if not isinstance(record, dict):
        raise StorageError(f"{where}: expected a JSON object, found {type(record).__name__}")
    wrong = [k for k, kind in keys.items() if not isinstance(record.get(k), kind)]
    if wrong:
        expected = ", ".join(f"{k}: {keys[k].__name__}" for k in wrong)
        raise StorageError(f"{where}: missing or mistyped keys (expected {expected})")
    return record


def read_champion(registry: str) -> dict[str, Any] | None:
    uri = storage.join(registry, CHAMPION)
    if not storage.exists(uri):
        return None
    return dict(registry_record(storage.read_text(uri), uri, CHAMPION_KEYS))


def history(registry: str) -> list[dict[str, Any]]:
    uri = storage.join(registry, HISTORY)
    if not storage.exists(uri):
        return []
    return [
        dict(registry_record(line, f"{uri} line {number}", HISTORY_KEYS))
        for number, line in enumerate(storage.read_text(uri).splitlines(), start=1)
        if line.strip()
    ]


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
            try:
                return decide(config, snapshot)
            finally:  # also after a refusal: MLflow shows what the registry holds
                mirror(config)
    except LockHeldError as err:
        return Decision(Outcome.LOCKED, snapshot, {}, f"another run is in progress: {err}")


def mirror(config: ExperimentConfig) -> None:
    """MLflow's registered model made to agree with the registry (under its lock)."""
    registry = config.retrain.registry
    where = storage.join(registry, "candidates")
    candidates = [
        dict(json.loads(storage.read_text(storage.join(where, name))))
        for name in sorted(storage.file_names(where))
        if name.endswith(".json")
    ]
    decisions = {
        h["fingerprint"]: h["decision"]
        for h in history(registry)
        if h["decision"] in ("promoted", "rejected")
    }
    mirror_registry(
        config, candidates=candidates, decisions=decisions, champion=read_champion(registry)
    )


def decide(config: ExperimentConfig, snapshot: Snapshot) -> Decision:
    registry = config.retrain.registry
    champion = read_champion(registry)
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
    if champion is not None:
        check_champion_measurable(registry, champion)  # before hours of training
    candidate = train_and_evaluate(config, snapshot, champion)
    verdict = gate(
        config.retrain.metric,
        candidate=candidate["metrics"],
        champion=None if champion is None else candidate["champion_metrics"],
        margin=config.retrain.min_improvement,
        where=f"{registry}/candidates/{snapshot.short}.json",
    )
    decision = "promoted" if verdict.promote else "rejected"
    if verdict.promote:
        promote(registry, snapshot, candidate)
    record(
        registry,
        snapshot,
        decision=decision,
        metrics=candidate["metrics"],
        why=verdict.why,
        champion_value=verdict.champion_value,
    )
    outcome = Outcome.PROMOTED if verdict.promote else Outcome.REJECTED
    return Decision(outcome, snapshot, candidate["metrics"], f"{decision}: {verdict.why}")


@dataclass(frozen=True)
class Verdict:
    promote: bool
    why: str
    champion_value: float | None  # None only when there is no champion at all


def gate(
    metric: str,
    *,
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    margin: float,
    where: str,
) -> Verdict:
    """The promotion rule, on the two models' measured metrics: promote when there is no
    champion, or when the candidate's ``metric`` is at least the champion's plus ``margin``.

    ``champion`` is None only when the registry has no champion; a champion that exists
    but whose metrics could not be measured (its student file gone, a TAR undefined at that
    FAR, a non-finite value) is passed as its (incomplete) metrics and is an error, as is
    a candidate without the metric: neither side's absence ever decides."""
    new = finite_metric(candidate, metric, model="candidate", where=where)
    if champion is None:
        return Verdict(True, f"no champion yet ({metric} {new:.4f})", None)
    old = finite_metric(champion, metric, model="champion", where=where)
    if new >= old + margin:
        return Verdict(True, f"{metric} {new:.4f} >= champion {old:.4f} + {margin}", old)
    return Verdict(False, f"{metric} {new:.4f} < champion {old:.4f} + {margin}", old)


def check_champion_measurable(registry: str, champion: dict[str, Any]) -> None:
    if not storage.exists(champion["student"]):
        raise MissingMetricError(
            f"{storage.join(registry, CHAMPION)}: the champion's student {champion['student']} "
            "does not exist, so it cannot be measured and nothing can be compared with it; "
            "restore the file, or remove champion.json to promote the next candidate "
            "without a comparison"
        )


def finite_metric(metrics: dict[str, Any], metric: str, *, model: str, where: str) -> float:
    value = metrics.get(metric)
    if value is None or not isinstance(value, int | float) or not math.isfinite(value):
        found = "missing" if value is None else repr(value)
        measured = ", ".join(sorted(metrics)) or "nothing"
        raise MissingMetricError(
            f"{where}: the {model}'s {metric} is {found} (measured: {measured}); "
            "no decision is taken without both numbers, nothing was promoted"
        )
    return float(value)


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
    run_config = candidate_config(config, snapshot)
    student = student_uri(run_config, run_config.name)
    if storage.exists(student):
        print(f"[retrain] {student} exists: not training again", flush=True)
    else:
        print(f"[retrain] distilling on {snapshot.uri} ({snapshot.short})", flush=True)
        distill(run_config)
    students = {"candidate": student}
    if champion is not None:
        check_champion_measurable(config.retrain.registry, champion)
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
