"""The audit of a run (``run.audit_ids``): which images each rank trained on, in order, and
which it received but did not train on. Writer names and reader in one place.

Under ``<storage_path>/<run>/audit/``, one line per image id:

    epoch-EEEE-rank-RRR.txt                   what rank R trained on in epoch E, in order
    epoch-EEEE-rank-RRR-from-step-SSSSSS.txt  the same, for the segment of the epoch from
                                              its step S (runs that checkpoint inside epochs)
    skipped-epoch-EEEE-rank-RRR.txt           the epoch's short remainder rank R received
                                              and skipped (fewer rows than a local batch)
"""

from __future__ import annotations

from dataclasses import dataclass

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
