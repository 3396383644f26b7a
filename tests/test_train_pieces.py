"""The pure pieces of the training loop, without Ray: the schedule and its "is it due"
checks, the run history across attempts, the per-epoch report, the choice of the best
epoch, where an epoch starts after a resume, and the history's place in a checkpoint."""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.audit import RowsAudit, read_rows_audit, write_rows_audit
from orchestrator.data.consumed import EpochProgress
from orchestrator.formats.best import BestRecord
from orchestrator.formats.state import (
    RunHistory,
    TrainingState,
    state_bytes,
    state_from_data,
)
from orchestrator.train.checkpoints import resume_line
from orchestrator.train.distributed import unwrap
from orchestrator.train.history import (
    EpochStats,
    after_epoch,
    history_at_start,
    report_metrics,
    with_validation,
)
from orchestrator.train.midepoch import epoch_progress, inside_line, inside_metrics
from orchestrator.train.schedule import checkpoint_due, lr_at, validation_due
from orchestrator.train.validation import NONFINITE_KEY, new_best


def test_due_checks_follow_the_every_settings_and_always_include_the_last_epoch() -> None:
    epochs = 7
    assert [e for e in range(epochs) if validation_due(e, epochs=epochs, every=0)] == [6]
    assert [e for e in range(epochs) if validation_due(e, epochs=epochs, every=3)] == [2, 5, 6]
    assert [e for e in range(epochs) if checkpoint_due(e, epochs=epochs, every=1)] == list(range(7))
    assert [e for e in range(epochs) if checkpoint_due(e, epochs=epochs, every=4)] == [3, 6]


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_zero() -> None:
    total, warmup, base = 100, 10, 0.4
    assert lr_at(0, total_steps=total, warmup_steps=warmup, base_lr=base) == pytest.approx(0.04)
    assert lr_at(9, total_steps=total, warmup_steps=warmup, base_lr=base) == pytest.approx(base)
    middle = lr_at(55, total_steps=total, warmup_steps=warmup, base_lr=base)
    assert middle == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(total, total_steps=total, warmup_steps=warmup, base_lr=base) == pytest.approx(0)


def _stats(epoch: int, seconds: float, steps: int = 3) -> EpochStats:
    return EpochStats(
        epoch=epoch,
        losses=(2.0, 1.0, 0.0)[:steps],
        seconds=seconds,
        lr=0.1,
        global_batch=8,
        input_wait_s=1.0,
        input_startup_s=2.0,
        after_first_step_s=seconds - 2.0,
    )


def _state(epoch: int, history: RunHistory, progress: EpochProgress | None = None) -> TrainingState:
    return TrainingState(epoch, {}, {}, {}, None, {}, history=history, progress=progress)


def test_history_grows_per_epoch_and_per_attempt() -> None:
    first = history_at_start(None, world_size=4)
    assert first == RunHistory(world_sizes=(4,))
    first = after_epoch(first, 0, _stats(0, 10.0), "teacher.pt")
    first = after_epoch(first, 1, _stats(1, 6.0))
    assert first.epochs_done == (0, 1) and first.train_seconds == pytest.approx(16.0)
    assert first.teachers == ("teacher.pt", "")
    # 3 steps of 8 images in 10 s; 1 s waiting of the 8 s after the 2 s start-up.
    assert first.throughput[0] == (pytest.approx(3 * 8 / 10.0), pytest.approx(1.0 / 8.0))
    # Resumed after epoch 1 at 2 workers, then inside epoch 3 (its step 12) at 3 workers.
    second = history_at_start(_state(1, first), world_size=2)
    assert second.resumed_at == (2,) and second.world_sizes == (4, 2)
    assert second.resumed_steps == (0,)
    inside = EpochProgress.start(3).after(["a", "b"], steps=12)
    third = history_at_start(_state(2, second, progress=inside), world_size=3)
    assert third.resumed_at == (2, 3) and third.resumed_steps == (0, 12)
    assert third.world_sizes == (4, 2, 3) and third.epochs_done == (0, 1)


def test_the_history_keeps_its_place_in_the_checkpoint_file() -> None:
    """One typed record in memory; on disk the keys of earlier releases (teachers and the
    per-resume steps in ``extra``), so older checkpoints still load."""
    history = RunHistory(
        epochs_done=(0, 1),
        resumed_at=(1,),
        world_sizes=(2, 1),
        train_seconds=3.5,
        throughput=((10.0, 0.25), (12.0, 0.5)),
        teachers=("t.pt", "t.pt"),
        resumed_steps=(0,),
        curves=({"epoch": 0.0, "step": 4.0, "loss": 2.5}, {"epoch": 1.0, "step": 8.0, "loss": 2.0}),
    )
    state = _state(1, history)
    data = torch.load(io.BytesIO(state_bytes(state)), weights_only=True)
    assert data["epochs_done"] == [0, 1] and data["world_sizes"] == [2, 1]
    assert data["extra"] == {
        "teacher_by_epoch": ["t.pt", "t.pt"],
        "resumed_at_step": [0],
        "epoch_metrics": [dict(c) for c in history.curves],
    }
    back = state_from_data(data, "test")
    assert back.history == history and back.extra == {}
    older = {key: value for key, value in data.items() if key not in ("throughput", "extra")}
    assert state_from_data(older, "old").history == RunHistory(
        epochs_done=(0, 1), resumed_at=(1,), world_sizes=(2, 1), train_seconds=3.5
    )


def test_report_metrics_of_a_trained_epoch_and_of_a_rerun() -> None:
    history = after_epoch(history_at_start(None, 2), 0, _stats(0, 10.0))
    trained = report_metrics(
        history, _stats(0, 10.0), start_epoch=0, validation={"val_auc": 0.9}, best_epoch=0
    )
    assert trained["epochs_this_attempt"] == 1 and trained["best_epoch"] == 0
    assert trained["loss"] == pytest.approx(1.0) and trained["val_auc"] == 0.9
    assert trained["steady_samples_per_s"] == pytest.approx(2 * 8 / 8.0)
    rerun = report_metrics(
        history, EpochStats(epoch=0), start_epoch=1, validation={}, best_epoch=None
    )
    assert rerun["epochs_this_attempt"] == 0
    assert "loss" not in rerun and "best_epoch" not in rerun
    assert rerun["epochs_done"] == [0] and rerun["world_sizes"] == [2]


def test_each_trained_epoch_records_its_curve_and_only_its_own_validation() -> None:
    stats = _stats(0, 10.0)
    history = after_epoch(history_at_start(None, 2), 0, stats, step=4)
    assert history.curves == (
        {
            "epoch": 0.0,
            "step": 4.0,
            "loss": stats.mean_loss,
            "lr": stats.lr,
            "samples_per_s": stats.samples_per_s,
            "input_startup_s": stats.input_startup_s,
            "input_wait_share": stats.input_wait_share,
        },
    )
    validated = with_validation(history, 0, {"val_auc": 0.75})
    assert validated.curves[0]["val_auc"] == 0.75 and "val_auc" not in history.curves[0]
    assert with_validation(validated, 1, {"val_auc": 0.5}) == validated  # not its epoch
    second = after_epoch(validated, 1, _stats(1, 10.0), step=8)
    assert [c["step"] for c in second.curves] == [4.0, 8.0] and "val_auc" not in second.curves[1]
    metrics = report_metrics(
        second, _stats(1, 10.0), start_epoch=0, validation={"val_auc": 0.75}, best_epoch=0
    )
    # The tracker's step, and the validation of an earlier epoch not claimed as this one's.
    assert metrics["global_step"] == 8 and metrics["validated"] is False


def test_new_best_beats_the_record_only_with_a_finite_higher_value() -> None:
    first = new_best({"val_auc": 0.7, NONFINITE_KEY: 0.0}, metric="auc", epoch=0, best=None)
    assert first == BestRecord("auc", 0, 0.7)
    assert new_best({"val_auc": 0.6}, metric="auc", epoch=1, best=first) is None
    assert new_best({"val_auc": 0.8}, metric="auc", epoch=1, best=first) == BestRecord(
        "auc", 1, 0.8
    )
    failed = {"val_auc": 0.9, NONFINITE_KEY: 1.0}
    assert new_best(failed, metric="auc", epoch=2, best=first) is None
    assert new_best({"val_rank1": 0.9}, metric="auc", epoch=2, best=first) is None
    # A record of another metric (run.best_metric changed) is beaten by any value.
    assert new_best({"val_rank1": 0.1}, metric="rank1", epoch=3, best=first) == BestRecord(
        "rank1", 3, 0.1
    )


def test_where_an_epoch_starts_and_what_a_checkpoint_inside_it_reports() -> None:
    inside = EpochProgress.start(2).after(["x", "y", "z"], steps=6)
    assert epoch_progress(inside, 2) is inside
    for resumed, epoch in ((inside, 3), (None, 0)):
        start = epoch_progress(resumed, epoch)
        assert (start.epoch, start.steps, len(start.consumed)) == (epoch, 0, 0)
    assert inside_metrics(inside, (0, 1)) == {
        "epoch": 1,
        "epochs_done": [0, 1],
        "steps_in_epoch": 6,
        "images_in_epoch": 3,
    }
    assert inside_line(inside) == (
        "epoch 3 step 6: checkpoint inside the epoch (3 images trained on so far)"
    )
    history = RunHistory(epochs_done=(0, 1), world_sizes=(2,))
    assert resume_line("distill", _state(1, history), 3, "/ckpt") == (
        "[distill] resuming after epoch 2 with 3 worker(s) from /ckpt"
    )
    assert resume_line("distill", _state(1, history, inside), 2, "/ckpt") == (
        "[distill] resuming inside epoch 3, after its step 6 (3 of its images trained, "
        "skipped as they are read) with 2 worker(s) from /ckpt"
    )


def test_unwrap_hands_back_a_plain_model_as_it_is() -> None:
    """The student inside its DDP wrapper, or the model itself when it has none (one worker:
    Ray's prepare_model does not wrap it). The wrapped case runs in every Ray run."""
    model = torch.nn.Linear(2, 2)
    assert unwrap(model) is model


def test_the_rows_audit_records_the_rows_and_their_digest(tmp_path: Path) -> None:
    weight = np.arange(12, dtype=np.float64).reshape(3, 4)
    write_rows_audit(str(tmp_path), attempt=1, world_size=2, rank=1, start=5, weight=weight)
    record = read_rows_audit(str(tmp_path), 1, 1)
    digest = hashlib.sha256(weight.astype(np.float32).tobytes()).hexdigest()
    assert record == RowsAudit(1, 2, 1, 5, 3, digest)
