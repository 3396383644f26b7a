"""An expiring lock on local paths and object storage: one JSON file, written, read back.

Object stores have no atomic create-if-absent that every S3 server supports, so the lock is
taken by writing it, waiting ``settle_s`` and reading it back: of two writers that raced,
both read the last write and only its owner goes on. A lock past its expiry, or one whose
holder ran on this host and is no longer alive (killed, crashed), is taken over. While held, a heartbeat thread pushes the expiry forward, so a long
run keeps its lock however long it takes, and a dead one loses it after ``ttl_s``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from orchestrator import storage
from orchestrator.errors import UsageError


class LockHeldError(UsageError):
    """Another live process holds the lock."""


def read_lock(uri: str) -> dict[str, Any] | None:
    if not storage.exists(uri):
        return None
    try:
        data = json.loads(storage.read_text(uri))
    except (ValueError, FileNotFoundError):
        return None
    return data if isinstance(data, dict) and "owner" in data else None


def holder_died(lock: dict[str, Any]) -> bool:
    """The holder ran on this host and its process is gone (killed, crashed): its lock is
    stale at once, not only after it expires. Holders elsewhere are trusted until then."""
    host, _, rest = str(lock["owner"]).partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


@contextmanager
def expiring_lock(
    uri: str, *, ttl_s: float, settle_s: float, heartbeat: bool = False
) -> Iterator[str]:
    """Hold the lock file ``uri`` for the block; yields this holder's id."""
    current = read_lock(uri)
    if current is not None and current["expires_at"] > time.time() and not holder_died(current):
        raise LockHeldError(
            f"{uri} is held by {current['owner']} until {_utc(current['expires_at'])} UTC"
        )
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def write() -> None:
        body = {"owner": owner, "expires_at": time.time() + ttl_s}
        storage.write_text_atomic(uri, json.dumps(body))

    write()
    time.sleep(settle_s)
    holder = read_lock(uri)
    if holder is None or holder["owner"] != owner:
        raise LockHeldError(f"{uri} was taken by {None if holder is None else holder['owner']}")
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(uri, owner, write, stop, ttl_s / 3), daemon=True)
    if heartbeat:
        beat.start()
    try:
        yield owner
    finally:
        stop.set()
        if heartbeat:
            beat.join(timeout=10)
        holder = read_lock(uri)
        if holder is not None and holder["owner"] == owner:
            storage.delete(uri)


def _beat(uri: str, owner: str, write: Any, stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        holder = read_lock(uri)
        if holder is None or holder["owner"] != owner:
            return  # taken over (we were presumed dead): do not fight for it
        write()
