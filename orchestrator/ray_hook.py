"""The private cluster's worker setup hook (Ray's ``worker_process_setup_hook``), in a
module of its own that imports nothing heavy: a hook that imported torch would load it
before Ray sets the worker's ``OMP_NUM_THREADS`` (measured: 2 threads per 0.5-CPU worker
instead of 1 on a 2-core machine)."""

from __future__ import annotations

import logging
import os
import warnings

import ray

# Records Ray logs that only repeat what the user is told anyway, by logger. When a task
# fails, Ray logs its traceback in the worker (and Ray Data in the process that runs the
# dataset) and also hands the failure to the caller; the driver reports it once (cli.run:
# one line for an input error, the remote tracebacks in a log file it names; the whole
# traceback for anything else), so the copies streamed to the console ahead of that line
# are dropped where they are made. Ray Data also warns that the progress bars we turn off
# are off, once per process, and Ray that tqdm is missing.
QUIET_RECORDS: dict[str, tuple[str, ...]] = {
    "ray.train.v2._internal.util": ("Error in training function",),
    "ray.data._internal.iterator.stream_split_iterator": ("get() failed after",),
    "ray.data._internal.execution.streaming_executor_state": (
        "An exception was raised from a task",
    ),
    "ray.data.exceptions": ("Exception occurred in user code",),
    "ray.data._internal.progress": ("Progress bars disabled",),
    # Ray's progress bars want tqdm, which we do not install: our own lines report progress.
    "ray.experimental.tqdm_ray": ("tqdm is not installed",),
}


class DropRecords(logging.Filter):
    """Drops the records of one logger whose message contains one of ``fragments``."""

    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(fragment in message for fragment in self.fragments)


def quiet_ray_records() -> None:
    """Install :data:`QUIET_RECORDS`'s filters in this process (idempotent)."""
    for name, fragments in QUIET_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropRecords) for f in logger.filters):
            logger.addFilter(DropRecords(fragments))


# Ray Data's advice to raise ``override_num_blocks`` when a dataset has fewer blocks than
# actors (a one-shard dataset): a knob our configs do not expose; one actor idles.
QUIET_WARNINGS = (r"The minimum number of concurrent actors for ",)


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for the private cluster's workers."""
    pin_ray_address()
    quiet_ray_records()
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def pin_ray_address() -> None:
    """In a worker of the private cluster: RAY_ADDRESS is that cluster's GCS, which every
    Ray lookup without an address then uses (Train's PlacementGroupCleaner, through the
    State API, found "multiple active Ray instances" when another Ray ran on the host)."""
    os.environ["RAY_ADDRESS"] = str(ray.get_runtime_context().gcs_address)
