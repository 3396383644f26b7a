"""Which images of an epoch a run has trained on: the bookkeeping behind checkpoints inside
an epoch (``run.checkpoint_every_steps``). A run resumed from one continues the interrupted
epoch on exactly the images of that epoch it had not reached, whatever the worker count.

An image is named by its ``image_id`` (unique within a dataset, README "Formats"), kept
as the 64-bit BLAKE2b digest of the id: 8 bytes an image, so a checkpoint taken after k
images of an epoch holds 8k bytes for this (80 MB at most for a 10M-image epoch), and none
at the end of an epoch. Two distinct ids share a digest with probability about n^2 / 2^65
for n images (3e-6 for n = 10M): the one exception to "exact", stated rather than hidden.

The consumed set reaches the input pipeline through a small file under the run,
``<run>/input/skip.json``, naming the digest file of the epoch being resumed. The Parquet
read tasks drop the rows it names (:func:`drop_consumed`) before the split into workers, so
every worker still gets an equal part of what is left. Rank 0 publishes it before the
resumed epoch starts and clears it before the next one; nothing is skipped when it is
absent.
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from orchestrator import storage

Digests = npt.NDArray[np.uint64]
SKIP_DIR = "input"
SKIP_POINTER = "skip.json"


def digests(image_ids: Iterable[Any]) -> Digests:
    """The 64-bit BLAKE2b digest of each image id (str or bytes), in order."""
    out = [
        int.from_bytes(
            hashlib.blake2b(i if isinstance(i, bytes) else str(i).encode(), digest_size=8).digest(),
            "little",
        )
        for i in image_ids
    ]
    return np.asarray(out, dtype=np.uint64)


@dataclass(frozen=True)
class EpochProgress:
    """How far into ``epoch`` a run is: ``steps`` optimisation steps done, on the images
    whose digests are ``consumed`` (sorted, unique)."""

    epoch: int
    steps: int
    consumed: Digests

    @classmethod
    def start(cls, epoch: int) -> EpochProgress:
        return cls(epoch, 0, np.empty(0, dtype=np.uint64))

    def after(self, image_ids: Iterable[Any], *, steps: int) -> EpochProgress:
        """The progress once the images ``image_ids`` (all workers') are trained on too."""
        merged = np.union1d(self.consumed, digests(image_ids)).astype(np.uint64)
        return EpochProgress(self.epoch, steps, merged)

    def to_data(self) -> dict[str, Any]:
        """Plain data for a checkpoint (the digests as int64 bits: a tensor type torch's
        weights-only loader reads back)."""
        # torch: heavy (two seconds to import); Ray Data tasks import this module without it
        import torch

        return {
            "epoch": self.epoch,
            "steps": self.steps,
            "consumed": torch.from_numpy(self.consumed.view(np.int64).copy()),
        }

    @classmethod
    def from_data(cls, data: Any, where: str) -> EpochProgress:
        # torch: heavy (two seconds to import); Ray Data tasks import this module without it
        import torch

        if not isinstance(data, dict) or not isinstance(data.get("consumed"), torch.Tensor):
            raise ValueError(f"{where}: malformed epoch progress {type(data).__name__}")
        consumed = data["consumed"].numpy().view(np.uint64)
        return cls(int(data["epoch"]), int(data["steps"]), np.sort(consumed))


def not_consumed(image_ids: Iterable[Any], consumed: Digests) -> npt.NDArray[np.bool_]:
    """Mask of the ids not in ``consumed`` (sorted)."""
    wanted = digests(image_ids)
    if not len(consumed):
        return np.ones(len(wanted), dtype=bool)
    at = np.minimum(np.searchsorted(consumed, wanted), len(consumed) - 1)
    return np.asarray(consumed[at] != wanted)


# --- the skip file: from rank 0 to the Parquet read tasks ----------------------------------


def skip_dir(run_uri: str) -> str:
    return storage.join(run_uri, SKIP_DIR)


def publish_skip(directory: str, progress: EpochProgress) -> None:
    """Make the read tasks drop ``progress.consumed``: the digests under a fresh name, then
    the pointer to them (written last, so a reader never sees a pointer to a partial file)."""
    name = f"skip-epoch{progress.epoch:04d}-step{progress.steps:06d}-{secrets.token_hex(4)}.npy"
    buffer = io.BytesIO()
    np.save(buffer, progress.consumed, allow_pickle=False)
    storage.write_bytes_atomic(storage.join(directory, name), buffer.getvalue())
    pointer = {
        "epoch": progress.epoch,
        "steps": progress.steps,
        "file": name,
        "count": len(progress.consumed),
    }
    storage.write_text_atomic(storage.join(directory, SKIP_POINTER), json.dumps(pointer))


def clear_skip(directory: str) -> None:
    """Nothing is skipped from now on: the pointer goes first, then the digest files."""
    storage.delete(storage.join(directory, SKIP_POINTER))
    for path in storage.glob(directory, "skip-*.npy"):
        storage.delete(storage.join(directory, path.rsplit("/", 1)[-1]))


_loaded: dict[str, Digests] = {}  # digest file URI -> its digests, per read-task process


def skipped(directory: str) -> Digests:
    """The digests the pointer names (empty when there is none): one small read per call,
    the digest file itself read once per process."""
    pointer_uri = storage.join(directory, SKIP_POINTER)
    try:
        pointer = json.loads(storage.read_text(pointer_uri))
    except FileNotFoundError:
        return np.empty(0, dtype=np.uint64)
    uri = storage.child(directory, pointer["file"], source=pointer_uri)
    if uri not in _loaded:
        _loaded.clear()
        _loaded[uri] = np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
    return _loaded[uri]


def drop_consumed(batch: Any, *, directory: str) -> Any:
    """A read block (pyarrow Table) without the rows already trained on in the epoch being
    resumed; unchanged when nothing is to be skipped."""
    consumed = skipped(directory)
    if not len(consumed):
        return batch
    return batch.filter(not_consumed(batch.column("image_id").to_pylist(), consumed))
