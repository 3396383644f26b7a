"""Which rows of a class-sharded classifier each rank owns (README "Millions of identities", orchestrator/losses).

The one definition of the shard formula: the classifier reader, the sharded loss, the
arcface_torch importer and the benchmarks all ask :meth:`Shard.for_rank`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """Rows [class_start, class_start + local_classes) of a classifier of num_classes rows."""

    num_classes: int
    class_start: int
    local_classes: int

    @classmethod
    def for_rank(cls, num_classes: int, world_size: int, rank: int) -> Shard:
        """Rank r of N owns C//N rows, plus one for the first C % N ranks:
        ``start_r = (C//N)*r + min(r, C%N)``, ``size_r = C//N + (r < C%N)``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        base, extra = divmod(num_classes, world_size)
        return cls(num_classes, base * rank + min(rank, extra), base + int(rank < extra))

    @property
    def class_stop(self) -> int:
        return self.class_start + self.local_classes
