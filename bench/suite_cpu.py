"""Where the test suite's time goes: each test file's wall seconds and the machine's busy CPU
seconds during it, from one pytest run in this process.

    python bench/suite_cpu.py                        # the whole suite (about 32 min here)
    python bench/suite_cpu.py tests/test_retrain.py  # any pytest arguments (paths from
                                                     # the checkout's root)

Columns, per test file (a module fixture counts in its first test):

  wall      seconds from the start of its first test's set-up to its last test's teardown
  busy      CPU seconds used by the whole machine meanwhile (every core, every process:
            pytest, Ray's processes, CLI subprocesses, servers), from /proc/stat
  busy %    busy over (wall x cores): how well the file keeps the cores working
  idle      core-seconds left unused (wall x cores - busy): what overlapping it with other
            work could win at most

The totals bound what any change can reach. The suite cannot run in less than busy / cores
seconds without using less CPU, whatever runs beside what; at the measured share it takes
busy / (cores x share). A tiny Ray Train fit costs about 30 CPU seconds, nearly all in the
ten or so processes it starts. The target is issue 29's: `make test` within 25 minutes on
the 2-core machine, less the seconds outside pytest (--outside, measured: lint, mypy and
pip's check of an installed environment).
Prints the table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import benchlib  # first: it puts this checkout on sys.path
import pytest

SUITE_LIMIT_S = 25 * 60


@dataclass(frozen=True)
class CpuOfTest:
    """One test's share of a run: its node id, seconds from set-up to teardown, and the
    machine's busy CPU seconds over them."""

    nodeid: str
    wall_s: float
    busy_s: float


@dataclass(frozen=True)
class FileCpu:
    path: str
    tests: int
    wall_s: float
    busy_s: float
    cores: int

    @property
    def share(self) -> float:
        return self.busy_s / (self.wall_s * self.cores) if self.wall_s > 0 else 0.0

    @property
    def idle_s(self) -> float:
        return self.wall_s * self.cores - self.busy_s


def by_file(tests: list[CpuOfTest], cores: int) -> list[FileCpu]:
    """Each file's totals, the most CPU first."""
    totals: dict[str, list[float]] = {}
    for test in tests:
        row = totals.setdefault(test.nodeid.split("::")[0], [0, 0.0, 0.0])
        row[0] += 1
        row[1] += test.wall_s
        row[2] += test.busy_s
    files = [FileCpu(path, int(n), wall, busy, cores) for path, (n, wall, busy) in totals.items()]
    return sorted(files, key=lambda f: -f.busy_s)


def bounds(files: list[FileCpu], cores: int, outside_s: float) -> dict[str, float]:
    """The run's totals and what they imply for the suite limit: the pytest time at the
    measured share and at a share of 1, and the CPU seconds the limit allows at each."""
    wall = sum(f.wall_s for f in files)
    busy = sum(f.busy_s for f in files)
    share = busy / (wall * cores) if wall > 0 else 0.0
    pytest_budget = SUITE_LIMIT_S - outside_s
    return {
        "wall_s": wall,
        "busy_s": busy,
        "share": share,
        "least_wall_s": busy / cores,
        "pytest_budget_s": pytest_budget,
        "busy_allowed_at_share_s": pytest_budget * cores * share,
        "busy_allowed_at_full_s": pytest_budget * cores,
    }


class Recorder:
    """A pytest plugin: wall and busy seconds around each test's whole protocol."""

    def __init__(self) -> None:
        self.tests: list[CpuOfTest] = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Iterator[None]:
        busy, start = benchlib.machine_busy_s(), time.monotonic()
        yield
        self.tests.append(
            CpuOfTest(item.nodeid, time.monotonic() - start, benchlib.machine_busy_s() - busy)
        )


def print_table(files: list[FileCpu], totals: dict[str, float], top: int) -> None:
    print(f"{'file':44s} {'tests':>5s} {'wall':>7s} {'busy':>7s} {'busy %':>6s} {'idle':>6s}")
    for f in files[:top]:
        print(
            f"{f.path:44s} {f.tests:5d} {f.wall_s:7.0f} {f.busy_s:7.0f} "
            f"{f.share:6.0%} {f.idle_s:6.0f}"
        )
    if len(files) > top:
        print(f"... {len(files) - top} more files")
    print(
        f"\nall: {totals['wall_s']:.0f} s wall, {totals['busy_s']:.0f} CPU s busy "
        f"({totals['share']:.0%} of the cores); no overlap can bring it under "
        f"{totals['least_wall_s']:.0f} s without less CPU.\n"
        f"25 min less {SUITE_LIMIT_S - totals['pytest_budget_s']:.0f} s outside pytest "
        f"leaves {totals['pytest_budget_s']:.0f} s: {totals['busy_allowed_at_share_s']:.0f} "
        f"CPU s at this share, {totals['busy_allowed_at_full_s']:.0f} with every core busy."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Each test file's wall and busy CPU seconds; other arguments go to pytest"
    )
    parser.add_argument("--top", type=int, default=30, help="files in the table")
    parser.add_argument(
        "--outside", type=float, default=121.0,
        help="seconds of make test outside pytest (pip install, lint, mypy); 121 measured here",
    )  # fmt: skip
    args, pytest_args = parser.parse_known_args(argv)
    cores = os.cpu_count() or 1
    recorder = Recorder()
    os.chdir(benchlib.REPO)  # pytest's rootdir, configuration and test paths: the checkout's
    code = pytest.main(["-q", "-p", "no:cacheprovider", *pytest_args], plugins=[recorder])
    files = by_file(recorder.tests, cores)
    totals = bounds(files, cores, args.outside)
    print()
    print_table(files, totals, args.top)
    rounded = {k: round(v, 3) for k, v in totals.items()}
    files_json = [
        {
            **asdict(f),
            "wall_s": round(f.wall_s, 1),
            "busy_s": round(f.busy_s, 1),
            "share": round(f.share, 3),
        }
        for f in files
    ]
    summary: dict[str, Any] = {"cores": cores, "pytest_exit": int(code), **rounded}
    print(json.dumps({**summary, "files": files_json}))
    return int(code)


if __name__ == "__main__":
    raise SystemExit(main())
