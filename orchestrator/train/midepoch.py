"""The protocol for checkpoints inside an epoch (``run.checkpoint_every_steps``), beside
:mod:`orchestrator.data.consumed` (the consumed set it records): where an epoch starts
after a resume, and what rank 0 publishes before the epoch's input is read."""

from __future__ import annotations

from typing import Any

from orchestrator.audit import clear_audit_from, write_audit
from orchestrator.config import RunConfig
from orchestrator.data.consumed import EpochProgress, clear_skip, publish_skip, skip_dir
from orchestrator.train.distributed import barrier


def epoch_progress(resumed: EpochProgress | None, epoch: int) -> EpochProgress:
    """Where ``epoch`` starts: where the checkpoint the run resumed from left it
    (``resumed``, when it is inside this epoch), or at its step 0."""
    if resumed is not None and resumed.epoch == epoch:
        return resumed
    return EpochProgress.start(epoch)


def prepare_input(
    run: RunConfig, *, run_uri: str, progress: EpochProgress, rank: int, world_size: int
) -> None:
    """Before the input of ``progress.epoch`` is read: rank 0 tells the Parquet read tasks
    which images to skip (those trained on already, when resuming inside this epoch) or
    that there are none, and clears the audit segments an attempt that died left from this
    point of the epoch on; every rank waits for it (a barrier), so no read starts before."""
    if not (run.checkpoint_every_steps or run.audit_ids):
        return
    if rank == 0:
        if run.audit_ids:
            clear_audit_from(run_uri, progress.epoch, progress.steps)
        if run.checkpoint_every_steps:
            directory = skip_dir(run_uri)
            if progress.steps:
                publish_skip(directory, progress)
            else:
                clear_skip(directory)
    barrier(world_size)


def inside_metrics(progress: EpochProgress, epochs_done: tuple[int, ...]) -> dict[str, Any]:
    """What every rank reports with a checkpoint inside epoch ``progress.epoch``: it holds
    the state after the finished epoch before it, plus the progress."""
    return {
        "epoch": progress.epoch - 1,
        "epochs_done": list(epochs_done),
        "steps_in_epoch": progress.steps,
        "images_in_epoch": len(progress.consumed),
    }


def inside_line(progress: EpochProgress) -> str:
    return (
        f"epoch {progress.epoch + 1} step {progress.steps}: checkpoint inside the epoch "
        f"({len(progress.consumed)} images trained on so far)"
    )


def write_epoch_audit(
    run_uri: str,
    epoch: int,
    rank: int,
    segment: list[str],
    *,
    since: int | None,
    skipped: list[str],
) -> None:
    """At the end of an epoch (``run.audit_ids``): the ids of its last segment (the whole
    epoch when ``since`` is None) and of its short remainder this rank skipped."""
    write_audit(run_uri, epoch=epoch, rank=rank, image_ids=segment, since=since)
    write_audit(run_uri, epoch=epoch, rank=rank, image_ids=skipped, skipped=True)
