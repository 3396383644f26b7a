"""Training through Ray Train on a real local cluster: runs, resume, faults."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from jobs import distill as distill_job
from orchestrator import classifier as clf
from orchestrator import cli
from orchestrator.audit import read_epoch_audit
from orchestrator.benchmarks.suite import bin_from_eval_set, load_bin_benchmark
from orchestrator.benchmarks.verification_bin import write_bin
from orchestrator.config import (
    DecodeAt,
    Method,
    OptimConfig,
    RunConfig,
    ScalingConfig,
    dump_yaml,
)
from orchestrator.config.experiment import ExperimentConfig
from orchestrator.data import format as fmt
from orchestrator.data.prepare import SyntheticDatasets
from orchestrator.evaluation import (
    Flip,
    embed_images,
    evaluate_model,
    load_eval_set,
    pair_verification,
)
from orchestrator.formats.best import read_best
from orchestrator.formats.state import load_state
from orchestrator.formats.student import load_student, read_student_export
from orchestrator.metric_names import Metric
from orchestrator.models import build_backbone
from orchestrator.runs import student_uri
from orchestrator.train.launch import distill
from orchestrator.train.trainer import RunOutcome, summary
from tests.conftest import (
    TrainSetup,
    assert_baseline_trained,
    dataset_image_ids,
    kill_test_setup,
    registered_inside,
)
from tests.test_safe_loading import crafted

pytestmark = pytest.mark.usefixtures("ray_cluster")


@dataclass(frozen=True)
class Reference:
    config: ExperimentConfig
    outcome: RunOutcome


@pytest.fixture(scope="module")
def reference(train_setup: TrainSetup) -> Reference:
    """One finished run read by the tests that only read a run: proxyless, 3 epochs at 2
    workers decoding their own input, the ids audited, validated every epoch, every
    checkpoint kept (lr 0.2: the validation metric moves between epochs)."""
    base = train_setup.base
    config = replace(
        base,
        name="reference",
        optim=replace(base.optim, epochs=3, lr=0.2),
        data=replace(base.data, decode=DecodeAt.WORKER, decode_threads=2),
        run=replace(
            base.run, eval_every_epochs=1, keep_checkpoints=0, audit_ids=True, shuffle_buffer=0
        ),
    )
    return Reference(config, distill(config))


@dataclass(frozen=True)
class OneEpoch:
    config: ExperimentConfig
    outcome: RunOutcome
    multiple_instances: tuple[int, int]  # log lines naming several clusters: before, after


@pytest.fixture(scope="module")
def one_epoch(train_setup: TrainSetup) -> OneEpoch:
    """One finished one-epoch run, trained while a second Ray instance (``ray start
    --head``) runs on the host; tests resume it only in ways that are refused."""
    import ray

    from tests.test_ray_job import running_head

    node = ray._private.worker._global_node
    assert node is not None
    session = Path(node.get_session_dir_path())
    before = multiple_instances_lines(session)
    config = replace(
        train_setup.base, name="one-epoch", optim=replace(train_setup.base.optim, epochs=1)
    )
    with running_head():
        outcome = distill(config)
    return OneEpoch(config, outcome, (before, multiple_instances_lines(session)))


def multiple_instances_lines(session: Path) -> int:
    """Lines of the session's logs where a Ray process found more than one cluster."""
    return sum(
        path.read_text(errors="replace").count("Found multiple active Ray instances")
        for path in (session / "logs").rglob("*")
        if path.is_file()
    )


def test_proxyless_run_keeps_the_classifier_out_of_everything_it_saves(
    train_setup: TrainSetup, reference: Reference
) -> None:
    config, outcome = reference.config, reference.outcome
    state = outcome.state
    assert (
        state.history.epochs_done == (0, 1, 2)
        and state.history.world_sizes == (2,)
        and state.history.resumed_at == ()
    )
    # Never saved: no tensor of the classifier's shape anywhere in the checkpoint.
    shape = train_setup.classifier_weight.shape
    saved = [*state.student.values(), *state.loss.values()]
    assert state.loss == {}, "proxyless has no trainable loss parameters"
    assert all(tuple(t.shape) != shape for t in saved)
    # Never in the optimizer: its parameter list is exactly the student's.
    student_params = sum(
        1 for k, v in state.student.items() if "running" not in k and "num_batches" not in k
    )
    assert len(state.optimizer["param_groups"][0]["params"]) == student_params
    # Referred to by URI and checksum instead.
    cmeta = clf.read_meta(config.teacher.classifier)
    assert state.classifier is not None and state.classifier.checksum == clf.checksum(cmeta)
    export = read_student_export(student_uri(config, "reference"))
    assert export.classifier is not None and export.classifier.checksum == clf.checksum(cmeta)
    assert export.epochs_done == (0, 1, 2)
    model, _ = load_student(student_uri(config, "reference"))
    assert model(torch.zeros(1, 3, 112, 112)).shape == (1, 16)
    assert np.isfinite(outcome.metrics["loss"])


def test_resume_by_name_and_with_fewer_workers(train_setup: TrainSetup) -> None:
    config = replace(
        train_setup.base, name="resume", optim=replace(train_setup.base.optim, epochs=1)
    )
    first = distill(config)
    assert first.state.history.epochs_done == (0,)
    # Same name, one more epoch, one worker instead of two: continues after epoch 0.
    longer = replace(
        config,
        optim=replace(config.optim, epochs=2),
        scaling=ScalingConfig(num_workers=1, cpus_per_worker=0.5),
    )
    second = distill(longer)
    assert second.state.history.epochs_done == (0, 1)
    assert second.state.history.resumed_at == (1,)
    assert second.state.history.world_sizes == (2, 1)
    # Rerunning a finished run trains nothing and hands back its final checkpoint, with its
    # validation metrics measured again (a restored Tune trial reports them to ASHA).
    third = distill(longer)
    assert third.state.history.epochs_done == (0, 1)
    assert third.metrics["epoch"] == 1
    for key in ("val_acc_10fold", "val_auc", "val_rank1"):  # the same weights, measured again
        assert third.metrics[key] == pytest.approx(second.metrics[key], abs=1e-12), key


def test_resume_refuses_a_different_classifier(
    train_setup: TrainSetup, one_epoch: OneEpoch, tmp_path: Path
) -> None:
    config = one_epoch.config
    other = tmp_path / "other"
    meta = fmt.read_meta(config.data.train)
    clf.write_classifier(
        str(other),
        train_setup.classifier_weight[::-1].copy(),
        label_map_fingerprint=meta.label_map_fingerprint,
        source={},
    )
    swapped = replace(
        config,
        teacher=replace(config.teacher, classifier=str(other)),
        optim=replace(config.optim, epochs=2),
    )
    # Raised in the workers, re-raised in the driver as itself (not inside Ray's wrappers).
    with pytest.raises(
        clf.ClassifierError, match="refusing to resume with a different inherited classifier"
    ):
        distill(swapped)


def test_classifier_that_does_not_match_the_dataset_fails_before_training(
    train_setup: TrainSetup, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    clf.write_classifier(str(bad), np.ones((5, 16)), label_map_fingerprint="sha256:x", source={})
    config = replace(
        train_setup.base, name="bad", teacher=replace(train_setup.base.teacher, classifier=str(bad))
    )
    with pytest.raises(
        clf.ClassifierError, match=r"has num_classes=5 but dataset .* has num_classes=6"
    ):
        distill(config)
    assert not (Path(config.storage_path) / "bad").exists(), "no run was started"


def test_a_baseline_from_scratch_trains_its_own_classifier(train_setup: TrainSetup) -> None:
    """``scratch``: a margin classifier of its own, W unused. (``l2`` is asserted the same
    way in tests/test_teacher_ray.py, where it trains against an ONNX teacher.)"""
    config = replace(
        train_setup.base,
        name="m-scratch",
        loss=replace(train_setup.base.loss, method=Method.SCRATCH),
        optim=replace(train_setup.base.optim, epochs=1),
    )
    assert_baseline_trained(config, distill(config), train_setup.classifier_weight.shape)


def test_logit_kd_student_has_its_own_width(train_setup: TrainSetup) -> None:
    """Hinton KD on logits: W scores the teacher's (16-d) embeddings, the student's own head
    its 8-d ones; the run checks W against the teacher's width and trains."""
    config = replace(
        train_setup.base,
        name="logit-narrow",
        student=replace(train_setup.base.student, emb_dim=8),
        loss=replace(train_setup.base.loss, method=Method.LOGIT),
        optim=replace(train_setup.base.optim, epochs=1),
    )
    outcome = distill(config)
    assert tuple(outcome.state.loss["scratch.classifier.weight"].shape) == (6, 8)
    assert outcome.state.classifier is not None  # W was placed for the teacher's logits
    assert outcome.state.extra["classifier_layout"] == "dense"
    model, export = load_student(student_uri(config, "logit-narrow"))
    assert export.emb_dim == 8 and model(torch.zeros(1, 3, 112, 112)).shape == (1, 8)


@pytest.fixture(scope="module")
def longer_setup(tmp_path_factory: pytest.TempPathFactory) -> TrainSetup:
    return kill_test_setup(tmp_path_factory.mktemp("kill"))


class BackgroundRun:
    """``distill(config)`` on a thread of its own, so a test can act on the run meanwhile."""

    def __init__(self, config: Any) -> None:
        self.outcome: RunOutcome | None = None
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self.run, args=(config,))
        self.thread.start()

    def run(self, config: Any) -> None:
        try:
            self.outcome = distill(config)
        except BaseException as err:  # surfaced by finished()
            self.errors.append(err)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def finished(self, timeout: float) -> RunOutcome:
        self.thread.join(timeout=timeout)
        assert not self.errors, self.errors
        assert self.outcome is not None, f"the run did not finish in {timeout:g}s"
        return self.outcome


def train_worker_pids() -> list[int]:
    """The process ids of the live Ray Train workers of this session's cluster (named by its
    address: another cluster on the machine is not asked)."""
    import ray
    from ray.util.state import list_actors

    workers = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return [a.pid for a in workers if a.pid is not None]


def test_killed_worker_resumes_from_last_checkpoint(longer_setup: TrainSetup) -> None:
    epochs = 6
    config = replace(
        longer_setup.base,
        name="killed",
        optim=OptimConfig(lr=0.05, epochs=epochs, batch_size=8),
        run=RunConfig(max_failures=1, eval_every_epochs=0, shuffle_buffer=0),
    )
    background = BackgroundRun(config)
    run_dir = Path(config.storage_path) / "killed"
    deadline = time.monotonic() + 240

    # A checkpoint directory exists on disk slightly before the controller registers it;
    # once the second one is there, the first is certainly registered.
    def checkpoints() -> int:
        return len(list(run_dir.glob("checkpoint_*")))

    while checkpoints() < 2 and time.monotonic() < deadline and background.alive:
        time.sleep(0.1)
    assert checkpoints() >= 2, f"no checkpoints appeared ({background.errors})"
    pids = train_worker_pids()
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)
    state = background.finished(timeout=400).state
    # Resumed once, after the last checkpoint; every epoch trained exactly once in the
    # checkpointed history, ending at the configured count.
    assert len(state.history.resumed_at) == 1 and 1 <= state.history.resumed_at[0] < epochs
    assert state.history.epochs_done == tuple(range(epochs))
    assert state.history.world_sizes == (2, 2)


def test_a_worker_killed_inside_an_epoch_loses_no_image_and_repeats_none(
    longer_setup: TrainSetup,
) -> None:
    """Checkpoints every 4 of an epoch's 24 steps; a worker is killed once Ray Train has
    registered one of them, inside epoch 1. The run resumes inside that epoch, and the
    audit segments the checkpoints kept hold every image of every epoch exactly once."""
    config = replace(
        longer_setup.base,
        name="killed-inside",
        optim=OptimConfig(lr=0.05, epochs=2, batch_size=8),  # 192 images: 24 steps an epoch
        run=RunConfig(
            max_failures=1,
            eval_every_epochs=0,
            shuffle_buffer=0,
            checkpoint_every_steps=4,
            keep_checkpoints=0,
            audit_ids=True,
        ),
    )
    background = BackgroundRun(config)
    run_dir = Path(config.storage_path) / "killed-inside"

    def registered_inside_first_epoch() -> list[int]:
        return [step for epoch, step in registered_inside(run_dir) if epoch == 0]

    deadline = time.monotonic() + 240
    while not registered_inside_first_epoch() and time.monotonic() < deadline and background.alive:
        time.sleep(0.05)
    assert registered_inside_first_epoch(), (
        f"no checkpoint inside the epoch was registered ({background.errors})"
    )
    pids = train_worker_pids()
    assert len(pids) == 2
    killed_at = time.time()
    os.kill(pids[1], signal.SIGKILL)
    state = background.finished(timeout=400).state
    # From the loss to training again, bounded above by the first checkpoint the resumed
    # attempt wrote (4 steps after it started training).
    resumed = [
        (path.stat().st_mtime, path)
        for path in run_dir.glob("checkpoint_*/state.pt")
        if load_state(str(path.parent)).history.resumed_at
    ]
    first_after = min(resumed)[0] - killed_at
    print(f"worker killed -> first checkpoint of the resumed attempt: {first_after:.1f}s")
    assert first_after > 0
    assert state.history.epochs_done == (0, 1) and state.history.world_sizes == (2, 2)
    assert state.history.resumed_at == (0,), state.history.resumed_at  # inside the first epoch
    (inside,) = state.history.resumed_steps
    assert inside in (4, 8, 12, 16, 20), inside  # at a checkpoint inside the epoch

    all_ids = dataset_image_ids(config.data.train)
    for epoch in (0, 1):
        trained = [
            i
            for path in sorted((run_dir / "audit").glob(f"epoch-{epoch:04d}-rank-*-from-step-*"))
            for i in path.read_text().split()
        ]
        assert len(trained) == len(set(trained)), f"epoch {epoch}: images trained twice"
        assert sorted(trained) == all_ids, f"epoch {epoch}: images never trained"
    assert not (run_dir / "input" / "skip.json").exists()  # cleared after the epoch


def test_sharded_classifier_layout_in_a_real_run(reference: Reference) -> None:
    from orchestrator.config import ClassifierMode, ShardingConfig

    config = reference.config
    sharded = distill(
        replace(
            config,
            name="sharded",
            optim=replace(config.optim, epochs=1),
            sharding=ShardingConfig(mode=ClassifierMode.SHARDED, chunk_size=2),
        )
    )
    assert sharded.state.extra["classifier_layout"] == "sharded"
    # Nothing of W in the loss state: only the negative-sampling call counter.
    assert list(sharded.state.loss) == ["calls"] and np.isfinite(sharded.metrics["loss"])
    # auto: 6 x 16 floats is far below auto_min_bytes, so the same config replicates W.
    dense = reference.outcome
    assert dense.state.extra["classifier_layout"] == "dense"
    # The same student, W, seed and batches in the first epoch, but not the same quantity:
    # rank 0 reports the sharded loss over the global batch and the dense loss over its own
    # half of it.
    dense_first_epoch = dense.state.history.curves[0]["loss"]
    assert sharded.metrics["loss"] == pytest.approx(dense_first_epoch, rel=0.2)


def test_dense_classifier_is_a_view_of_the_object_store_copy() -> None:
    """Workers on one node share one copy of W: the loss's buffer is the read-only object
    store memory itself, not a per-worker copy."""
    import ray

    weight = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    weight /= np.linalg.norm(weight, axis=1, keepdims=True)
    ref = ray.put(weight)

    @ray.remote(num_cpus=0.5)
    def probe(handle: list[ray.ObjectRef]) -> tuple[bool, bool, int]:
        import warnings

        from orchestrator.config import LossConfig
        from orchestrator.losses import build_loss

        array = ray.get(handle[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            loss = build_loss(
                LossConfig(),
                num_classes=300,
                emb_dim=16,
                teacher_classifier=torch.from_numpy(array),
                normalized=True,
            )
        from orchestrator.losses.objectives import ProxylessLoss

        assert isinstance(loss, ProxylessLoss)
        buffer = loss.classifier.weight
        return (
            array.flags.writeable,
            buffer.data_ptr() == array.ctypes.data,
            len(list(loss.parameters())),
        )

    writeable, same_memory, params = ray.get(probe.remote([ref]))
    assert not writeable and same_memory and params == 0


def test_a_run_keeps_its_last_checkpoints_and_its_best_epoch(train_setup: TrainSetup) -> None:
    """Retention over five epochs: run.keep_checkpoints keeps the last two, best/ holds the
    best validated epoch (validated only after the last one here) and its student is the
    final one. Learning itself is proven where it can fail: tests/test_learning.py (held-in
    top-1 from chance to >= 0.9), tests/test_generalisation.py (a trained teacher, 50
    held-out identities, against an lr = 0 control) and tests/test_reproducible.py (the
    Ray loop replays to the same weights). The AUC comparison this test once made, against
    a random teacher on 200 pairs, could not fail (see the 2026-12-05 note)."""
    config = replace(
        train_setup.base,
        name="learns",
        optim=replace(train_setup.base.optim, epochs=5),
        run=replace(train_setup.base.run, eval_every_epochs=0, keep_checkpoints=2),
    )
    distill(config)
    # Five epochs, a checkpoint after each; run.keep_checkpoints keeps the last two, and
    # best/ the best validated epoch (validated only after the last one here).
    kept = sorted((Path(config.storage_path) / "learns").glob("checkpoint_2*"))
    assert sorted(load_state(str(k)).epoch for k in kept) == [3, 4], kept
    record = read_best(str(Path(config.storage_path) / "learns" / "best"))
    assert record is not None and record.epoch == 4
    eval_set = load_eval_set(config.data.eval)
    student, _ = load_student(student_uri(config, "learns"))
    assert record.value == pytest.approx(evaluate_model(student, eval_set)["acc_10fold"], abs=1e-6)
    best = read_student_export(str(Path(config.storage_path) / "learns" / "best" / "student.pt"))
    final = read_student_export(student_uri(config, "learns"))
    assert all(torch.equal(best.student[k], v) for k, v in final.student.items())


def test_a_tampered_checkpoint_is_refused_on_resume(
    train_setup: TrainSetup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint rewritten in the storage path with a code-running pickle: the resume
    through the CLI exits 2 naming it, and the payload never runs."""
    config = replace(
        train_setup.base, name="tampered", optim=replace(train_setup.base.optim, epochs=1)
    )
    distill(config)
    marker = tmp_path / "pwned"
    states = list((Path(config.storage_path) / "tampered").glob("checkpoint_*/state.pt"))
    assert states
    for state in states:
        state.write_bytes(crafted("ignored", marker))
    path = tmp_path / "resume.yaml"
    path.write_text(dump_yaml(replace(config, optim=replace(config.optim, epochs=2))))
    assert cli.run(distill_job.main, ["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "state.pt: refusing to load it as a training checkpoint" in err, err[-2000:]
    assert "weights_only=False" not in err
    assert not marker.exists(), "the crafted checkpoint ran code in a worker"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"use_gpu": True}, r"\+ 1 GPU and the decode pool 1 CPU: the cluster has 0 GPU"),
        ({"num_workers": 1, "cpus_per_worker": 100.0}, r"= 101 CPU: the cluster has 2"),
    ],
    ids=["gpu-without-gpus", "too-many-cpus"],
)
def test_unsatisfiable_resources_are_refused_at_once(
    train_setup: TrainSetup,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    overrides: dict[str, Any],
    expected: str,
) -> None:
    base = train_setup.base
    config = replace(
        base,
        name="too-big",
        data=replace(base.data, decode=DecodeAt.POOL),  # the message names the pool's CPUs
        scaling=replace(base.scaling, **overrides),
    )
    path = tmp_path / "big.yaml"
    path.write_text(dump_yaml(config))
    assert cli.run(distill_job.main, ["--config", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(expected, lines[0]), lines
    assert "it can never be scheduled" in lines[0]
    assert not (Path(config.storage_path) / "too-big").exists()


def test_a_rerun_with_other_settings_is_refused_unless_told(
    train_setup: TrainSetup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = replace(
        train_setup.base, name="identity", optim=replace(train_setup.base.optim, epochs=1)
    )
    path = tmp_path / "identity.yaml"
    path.write_text(dump_yaml(config))
    assert cli.run(distill_job.main, ["--config", str(path)]) == 0
    student = Path(student_uri(config, "identity"))
    trained = student.read_bytes()
    record = json.loads((student.parent / "run.json").read_text())
    assert record["fingerprint"].startswith("sha256:") and record["code_version"]
    capsys.readouterr()
    other = [
        "--config",
        str(path),
        "--set",
        "loss.margin.type=cosface",
        "--set",
        "loss.margin.m=0.4",
    ]
    assert cli.run(distill_job.main, other) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "run 'identity'" in lines[0], lines
    assert (
        "loss.margin.m: 0.5 -> 0.4" in lines[0]
        and "loss.margin.type: 'arcface' -> 'cosface'" in lines[0]
    )
    assert "--name" in lines[0] and "--resume-anyway" in lines[0] and "--force-new" in lines[0]
    assert student.read_bytes() == trained
    # Continuing a finished run with other settings trains nothing and rewrites nothing.
    assert cli.run(distill_job.main, [*other, "--resume-anyway"]) == 0
    assert student.read_bytes() == trained
    # Discarding it trains anew, and the export says so.
    assert cli.run(distill_job.main, [*other, "--force-new"]) == 0
    export = read_student_export(str(student))
    assert export.config["loss"]["margin"]["type"] == "cosface" and export.epochs_done == (0,)


def test_the_best_validated_epoch_is_kept_beside_the_last_checkpoints(
    reference: Reference,
) -> None:
    """``run.keep_best``: ``<run>/best`` holds the epoch whose validation metric is highest,
    recomputed here from every checkpoint the run kept (``keep_checkpoints: 0`` keeps all),
    and its ``student.pt`` is that epoch's student."""
    config = reference.config
    run = Path(config.storage_path) / "reference"
    record = read_best(str(run / "best"))
    assert record is not None and record.metric == Metric.ACC_10FOLD.value
    eval_set = load_eval_set(config.data.eval)
    scores: dict[int, float] = {}
    students: dict[int, dict[str, torch.Tensor]] = {}
    for directory in run.glob("checkpoint_2*"):  # checkpoint_<date>, not Ray's snapshot
        state = load_state(str(directory))
        model = build_backbone(config.student.arch, config.student.emb_dim, input_size=112)
        model.load_state_dict(state.student)
        students[state.epoch] = state.student
        # No epoch is left out: the overflow that once made this flake was BatchNorm at a
        # local batch of 2 (batch statistics of exactly +-1); the test config trains at 4.
        scores[state.epoch] = evaluate_model(model.eval(), eval_set)["acc_10fold"]
    assert sorted(students) == [0, 1, 2] == sorted(scores), scores
    assert record.value == pytest.approx(scores[record.epoch], abs=1e-6), (record, scores)
    assert record.value >= max(scores.values()) - 1e-6, (record, scores)
    # Only the best state is in best/ (an older best's file was removed when it was beaten).
    assert sorted(p.name for p in (run / "best").iterdir()) == sorted(
        ["best.json", record.state_file, "student.pt"]
    )
    best = read_student_export(str(run / "best" / "student.pt"))
    for key, tensor in students[record.epoch].items():
        assert torch.equal(best.student[key], tensor), key


def test_val_targets_are_validated_each_epoch_and_can_pick_the_best(
    train_setup: TrainSetup, tiny_synthetic: SyntheticDatasets, tmp_path: Path
) -> None:
    """``run.val_targets``: a ``.bin`` set validated with ``data.eval``; its
    ``val_<name>_acc`` is the 10-fold accuracy of the exported student on it (flip sum),
    and ``run.best_metric: <name>_acc`` keeps the epoch it ranks best."""
    vb = bin_from_eval_set(tiny_synthetic.eval_uri)
    bin_uri = str(tmp_path / "frozen_eval.bin")
    write_bin(bin_uri, list(vb.images), vb.issame)
    config = replace(
        train_setup.base,
        name="val-targets",
        optim=replace(train_setup.base.optim, epochs=2),
        run=replace(
            train_setup.base.run,
            eval_every_epochs=1,
            val_targets=(bin_uri,),
            best_metric="frozen_eval_acc",
        ),
    )
    outcome = distill(config)
    student, _ = load_student(student_uri(config, "val-targets"))
    bench = load_bin_benchmark(bin_uri)
    again = pair_verification(bench.pairs, embed_images(student, bench.images, flip=Flip.SUM))
    assert outcome.metrics["val_frozen_eval_acc"] == pytest.approx(again["acc_10fold"], abs=1e-9)
    record = read_best(str(Path(config.storage_path) / "val-targets" / "best"))
    assert record is not None and record.metric == "frozen_eval_acc"
    # The best epoch is the one whose validation was highest, recomputed from the kept
    # states: the last (this student) or the first (its checkpoint).
    run = Path(config.storage_path) / "val-targets"
    first = [d for d in run.glob("checkpoint_2*") if load_state(str(d)).epoch == 0]
    scores = {1: again["acc_10fold"]}
    for directory in first:
        model = build_backbone(config.student.arch, config.student.emb_dim)
        model.load_state_dict(load_state(str(directory)).student)
        emb = embed_images(model.eval(), bench.images, flip=Flip.SUM)
        scores[0] = pair_verification(bench.pairs, emb)["acc_10fold"]
    assert sorted(scores) == [0, 1], "both epochs' states are kept (keep_checkpoints 2)"
    best = max(scores, key=lambda e: (scores[e], -e))  # ties: the earlier epoch is kept
    assert record.epoch == best and record.value == pytest.approx(scores[best], abs=1e-9)


def test_a_slowed_input_shows_in_the_input_wait_share(
    train_setup: TrainSetup, reference: Reference
) -> None:
    """A one-epoch run with its input held to 8 images/s against the reference run, whose
    input is not held: the share of the epoch (after its first batch) spent waiting for
    input is higher there, and the per-epoch figures reach the summary, the checkpoint and
    student.pt."""
    starved = replace(
        train_setup.base,
        name="wait-starved",
        data=replace(train_setup.base.data, throttle_images_per_s=8.0),
        optim=replace(train_setup.base.optim, epochs=1),
    )
    shares = {}
    for name, config, outcome in (
        ("fed", reference.config, reference.outcome),
        ("starved", starved, distill(starved)),
    ):
        shares[name] = outcome.metrics["input_wait_share"]
        assert len(outcome.state.history.throughput) == config.optim.epochs
        rate, wait = outcome.state.history.throughput[-1]
        assert wait == shares[name] and rate == outcome.metrics["samples_per_s"]
        export = read_student_export(student_uri(config, config.name))
        assert export.throughput == outcome.state.history.throughput
        assert summary(outcome)["throughput"][-1]["input_wait_share"] == round(wait, 3)
    assert shares["starved"] > shares["fed"], shares
    assert shares["starved"] > 0.5, shares  # held 0.5 s per 2-image batch, steps of ~ms


def test_workers_that_decode_their_own_input_see_every_image_once(
    reference: Reference,
) -> None:
    """``data.decode: worker``: no decode pool, the JPEG bytes are split between the two
    workers and decoded there; each image reaches exactly one worker per epoch."""
    config, outcome = reference.config, reference.outcome
    assert outcome.state.history.epochs_done == tuple(range(config.optim.epochs))
    assert np.isfinite(outcome.state.history.throughput[0][0])
    all_ids = dataset_image_ids(config.data.train)
    for epoch in range(config.optim.epochs):
        audit = read_epoch_audit(str(Path(config.storage_path) / "reference"), epoch)
        # 18 images, 9 per rank at a local batch of 4: 8 trained and 1 skipped on each.
        assert {r: len(ids) for r, ids in audit.trained.items()} == {0: 8, 1: 8}
        assert {r: len(ids) for r, ids in audit.skipped.items()} == {0: 1, 1: 1}
        assert sorted(audit.all_trained() + audit.all_skipped()) == all_ids  # every image, once


def test_the_dense_classifier_is_one_shared_copy_per_node() -> None:
    """Two workers on one node that take the dense classifier from the object store
    (builders.shared_classifier) read the node's one copy: the same bytes of the same
    shared-memory file, read-only; neither holds a private copy of W."""
    import ray

    from orchestrator.formats.loading import ClassifierRef
    from orchestrator.train.builders import shared_classifier
    from orchestrator.train.spec import DenseClassifier

    class Holder:
        def view(self, source: DenseClassifier) -> tuple[tuple[str, int], bool, float]:
            self.weight = shared_classifier(source)  # kept: the mapping stays while held
            stored = ray.get(source.weights)  # what the store hands out: read-only
            return (
                self.mapping_of(self.weight.data_ptr()),
                stored.flags.writeable,
                float(self.weight.sum()),
            )

        @staticmethod
        def mapping_of(address: int) -> tuple[str, int]:
            """The file (device:inode) this process has mapped at ``address``, and the
            offset into it: two processes that see one shared copy name the same place."""
            for line in Path("/proc/self/maps").read_text().splitlines():
                fields = line.split()
                low, high = (int(part, 16) for part in fields[0].split("-"))
                if low <= address < high:
                    return f"{fields[3]}:{fields[4]}", int(fields[2], 16) + address - low
            raise LookupError(f"address {address:#x} is not mapped")

    remote_holder: Any = ray.remote(num_cpus=0)(Holder)

    weight = np.random.default_rng(0).normal(size=(2000, 64)).astype(np.float32)  # 512 KB
    source = DenseClassifier(ClassifierRef("memory://w", "0"), ray.put(weight))
    holders = [remote_holder.remote() for _ in range(2)]
    views = ray.get([h.view.remote(source) for h in holders])
    (first_place, first_writeable, first_sum), (second_place, second_writeable, second_sum) = views
    assert first_place == second_place, views  # one copy, mapped by both
    assert not first_place[0].endswith(":0"), views  # a file mapping, not private memory
    assert not first_writeable and not second_writeable
    assert first_sum == second_sum == pytest.approx(float(weight.sum()), rel=1e-6)
    for holder in holders:
        ray.kill(holder)


def test_another_ray_on_the_host_does_not_disturb_a_run(one_epoch: OneEpoch) -> None:
    """A second Ray instance (ray start --head) beside the private cluster: Ray Train's
    PlacementGroupCleaner looks the cluster up through the State API every second, and
    found "multiple active Ray instances" (a 27-line traceback per run) until the private
    cluster's workers were given its address (orchestrator.ray_hook)."""
    assert one_epoch.outcome.state.history.epochs_done == (0,)
    before, after = one_epoch.multiple_instances
    assert after == before
