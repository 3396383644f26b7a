"""What the bench scripts share: putting the checkout on ``sys.path``, the memory and CPU
figures read from ``/proc`` (per process and for the whole machine), the synthetic faces
they feed, and the typed target record each script judges its ratios with (printed as a
list and carried in its JSON line).

Standard library only at import time: ``gpu_check.py`` runs on a GPU box that may have
nothing but torch.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def put_repo_on_path() -> None:
    """Run from a checkout (``python bench/<script>.py``) without installing the package."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


# --- memory and CPU, from /proc (Linux; empty or nan elsewhere) ------------------------------


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (reported in kB) in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_now_mb() -> float:
    return status_mb("VmRSS")


def rss_peak_mb() -> float:
    return status_mb("VmHWM")  # the high-water mark that rss_reset() clears


def rss_reset() -> None:
    """Reset this process's peak-RSS high-water mark (/proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def process_cpu() -> dict[int, tuple[str, float]]:
    """Every process's command line and CPU seconds so far (user + system)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(entry)] = (command, (int(fields[11]) + int(fields[12])) / tick)
    return out


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent not idle (all cores, all processes) since boot,
    from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """CPU seconds used during a block by the processes whose command line contains
    ``marked`` and by everything else, sampled twice a second (a process that ends keeps
    its last sample)."""

    def __init__(self, marked: str) -> None:
        self.marked = marked
        self.last: dict[int, tuple[str, float]] = {}
        self.start: dict[int, float] = {}
        self.seen: set[int] = set()  # pids marked in any sample
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sample(self) -> None:
        now = process_cpu()
        self.seen |= {pid for pid, (command, _) in now.items() if self.marked in command}
        self.last.update(now)

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            self.sample()

    def __enter__(self) -> CpuSampler:
        self.start = {pid: cpu for pid, (_, cpu) in process_cpu().items()}
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join()
        self.sample()

    def split(self, leave_out: set[int]) -> dict[str, float]:
        """CPU seconds of the marked processes and of the others, ``leave_out`` aside."""
        totals = {"marked": 0.0, "other": 0.0}
        for pid, (_, cpu) in self.last.items():
            if pid in leave_out:
                continue
            used = cpu - self.start.get(pid, 0.0)
            totals["marked" if pid in self.seen else "other"] += max(used, 0.0)
        return totals


# --- inputs ----------------------------------------------------------------------------------


def synthetic_faces(count: int, *, size: int = 112, quality: int = 90) -> list[bytes]:
    """``count`` distinct synthetic faces (20 per identity) as JPEG."""
    from orchestrator.data.images import encode_jpeg  # the project: only where inputs are made
    from orchestrator.data.synthetic import iter_identity_images  # the project: as above

    faces = []
    for identity in range((count + 19) // 20):
        for face in iter_identity_images(0, identity, images_per_identity=20, size=size):
            faces.append(encode_jpeg(face, quality))
    return faces[:count]


# --- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One figure a script is judged by: ``value`` against ``bound`` (at least, or at most
    with ``at_most``); None when it could not be measured."""

    name: str
    value: float | None
    bound: float
    at_most: bool = False

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.bound if self.at_most else self.value >= self.bound

    @property
    def rule(self) -> str:
        return f"{'<=' if self.at_most else '>='}{self.bound:g}"

    def as_json(self) -> dict[str, Any]:
        value = None if self.value is None else round(self.value, 3)
        return {"value": value, "bound": self.bound, "rule": self.rule, "met": self.met}


def judged(targets: list[Target]) -> dict[str, dict[str, Any]]:
    """Print each target with its verdict; the same as JSON-ready data, by name."""
    print("\ntargets (value, rule, met):")
    for t in targets:
        value = "n/a" if t.value is None else f"{t.value:.3f}"
        verdict = {True: "met", False: "NOT met", None: ""}[t.met]
        print(f"  {t.name}: {value} {t.rule} {verdict}".rstrip())
    return {t.name: t.as_json() for t in targets}


put_repo_on_path()  # on import: every script imports this module before the project's
