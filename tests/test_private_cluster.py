"""The one way jobs get a Ray cluster (orchestrator.runs.ensure_ray): without RAY_ADDRESS a
private cluster with token authentication, never one found by auto-discovery.

Ray 2.60 binds its gRPC servers to every interface whatever node address it is given, so
the checks are: read the real listening sockets of a running private cluster; everything
off loopback belongs to Ray's own servers (gRPC, and two read-only Prometheus metrics
endpoints); and the cluster refuses a client that lacks its token."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from orchestrator.config import dump_yaml
from tests.conftest import REPO, TrainSetup

pytestmark = pytest.mark.e2e

HOLD = """
import sys, time, ray
from orchestrator.runs import ensure_ray
ensure_ray()
node = ray._private.worker._global_node
print("SESSION", node.get_session_dir_path(), flush=True)
time.sleep(600)
"""

INTRUDER = """
import sys, ray
try:
    ray.init(address=sys.argv[1])
    print("CONNECTED")
except Exception as err:
    print("REFUSED", type(err).__name__)
"""

# Ray's read-only Prometheus endpoints (autoscaler and dashboard), bound to every interface
# by Ray itself; they serve metrics, not code execution.
METRICS_PORTS = {44217, 44227}


def env_without_ray_address(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    return {**env, **extra}


@dataclass(frozen=True)
class Private:
    address: str
    session: str


def listening() -> dict[int, tuple[str, int]]:
    """inode -> (ip, port) of every listening TCP socket, from /proc/net/tcp and tcp6."""
    out = {}
    for path, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(path).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            host, port = fields[1].split(":")
            raw = bytes.fromhex(host)
            words = raw[::-1] if family == socket.AF_INET else b"".join(
                raw[i : i + 4][::-1] for i in range(0, 16, 4)
            )  # fmt: skip
            out[int(fields[9])] = (socket.inet_ntop(family, words), int(port, 16))
    return out


def sockets_of(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def session_processes(session: str, driver: int) -> dict[int, str]:
    """pid -> name of the driver and every process whose command line names the session."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if int(entry.name) == driver or Path(session).name in cmdline:
            out[int(entry.name)] = name
    return out


@pytest.fixture(scope="module")
def private_cluster() -> Iterator[tuple[Private, subprocess.Popen[str]]]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env_without_ray_address(RAY_AUTH_MODE="disabled"), start_new_session=True,
    )  # fmt: skip
    assert holder.stdout is not None
    address = session = ""
    deadline = time.monotonic() + 120
    while not session and time.monotonic() < deadline:
        line = holder.stdout.readline()
        assert line or holder.poll() is None, "the private cluster did not start"
        if m := re.search(r"private local cluster \(token auth\) at (\S+)", line):
            address = m.group(1)
        if line.startswith("SESSION "):
            session = line.split()[1]
    assert address and session
    time.sleep(3)  # let the dashboard and agents bind
    yield Private(address, session), holder
    os.killpg(holder.pid, signal.SIGTERM)
    holder.wait(timeout=30)


def test_private_cluster_sockets_are_loopback_or_ray_servers_that_need_the_token(
    private_cluster: tuple[Private, subprocess.Popen[str]],
) -> None:
    cluster, holder = private_cluster
    socks = listening()
    processes = session_processes(cluster.session, holder.pid)
    found = [
        (name, socks[inode])
        for pid, name in processes.items()
        for inode in sockets_of(pid)
        if inode in socks
    ]
    assert any(name == "gcs_server" for name, _ in found) and any(n == "raylet" for n, _ in found)
    loopback = {"127.0.0.1", "::1"}
    dashboard = [(ip, port) for name, (ip, port) in found if port == 8265 or ip in loopback]
    assert dashboard, "the dashboard listens on loopback"
    for name, (ip, port) in found:
        if ip in loopback or port in METRICS_PORTS:
            continue
        assert name in ("gcs_server", "raylet", "python") or name.startswith("ray::"), (
            name,
            ip,
            port,
        )
    # Off loopback, Ray's servers refuse a client without this cluster's token. Both
    # clients at once: each retries for about 20 s before it gives up, mostly waiting.
    intruders = [
        subprocess.Popen(
            [sys.executable, "-c", INTRUDER, cluster.address],
            cwd=REPO,
            text=True,
            env=env_without_ray_address(RAY_AUTH_MODE=mode, RAY_AUTH_TOKEN="0" * 64),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for mode in ("disabled", "token")
    ]
    for intruder in intruders:
        stdout, stderr = intruder.communicate(timeout=120)
        assert "REFUSED" in stdout and "CONNECTED" not in stdout, stdout
        assert "Authentication token is missing or incorrect" in stderr


def test_a_job_never_attaches_to_a_discovered_cluster(
    private_cluster: tuple[Private, subprocess.Popen[str]],
    train_setup: TrainSetup,
    tmp_path: Path,
) -> None:
    """ray_current_cluster pointing at a live cluster (the one above), then at a dead
    address: jobs.distill (proxyless, whose classifier goes into the object store before
    training) starts its own private cluster both times and never hangs."""
    cluster, _ = private_cluster
    current = Path("/tmp/ray/ray_current_cluster")
    saved = current.read_text() if current.exists() else None
    config = replace(
        train_setup.base,
        name="own-cluster",
        storage_path=str(tmp_path / "runs"),
        optim=replace(train_setup.base.optim, epochs=1),
    )
    path = tmp_path / "distill.yaml"
    path.write_text(dump_yaml(config))
    try:
        current.parent.mkdir(parents=True, exist_ok=True)
        for discovered in (cluster.address, "127.0.0.1:9"):
            current.write_text(discovered)
            result = subprocess.run(
                [sys.executable, "-m", "jobs.distill", "--config", str(path)], cwd=REPO,
                env=env_without_ray_address(), capture_output=True, text=True, timeout=400,
            )  # fmt: skip
            output = result.stdout + result.stderr
            assert result.returncode == 0, output[-3000:]
            own = re.search(r"private local cluster \(token auth\) at (\S+)", output)
            assert own and own.group(1) != discovered, output[-2000:]
    finally:
        if saved is None:
            current.unlink(missing_ok=True)
        else:
            current.write_text(saved)
