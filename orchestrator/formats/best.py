"""The best checkpoint of a run (``<run>/best/``): its state and the record naming it."""

from __future__ import annotations

import json
from dataclasses import dataclass

from orchestrator import storage
from orchestrator.formats.loading import ArtifactError, load_data
from orchestrator.formats.state import TrainingState, state_bytes, state_from_data

BEST_DIR = "best"
BEST_RECORD = "best.json"


@dataclass(frozen=True)
class BestRecord:
    """Which epoch's state ``<run>/best/`` holds, and its validation ``metric`` (higher is
    better for every :class:`orchestrator.config.Metric`)."""

    metric: str
    epoch: int
    value: float

    @property
    def state_file(self) -> str:
        return f"state_epoch{self.epoch:04d}.pt"

    def improved_by(self, metric: str, value: float) -> bool:
        """A new validation beats this one (a record of another metric is always beaten:
        the run's ``run.best_metric`` changed)."""
        return metric != self.metric or value > self.value


def write_best(uri: str, state: TrainingState, record: BestRecord) -> None:
    """Publish-last: the new state under its own name, then the record that names it,
    then the old state goes. A crash at any point leaves a record and the state it names."""
    old = read_best(uri)
    storage.write_bytes_atomic(storage.join(uri, record.state_file), state_bytes(state))
    storage.write_text_atomic(storage.join(uri, BEST_RECORD), json.dumps(vars(record)))
    if old is not None and old.state_file != record.state_file:
        storage.delete(storage.join(uri, old.state_file))


def read_best(uri: str) -> BestRecord | None:
    """The record of ``<run>/best`` (None before a run's first validation)."""
    where = storage.join(uri, BEST_RECORD)
    if not storage.exists(where):
        return None
    try:
        data = json.loads(storage.read_text(where))
        return BestRecord(str(data["metric"]), int(data["epoch"]), float(data["value"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{where}: malformed best-checkpoint record ({err!r})") from None


def load_best_state(uri: str, record: BestRecord) -> TrainingState:
    where = storage.join(uri, record.state_file)
    return state_from_data(
        load_data(storage.read_bytes(where), where, "a training checkpoint"), where
    )
