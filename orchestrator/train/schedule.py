"""The training schedule, pure functions of the step or epoch (no Ray, no process group):
the learning rate at a step, how the global batch splits over the workers, and which
epochs validate and checkpoint. A resumed run continues the same schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.train.spec import TrainSpec


def lr_at(step: int, *, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up to ``base_lr``, then cosine decay to zero at ``total_steps``.

    A pure function of the step, so a resumed run continues the same schedule.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class Schedule:
    """How the global batch splits over the workers and where the learning rate is."""

    local_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    base_lr: float

    @classmethod
    def of(cls, spec: TrainSpec, world_size: int) -> Schedule:
        local_batch = spec.optim.batch_size // world_size
        steps = max(1, (spec.num_images // world_size) // local_batch)
        return cls(
            local_batch=local_batch,
            steps_per_epoch=steps,
            total_steps=steps * spec.optim.epochs,
            warmup_steps=round(spec.optim.warmup_epochs * steps),
            base_lr=spec.optim.lr,
        )

    def lr(self, step: int) -> float:
        return lr_at(
            step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, base_lr=self.base_lr
        )


def validation_due(epoch: int, *, epochs: int, every: int) -> bool:
    """After the last epoch, and every ``every`` epochs (``run.eval_every_epochs``; 0: only
    the last)."""
    return epoch == epochs - 1 or bool(every and (epoch + 1) % every == 0)


def checkpoint_due(epoch: int, *, epochs: int, every: int) -> bool:
    """After the last epoch, and every ``every`` epochs (``run.checkpoint_every_epochs``)."""
    return epoch == epochs - 1 or (epoch + 1) % every == 0
