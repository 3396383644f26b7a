"""The consumed-images bookkeeping behind checkpoints inside an epoch: interrupted at
several points, at different world sizes, an epoch still trains every image once."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from orchestrator.data.consumed import (
    EpochProgress,
    clear_skip,
    digests,
    drop_consumed,
    not_consumed,
    publish_skip,
    skip_dir,
)
from orchestrator.formats.state import TrainingState, state_bytes, state_from_data

pytestmark = pytest.mark.unit


def epoch_table(count: int, seed: int) -> pa.Table:
    """An epoch's rows in the order a seed gives them."""
    order = np.random.default_rng(seed).permutation(count)
    return pa.table({"image_id": [f"person{i % 7}/{i}.jpg" for i in order], "label": order % 7})


def run_attempt(rows: list[str], world_size: int, global_batch: int) -> list[list[str]]:
    """One attempt over what is left of the epoch, to its end: the rows dealt to
    ``world_size`` ranks in turn (an equal split), ``global_batch / world_size`` per rank
    per step. Per step, the ids all ranks trained on."""
    local = global_batch // world_size
    parts = [rows[r::world_size] for r in range(world_size)]
    steps = min(len(p) for p in parts) // local
    return [[i for p in parts for i in p[s * local : (s + 1) * local]] for s in range(steps)]


@pytest.mark.parametrize(
    "attempts",
    [
        # (world size, steps checkpointed, steps trained after that checkpoint and lost)
        [(2, 3, 2), (3, 2, 1), (1, None, 0)],
        [(3, 1, 0), (3, 4, 3), (2, None, 0)],
        [(1, 9, 0), (2, None, 0)],  # interrupted one step before the end
        [(2, 0, 4), (2, None, 0)],  # killed before its first checkpoint inside the epoch
    ],
)
def test_an_interrupted_epoch_trains_every_image_once(tmp_path: Path, attempts: list) -> None:
    table, global_batch = epoch_table(60, seed=3), 6
    directory = skip_dir(str(tmp_path / "run"))
    progress = EpochProgress.start(epoch=4)
    kept: list[str] = []  # the images of steps a checkpoint kept, in training order
    for world_size, checkpointed, lost in attempts:
        if progress.steps:
            publish_skip(directory, progress)
        else:
            clear_skip(directory)
        left = drop_consumed(table, directory=directory).column("image_id").to_pylist()
        assert len(left) == 60 - len(progress.consumed)
        steps = run_attempt(left, world_size, global_batch)
        if checkpointed is not None:
            # The attempt trains ``checkpointed + lost`` steps; only the first are kept.
            assert len(steps) >= checkpointed + lost
            steps = steps[:checkpointed]
        trained = [i for step in steps for i in step]
        kept += trained
        if checkpointed is None:
            break
        # A checkpoint: the epoch's step count and consumed set, through the checkpoint
        # format (weights-only torch.load) and back.
        progress = progress.after(trained, steps=progress.steps + checkpointed)
        progress = roundtrip(progress)
    all_ids = table.column("image_id").to_pylist()
    assert len(kept) == len(set(kept)), "an image was trained twice"
    assert sorted(kept) == sorted(all_ids), "an image was never trained"
    assert progress.epoch == 4 and progress.steps == sum(a[1] or 0 for a in attempts)


def roundtrip(progress: EpochProgress) -> EpochProgress:
    state = TrainingState(
        epoch=progress.epoch - 1,
        student={"w": torch.zeros(1)},
        loss={},
        optimizer={},
        classifier=None,
        config={},
        progress=progress,
    )
    data = torch.load(io.BytesIO(state_bytes(state)), weights_only=True)
    back = state_from_data(data, "test")
    assert back.progress is not None
    np.testing.assert_array_equal(back.progress.consumed, progress.consumed)
    return back.progress


def test_the_consumed_set_against_a_plain_set() -> None:
    rng = np.random.default_rng(0)
    ids = [f"img{i:06d}" for i in rng.permutation(5000)]
    trained = set(ids[:1234])
    progress = EpochProgress.start(0).after(ids[:700], steps=1).after(ids[700:1234], steps=2)
    assert len(progress.consumed) == 1234 and progress.consumed.dtype == np.uint64
    assert (np.diff(progress.consumed.astype(np.float64)) > 0).all()  # sorted, unique
    mask = not_consumed(ids, progress.consumed)
    assert mask.tolist() == [i not in trained for i in ids]
    assert not_consumed(ids[:3], EpochProgress.start(0).consumed).tolist() == [True] * 3
    # 8 bytes an image, and the digest is of the id's text: bytes and str agree.
    assert progress.consumed.nbytes == 8 * 1234
    assert digests([b"img000001"]).tolist() == digests(["img000001"]).tolist()


def test_nothing_is_skipped_once_cleared(tmp_path: Path) -> None:
    table = epoch_table(20, seed=1)
    directory = skip_dir(str(tmp_path))
    assert drop_consumed(table, directory=directory).num_rows == 20  # no skip file at all
    ids = table.column("image_id").to_pylist()
    publish_skip(directory, EpochProgress.start(2).after(ids[:5], steps=1))
    left = drop_consumed(table, directory=directory)
    assert left.column("image_id").to_pylist() == ids[5:]  # order kept
    assert left.column("label").to_pylist() == table.column("label").to_pylist()[5:]
    clear_skip(directory)
    assert drop_consumed(table, directory=directory).num_rows == 20
    assert not list(Path(directory).glob("skip*"))
