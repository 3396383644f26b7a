"""One epoch on one worker, below the loop in :mod:`orchestrator.train.worker`: its input
(decoded and augmented batches, data errors named), the step on a batch, the divergence
check, and the lines rank 0 prints."""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from orchestrator.config import DataConfig, DecodeAt, Precision
from orchestrator.data.images import to_model_input
from orchestrator.data.ray_input import (
    augment_decoded,
    augment_draws,
    decoded_ahead,
    epoch_batches,
    shuffle_seed,
)
from orchestrator.errors import user_error_in_text
from orchestrator.progress import format_seconds
from orchestrator.train.history import EpochStats
from orchestrator.train.state import WorkerState
from orchestrator.train.step import train_step


def print_epoch_done(state: WorkerState, stats: EpochStats) -> None:
    """Rank 0's line at the end of an epoch."""
    if state.rank != 0:
        return
    print(
        f"{state.tag} epoch {stats.epoch + 1}/{state.spec.optim.epochs} done: loss "
        f"{stats.mean_loss:.4f}  {stats.samples_per_s:.0f} samples/s  "
        f"{format_seconds(stats.seconds)}  input: {stats.input_startup_s:.1f}s start-up, "
        f"then {stats.input_wait_share:.0%} of the time waiting",
        flush=True,
    )


def epoch_input(state: WorkerState, epoch: int) -> Iterator[dict[str, Any]]:
    """This worker's decoded batches of ``epoch``: from the decode pool as they come, or
    decoded here, one batch ahead of the step (``data.decode: worker``)."""
    config = state.config
    batches = epoch_batches(
        state.data,
        state.schedule.local_batch,
        config.run.shuffle_buffer,
        shuffle_seed=shuffle_seed(config.seed, epoch=epoch, rank=state.rank),
    )
    key = (config.seed, epoch)  # augmentation: per image, from (seed, epoch, image id)
    if config.data.decode is DecodeAt.WORKER:
        return decoded_ahead(batches, config.data, key=key)
    return (augmented(batch, config.data, key=key) for batch in batches)


def augmented(batch: dict[str, Any], data: DataConfig, *, key: tuple[int, int]) -> dict[str, Any]:
    """A batch the decode pool decoded, augmented here (where the epoch is known)."""
    if not (data.flip or data.crop_pad):
        return batch
    draws = augment_draws(batch["image_id"], key=key, flip=data.flip, crop_pad=data.crop_pad)
    return {**batch, "image": augment_decoded(writable(batch["image"]), draws)}


def train_batch(state: WorkerState, batch: dict[str, Any], *, lr: float) -> float:
    """One optimisation step on a decoded batch; the step's loss."""
    # Arrays Ray hands out may be read-only views of its store: copy only then.
    images = to_model_input(torch.from_numpy(writable(batch["image"]))).to(state.device)
    if state.config.run.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.from_numpy(writable(batch["label"])).to(state.device)
    with torch.no_grad():
        teacher_emb = None if state.teacher is None else state.teacher(images).float()
    out = train_step(
        state.student,
        state.loss_fn,
        optimizer=state.optimizer,
        images=images,
        labels=labels,
        teacher_embeddings=teacher_emb,
        lr=lr,
        bf16=state.config.run.precision is Precision.BF16,
    )
    return float(out.loss.detach())


def check_finite(state: WorkerState, losses: list[float], epoch: int) -> None:
    if not np.isfinite(losses[-1]):
        raise FloatingPointError(
            f"{state.tag} loss is {losses[-1]} at epoch {epoch + 1} step {len(losses)}: "
            f"training diverged; lower optim.lr (now {state.spec.optim.lr}) or add "
            "optim.warmup_epochs"
        )


class ProgressLine:
    """Rank 0's periodic line: step, samples/s, recent loss, ETA. The first step carries
    start-up costs, so the rate is measured from the end of it."""

    def __init__(self, state: WorkerState, epoch: int) -> None:
        self.state, self.epoch = state, epoch
        self.last_log = self.warm = time.monotonic()

    def after_step(self, losses: list[float]) -> None:
        now = time.monotonic()
        if len(losses) == 1:
            self.warm = now
            return
        if self.state.rank != 0 or now - self.last_log < self.state.config.run.log_every_s:
            return
        self.last_log = now
        schedule, optim = self.state.schedule, self.state.spec.optim
        rate = (len(losses) - 1) * optim.batch_size / max(now - self.warm, 1e-9)
        steps = schedule.steps_per_epoch
        remaining = (steps - len(losses)) + steps * (optim.epochs - self.epoch - 1)
        eta = remaining * optim.batch_size / max(rate, 1e-9)
        print(
            f"{self.state.tag} epoch {self.epoch + 1}/{optim.epochs} step {len(losses)}/{steps}"
            f"  {rate:.0f} samples/s  loss {float(np.mean(losses[-20:])):.4f}  "
            f"ETA {format_seconds(eta)}",
            flush=True,
        )


def writable(array: np.ndarray) -> np.ndarray:
    return array if array.flags.writeable else array.copy()


def input_errors_named(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``batches``, with a data error raised in a decode actor (which Ray wraps in a long
    remote traceback) re-raised here as itself, so its message (dataset, image id) is the
    last line of what the run reports."""
    try:
        yield from batches
    except Exception as err:
        # The original exception crosses a process boundary as text inside Ray's wrappers.
        cause = user_error_in_text("".join(traceback.format_exception(err)))
        if cause is not None:
            raise cause from None
        raise


def memory_mb() -> dict[str, float]:
    """This worker's resident memory and the part of it shared with other processes (the
    object store's copy of W shows up there), from /proc/self/statm; empty elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            _, resident, shared, *_ = (int(v) for v in f.read().split())
    except OSError:
        return {}
    page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
    return {"rss_mb": resident * page_mb, "shared_mb": shared * page_mb}
