"""jobs.retrain against a registry on the embedded S3 server: promote, skip, reject, a crash
between training and promotion, and two runs at once; each checked through the registry
and the history file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from orchestrator import storage
from orchestrator.benchmarks.suite import bin_from_eval_set, load_bin_benchmark
from orchestrator.benchmarks.verification_bin import write_bin
from orchestrator.config import (
    ExperimentConfig,
    OptimConfig,
    RetrainConfig,
    SyntheticConfig,
    TrackingConfig,
)
from orchestrator.data.prepare import SyntheticDatasets, write_synthetic
from orchestrator.errors import MissingMetricError
from orchestrator.evaluation import Flip, embed_images, pair_verification
from orchestrator.formats.student import load_student
from orchestrator.objectstore import EmbeddedObjectStore
from orchestrator.retrain import Outcome, candidate_config, newest_snapshot
from orchestrator.runs import student_uri
from orchestrator.train.launch import distill
from tests.conftest import BUCKET, REPO, make_train_setup
from tests.mlflow_server import MlflowServer
from tests.test_benchmarks import independent_ijb, write_ijb_tree

pytestmark = pytest.mark.usefixtures("ray_cluster")  # its workers read the S3 server
ROOT = f"s3://{BUCKET}/retrain"


def publish_snapshot(store: EmbeddedObjectStore, prefix: str, name: str, seed: int) -> str:
    """A snapshot: the training split of a synthetic set (same 6 identities, other faces)."""
    generated = write_synthetic(
        SyntheticConfig(
            out=f"{ROOT}/generated/{prefix.split('/')[-2]}-{name}",
            num_identities=6,
            eval_identities=20,
            images_per_identity=3,
            pairs_per_fold=4,  # 2 identities of 3 images per fold: 6 distinct positives
            seed=seed,
        )
    )
    fs = store.client()
    source = generated.train_uri.removeprefix("s3://")
    target = f"{prefix}/{name}".removeprefix("s3://")
    for path in sorted(fs.find(source), key=lambda p: p.endswith("dataset.json")):
        fs.copy(path, target + path[len(source) :])  # dataset.json last, as writers do
    time.sleep(1.1)  # object times have 1 s resolution: the next snapshot is newer
    return f"{prefix}/{name}"


@pytest.fixture(scope="module")
def base(tiny_synthetic: SyntheticDatasets, mlflow_server: MlflowServer) -> ExperimentConfig:
    setup = make_train_setup(f"{ROOT}/teacher", tiny_synthetic)
    return replace(
        setup.base,
        storage_path=f"{ROOT}/runs",
        optim=OptimConfig(lr=0.05, epochs=1, batch_size=8),
        retrain=RetrainConfig(benchmark=tiny_synthetic.eval_uri, lock_settle_s=0.2),
        # Every decision is mirrored in the MLflow registry (mirrored() checks it).
        tracking=TrackingConfig(uri=mlflow_server.uri, experiment="retrain"),
    )


def configured(base: ExperimentConfig, case: str, **retrain: object) -> ExperimentConfig:
    settings = {"snapshots": f"{ROOT}/{case}/snapshots", "registry": f"{ROOT}/{case}/registry"}
    tracking = replace(base.tracking, registered_model=f"retrain-{case}")
    return replace(
        base,
        retrain=replace(base.retrain, **{**settings, **retrain}),  # type: ignore[arg-type]
        tracking=tracking,
    )


def mirrored(config: ExperimentConfig) -> dict[str, Any]:
    """Check that MLflow's registered model agrees with the registry: a version per
    evaluated candidate (by fingerprint) with its final decision, and the champion alias on
    the champion's version (no alias without a champion). Returns the versions by
    fingerprint."""
    mlflow = MlflowClient(tracking_uri=config.tracking.uri)
    model = config.tracking.registered_model
    versions = {v.tags["fingerprint"]: v for v in mlflow.search_model_versions(f"name='{model}'")}
    registry = config.retrain.registry
    names = storage.file_names(f"{registry}/candidates")
    candidates = [json.loads(storage.read_text(f"{registry}/candidates/{n}")) for n in names]
    pointer = f"{registry}/champion.json"
    best = json.loads(storage.read_text(pointer)) if storage.exists(pointer) else None
    expected = {c["fingerprint"] for c in candidates} | ({best["fingerprint"]} if best else set())
    assert set(versions) == expected
    for entry in history(config) if storage.exists(f"{registry}/history.jsonl") else []:
        if entry["decision"] in ("promoted", "rejected"):
            assert versions[entry["fingerprint"]].tags["decision"] == entry["decision"]
    aliases = mlflow.get_registered_model(model).aliases if versions else {}
    if best is None:
        assert "champion" not in aliases
    else:
        assert aliases["champion"] == versions[best["fingerprint"]].version
        assert versions[best["fingerprint"]].source == best["student"]
    return versions


def history(config: ExperimentConfig) -> list[dict]:
    text = storage.read_text(f"{config.retrain.registry}/history.jsonl")
    return [json.loads(line) for line in text.splitlines()]


def champion(config: ExperimentConfig) -> dict:
    return json.loads(storage.read_text(f"{config.retrain.registry}/champion.json"))


def run(config: ExperimentConfig) -> Outcome:
    from orchestrator.retrain import run as run_pipeline

    return run_pipeline(config).outcome


def test_no_snapshot(base: ExperimentConfig) -> None:
    assert run(configured(base, "empty")) is Outcome.NO_SNAPSHOT


def test_promote_then_skip_without_retraining_then_reject_and_keep_the_champion(
    base: ExperimentConfig, object_store: EmbeddedObjectStore
) -> None:
    config = configured(base, "first")
    uri = publish_snapshot(object_store, config.retrain.snapshots, "2026-01", seed=11)
    assert run(config) is Outcome.PROMOTED
    snapshot = newest_snapshot(config.retrain.snapshots)
    assert snapshot is not None and snapshot.uri == uri
    student = student_uri(candidate_config(config, snapshot), f"retrain-{snapshot.short}")
    assert champion(config)["student"] == student and champion(config)["version"] == 1
    assert len(mirrored(config)) == 1
    trained_at = object_store.client().modified(student.removeprefix("s3://"))
    assert run(config) is Outcome.SKIPPED
    assert len(mirrored(config)) == 1
    assert object_store.client().modified(student.removeprefix("s3://")) == trained_at
    decisions = [h["decision"] for h in history(config)]
    assert decisions == ["promoted", "skipped"]
    assert history(config)[0]["metrics"]["acc_10fold"] == champion(config)["metrics"]["acc_10fold"]
    assert not storage.exists(f"{config.retrain.registry}/lock.json")  # released

    # A rejection keeps the champion (the same registry, one training fewer for the suite).
    first = champion(config)
    publish_snapshot(object_store, config.retrain.snapshots, "2026-02", seed=12)
    strict = replace(config, retrain=replace(config.retrain, min_improvement=2.0))  # unreachable
    assert run(strict) is Outcome.REJECTED
    assert champion(config) == first
    assert len(mirrored(config)) == 2  # the rejected one a version too, the alias unmoved
    last = history(config)[-1]
    assert last["decision"] == "rejected" and last["snapshot"].endswith("2026-02")
    assert last["champion_value"] is not None and "acc_10fold" in last["metrics"]
    assert run(strict) is Outcome.SKIPPED  # decided: not evaluated again
    # The champion's student disappears (its record is made to name a file that is gone:
    # the run itself is shared with other tests): the next snapshot is refused before it
    # trains, never promoted as if there were no champion.
    pointer = f"{config.retrain.registry}/champion.json"
    lost = {**first, "student": first["student"].replace("/student.pt", "/lost/student.pt")}
    storage.write_text_atomic(pointer, json.dumps(lost))
    first = lost
    publish_snapshot(object_store, config.retrain.snapshots, "2026-03", seed=14)
    with pytest.raises(MissingMetricError, match=r"champion's student .* does not exist"):
        run(config)
    assert champion(config) == first
    assert [h["decision"] for h in history(config)][-1] == "skipped"
    third = newest_snapshot(config.retrain.snapshots)
    assert third is not None and third.uri.endswith("2026-03")
    assert not storage.exists(
        student_uri(candidate_config(config, third), f"retrain-{third.short}")
    )


def test_crash_between_training_and_promotion_is_completed_once(
    base: ExperimentConfig, object_store: EmbeddedObjectStore
) -> None:
    config = configured(base, "crash", lock_ttl_s=3600.0)
    publish_snapshot(object_store, config.retrain.snapshots, "2026-01", seed=13)
    snapshot = newest_snapshot(config.retrain.snapshots)
    assert snapshot is not None
    # What a run killed after training leaves: the candidate's student, and its lock,
    # expired by now (written with an expiry in the past).
    distill(candidate_config(config, snapshot))
    student = student_uri(candidate_config(config, snapshot), f"retrain-{snapshot.short}")
    trained_at = object_store.client().modified(student.removeprefix("s3://"))
    storage.write_text_atomic(
        f"{config.retrain.registry}/lock.json",
        json.dumps({"owner": "crashed:1", "expires_at": time.time() - 1}),
    )
    assert run(config) is Outcome.PROMOTED
    assert len(mirrored(config)) == 1
    assert object_store.client().modified(student.removeprefix("s3://")) == trained_at
    # Killed again after the pointer moved, before the history line: the next run records
    # the promotion and promotes nothing twice.
    lines = storage.read_text(f"{config.retrain.registry}/history.jsonl").splitlines()
    storage.write_text_atomic(f"{config.retrain.registry}/history.jsonl", "")
    assert len(lines) == 1
    assert run(config) is Outcome.SKIPPED
    decisions = [h["decision"] for h in history(config)]
    assert decisions == ["promoted", "skipped"]
    assert len(mirrored(config)) == 1
    champions = object_store.client().glob(
        f"{config.retrain.registry.removeprefix('s3://')}/champions/*.json"
    )
    assert len(champions) == 1


def test_a_live_lock_stops_a_second_run(
    base: ExperimentConfig, object_store: EmbeddedObjectStore
) -> None:
    config = configured(base, "locked")
    publish_snapshot(object_store, config.retrain.snapshots, "2026-01", seed=14)
    storage.write_text_atomic(
        f"{config.retrain.registry}/lock.json",
        json.dumps({"owner": "other:7", "expires_at": time.time() + 600}),
    )
    assert run(config) is Outcome.LOCKED
    assert not storage.exists(f"{config.retrain.registry}/history.jsonl")


def test_two_overlapping_runs_never_both_decide(
    base: ExperimentConfig, object_store: EmbeddedObjectStore, tmp_path: Path
) -> None:
    config = configured(base, "concurrent", lock_settle_s=2.0)
    publish_snapshot(object_store, config.retrain.snapshots, "2026-01", seed=15)
    from orchestrator.config import dump_yaml

    path = tmp_path / "retrain.yaml"
    path.write_text(dump_yaml(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    command = [sys.executable, "-m", "jobs.retrain", "--config", str(path)]
    runs = [
        subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [r.communicate(timeout=500)[0] for r in runs]
    codes = sorted(r.returncode for r in runs)
    assert codes == [Outcome.PROMOTED, Outcome.LOCKED], outputs
    decisions = [h["decision"] for h in history(config)]
    assert decisions == ["promoted"]
    locked = outputs[[r.returncode for r in runs].index(Outcome.LOCKED)]
    assert "another run is in progress" in locked, locked


def test_the_gate_can_be_a_bin_benchmark(
    base: ExperimentConfig,
    object_store: EmbeddedObjectStore,
    tiny_synthetic: SyntheticDatasets,
    tmp_path: Path,
) -> None:
    """``retrain.metric: <name>_acc`` with ``run.val_targets``: the candidate is scored on
    the ``.bin`` set (on object storage here), and the recorded value is the exported
    student's 10-fold accuracy on it."""
    vb = bin_from_eval_set(tiny_synthetic.eval_uri)
    bin_uri = f"{ROOT}/bench/frozen.bin"
    write_bin(bin_uri, list(vb.images), vb.issame)
    ijb = tmp_path / "IJBC"  # a local IJB tree beside the S3 registry
    write_ijb_tree(ijb)
    gated = replace(base, run=replace(base.run, val_targets=(bin_uri,)))
    config = configured(gated, "bin-gate", metric="frozen_acc", ijb=str(ijb))
    publish_snapshot(object_store, config.retrain.snapshots, "2026-01", seed=11)
    assert run(config) is Outcome.PROMOTED
    record = champion(config)
    student, _ = load_student(record["student"])
    bench = load_bin_benchmark(bin_uri)
    again = pair_verification(bench.pairs, embed_images(student, bench.images, flip=Flip.SUM))
    assert record["metrics"]["frozen_acc"] == pytest.approx(again["acc_10fold"], abs=1e-9)
    # retrain.ijb: the IJB TARs are recorded too (a gate may name them), as computed here.
    expected = independent_ijb(ijb, student)["tar_at_far"]
    recorded = {
        k.removeprefix("IJBC_tar_at_far_"): v
        for k, v in record["metrics"].items()
        if k.startswith("IJBC_")
    }
    assert recorded == pytest.approx({k: v for k, v in expected.items() if v is not None})
    # The next snapshot is judged on that metric (an unreachable margin: rejected).
    publish_snapshot(object_store, config.retrain.snapshots, "2026-02", seed=12)
    strict = replace(config, retrain=replace(config.retrain, min_improvement=2.0))
    assert run(strict) is Outcome.REJECTED
    why = history(config)[-1]["why"]
    assert why.startswith("frozen_acc ") and "< champion" in why, why
