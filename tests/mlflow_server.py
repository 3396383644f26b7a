"""A real MLflow tracking server for the tests: ``mlflow server`` on loopback, its
metadata in SQLite and its artifacts on the embedded S3 server (proxied, so clients need
no S3 credentials). It can be stopped and started again on the same port and database,
as a server that goes away in the middle of a run and comes back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from orchestrator.objectstore import EmbeddedObjectStore

START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class MlflowServer:
    def __init__(self, root: Path, store: EmbeddedObjectStore, bucket: str) -> None:
        self.root, self.store, self.bucket = root, store, bucket
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        endpoint = self.store.endpoint.env()
        env = {
            **os.environ,
            **endpoint,
            "MLFLOW_S3_ENDPOINT_URL": endpoint["AWS_ENDPOINT_URL"],
            # The server's job runner (a pool of huey consumers for GenAI jobs): unused here,
            # and it takes CPU from the runs on a 2-core machine.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        command = [
            os.path.join(os.path.dirname(sys.executable), "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{self.bucket}/mlflow",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the server's lifetime
        # Its own session: `mlflow server` runs uvicorn as a child, and stop() kills both.
        self.process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited; see {self.root / 'server.log'}")
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1).read()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"mlflow server not up in {START_TIMEOUT_S:g} s")

    def stop(self) -> None:
        """Kill the server (as a crash would: no orderly shutdown)."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
            self.process = None
