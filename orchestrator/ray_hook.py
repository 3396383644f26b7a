"""The private cluster's worker setup hook (Ray's ``worker_process_setup_hook``), in a
module of its own that imports nothing heavy: a hook that imported torch would load it
before Ray sets the worker's ``OMP_NUM_THREADS`` (measured: 2 threads per 0.5-CPU worker
instead of 1 on a 2-core machine)."""

from __future__ import annotations

import os


def pin_ray_address() -> None:
    """In a worker of the private cluster: RAY_ADDRESS is that cluster's GCS, which every
    Ray lookup without an address then uses (Train's PlacementGroupCleaner, through the
    State API, found "multiple active Ray instances" when another Ray ran on the host)."""
    import ray

    os.environ["RAY_ADDRESS"] = str(ray.get_runtime_context().gcs_address)
