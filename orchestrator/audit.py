"""The audit of a run (``run.audit_ids``): which images each rank trained on, in order, and
which it received but did not train on, and which classifier rows each rank held. Writers
and readers in one place.

Under ``<storage_path>/<run>/audit/``, one line per image id:

    epoch-EEEE-rank-RRR.txt                   what rank R trained on in epoch E, in order
    epoch-EEEE-rank-RRR-from-step-SSSSSS.txt  the same, for the segment of the epoch from
                                              its step S (runs that checkpoint inside epochs)
    skipped-epoch-EEEE-rank-RRR.txt           the epoch's short remainder rank R received
                                              and skipped (fewer rows than a local batch)
    classifier-rows-attempt-AAA-rank-RRR.json the rows of W rank R held in attempt A
                                              (sharded classifier) and their SHA-256
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from orchestrator import storage

AUDIT_DIR = "audit"


def trained_file(epoch: int, rank: int, since: int | None = None) -> str:
    part = "" if since is None else f"-from-step-{since:06d}"
    return f"epoch-{epoch:04d}-rank-{rank:03d}{part}.txt"


def skipped_file(epoch: int, rank: int) -> str:
    return f"skipped-epoch-{epoch:04d}-rank-{rank:03d}.txt"


@dataclass(frozen=True)
class EpochAudit:
    """One epoch of a run, by rank: the ids trained on (segments joined in step order) and
    the ids skipped."""

    trained: dict[int, list[str]]
    skipped: dict[int, list[str]]

    def all_trained(self) -> list[str]:
        return [i for rank in sorted(self.trained) for i in self.trained[rank]]

    def all_skipped(self) -> list[str]:
        return [i for rank in sorted(self.skipped) for i in self.skipped[rank]]


def read_epoch_audit(run_uri: str, epoch: int) -> EpochAudit:
    """What the audit files of ``epoch`` under the run at ``run_uri`` say."""
    directory = storage.join(run_uri, AUDIT_DIR)
    trained: dict[int, list[tuple[int, list[str]]]] = {}
    skipped: dict[int, list[str]] = {}
    for path in sorted(storage.glob(directory, f"*epoch-{epoch:04d}-rank-*.txt")):
        name = path.rsplit("/", 1)[-1]
        ids = storage.read_text(storage.join(directory, name)).split()
        stem = name.removesuffix(".txt")
        if stem.startswith("skipped-"):
            skipped[int(stem.rsplit("-", 1)[1])] = ids
            continue
        head, _, since = stem.partition("-from-step-")
        rank = int(head.rsplit("-", 1)[1])
        trained.setdefault(rank, []).append((int(since or 0), ids))
    return EpochAudit(
        {rank: [i for _, ids in sorted(parts) for i in ids] for rank, parts in trained.items()},
        skipped,
    )


def clear_audit_from(run_uri: str, epoch: int, steps: int) -> None:
    """Delete ``epoch``'s audit segments from its step ``steps`` on: what an attempt that
    died trained after the checkpoint this one resumed from. This attempt writes them
    again, but after a resize under other rank names, so they would otherwise stay."""
    audit = storage.join(run_uri, AUDIT_DIR)
    for path in storage.glob(audit, f"*epoch-{epoch:04d}-rank-*.txt"):
        name = path.rsplit("/", 1)[-1]
        _, found, since = name.removesuffix(".txt").partition("-from-step-")
        if not found or int(since) >= steps:  # a whole-epoch file, a skipped file, or later
            storage.delete(storage.join(audit, name))


@dataclass(frozen=True)
class RowsAudit:
    """Which rows of the classifier W one rank held in one attempt, and their digest."""

    attempt: int
    world_size: int
    rank: int
    start: int
    size: int
    sha256: str


def rows_file(attempt: int, rank: int) -> str:
    return f"classifier-rows-attempt-{attempt:03d}-rank-{rank:03d}.json"


def write_rows_audit(
    run_uri: str, *, attempt: int, world_size: int, rank: int, start: int, weight: np.ndarray
) -> None:
    """``audit/classifier-rows-attempt-A-rank-R.json``: the rows ``[start, start + len(weight))``
    of W that ``rank`` of ``world_size`` holds in ``attempt``, with the SHA-256 of ``weight``
    (those rows, float32)."""
    digest = hashlib.sha256(np.ascontiguousarray(weight, dtype=np.float32).tobytes())
    record = RowsAudit(attempt, world_size, rank, start, len(weight), digest.hexdigest())
    uri = storage.join(run_uri, AUDIT_DIR, rows_file(attempt, rank))
    storage.write_text_atomic(uri, json.dumps(asdict(record)))


def read_rows_audit(run_uri: str, attempt: int, rank: int) -> RowsAudit:
    uri = storage.join(run_uri, AUDIT_DIR, rows_file(attempt, rank))
    return RowsAudit(**json.loads(storage.read_text(uri)))


def write_audit(
    run_uri: str,
    *,
    epoch: int,
    rank: int,
    image_ids: list[str],
    since: int | None = None,
    skipped: bool = False,
) -> None:
    """The image ids this rank trained on in ``epoch``, one per line, in training order;
    with checkpoints inside epochs, those of one segment (from the epoch's step ``since`` to
    the next checkpoint or the epoch's end): ``epoch-E-rank-R-from-step-S.txt``. The
    segments a resumed run left cover what its checkpoints kept. With ``skipped``, the ids
    of the epoch's short remainder this rank received and did not train on:
    ``skipped-epoch-E-rank-R.txt``."""
    file = skipped_file(epoch, rank) if skipped else trained_file(epoch, rank, since)
    storage.write_text_atomic(
        storage.join(run_uri, AUDIT_DIR, file), "".join(f"{i}\n" for i in image_ids)
    )
