"""The expiring lock of runs and of the retrain registry: a live holder keeps it, a holder
that died on this host loses it at once, a holder elsewhere until the lock expires."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import storage
from orchestrator.config import ExperimentConfig, RunConfig
from orchestrator.locks import LockHeldError, expiring_lock, read_lock
from orchestrator.objectstore import EmbeddedObjectStore
from orchestrator.runs import run_lock
from tests.conftest import BUCKET


def held_by(path: Path, owner: str) -> None:
    path.write_text(json.dumps({"owner": owner, "expires_at": time.time() + 600}))


def test_a_live_holder_keeps_the_lock_and_a_dead_one_loses_it(tmp_path: Path) -> None:
    lock = tmp_path / "run.json"
    host = socket.gethostname()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        held_by(lock, f"{host}:{alive.pid}:abc")
        held = pytest.raises(LockHeldError, match=rf"is held by {host}:{alive.pid}:abc until")
        with held, expiring_lock(str(lock), ttl_s=60, settle_s=0):
            pass
    finally:
        alive.kill()
        alive.wait()
    held_by(lock, f"{host}:{alive.pid}:abc")  # the same holder, now dead
    with expiring_lock(str(lock), ttl_s=60, settle_s=0) as owner:
        holder = read_lock(str(lock))
        assert holder is not None and holder["owner"] == owner != f"{host}:{alive.pid}:abc"
    assert not lock.exists(), "released at the end of the block"


def test_a_holder_on_another_host_is_trusted_until_the_lock_expires(tmp_path: Path) -> None:
    lock = tmp_path / "run.json"
    held_by(lock, "some-other-host:1:abc")
    held = pytest.raises(LockHeldError, match="is held by some-other-host:1:abc")
    with held, expiring_lock(str(lock), ttl_s=60, settle_s=0):
        pass
    lock.write_text(json.dumps({"owner": "some-other-host:1:abc", "expires_at": time.time() - 1}))
    with expiring_lock(str(lock), ttl_s=60, settle_s=0):
        assert read_lock(str(lock))["owner"].startswith(socket.gethostname())  # type: ignore[index]


def test_the_heartbeat_pushes_the_expiry_forward(tmp_path: Path) -> None:
    lock = tmp_path / "run.json"
    with expiring_lock(str(lock), ttl_s=0.6, settle_s=0, heartbeat=True):
        first = read_lock(str(lock))
        time.sleep(0.9)  # three beats of ttl/3
        later = read_lock(str(lock))
        assert first is not None and later is not None
        assert later["expires_at"] > first["expires_at"] and later["owner"] == first["owner"]


def test_the_run_lock_on_object_storage(object_store: EmbeddedObjectStore) -> None:
    """``run_lock`` under an ``s3://`` storage path (the real S3 server on loopback): while
    one run holds ``<storage>/.locks/<name>.json`` a second is refused naming it; released
    at the end, the name can be taken again."""
    config = ExperimentConfig(
        storage_path=f"s3://{BUCKET}/lock-runs",
        run=RunConfig(lock_ttl_s=60, lock_settle_s=0.2),
    )
    where = f"s3://{BUCKET}/lock-runs/.locks/same.json"
    with run_lock(config, "same") as owner:
        holder = read_lock(where)
        assert holder is not None and holder["owner"] == owner
        refused = pytest.raises(LockHeldError, match=rf"same\.json is held by {owner}")
        with refused, run_lock(config, "same"):
            pass
        with run_lock(config, "other"):  # another name is another lock
            assert read_lock(f"s3://{BUCKET}/lock-runs/.locks/other.json") is not None
    assert not storage.exists(where)
    with run_lock(config, "same"):
        assert read_lock(where) is not None
