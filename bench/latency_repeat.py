"""Do latency figures repeat? The milliseconds, and the ratio to the reference network.

    python bench/latency_repeat.py                  # 60 s of measurements
    python bench/latency_repeat.py --seconds 20 --width 0.25

A search reports each front student's batch-1 latency twice over: its median in ms ± its
noise, and its time over the reference network's (orchestrator.cost.Relative) ± its noise,
the two networks run in alternation. This script calls the same function the search
calls (orchestrator.cost.time_beside) over and over for ``--seconds`` on one student of
the family, and compares every pair of measurements: how many differ by more than their
two noises added, and the worst difference in units of that sum. Run it beside other work
to see a loaded machine (e.g. ``make test-fast`` in another shell).

Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace

import benchlib  # first: it puts this checkout on sys.path
import torch

from orchestrator.config import LatencyConfig
from orchestrator.config.family import NAMED_SHAPES
from orchestrator.cost import REFERENCE, reference_graph, time_beside
from orchestrator.export import to_onnx
from orchestrator.models import build_shape
from orchestrator.typed_yaml import FieldError

SIZE = 112


def disagreement(figures: list[tuple[float, float]]) -> list[float]:
    """For every pair of (median, noise): the relative difference of the medians over the
    two noises added (above 1: outside the stated noise)."""
    return [abs(a / b - 1.0) / (na + nb) for (a, na), (b, nb) in itertools.combinations(figures, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--width", type=float, default=0.5, help="of tiny_mobilefacenet")
    args = parser.parse_args()
    latency = LatencyConfig()  # the defaults a search times with
    try:
        shape = replace(NAMED_SHAPES["tiny_mobilefacenet"], width=args.width)
    except FieldError as err:
        parser.error(f"--width: {err.message}")
    torch.manual_seed(0)
    graph = to_onnx(build_shape(shape, 512, input_size=SIZE), SIZE)
    reference = reference_graph(SIZE)
    absolute: list[tuple[float, float]] = []
    relative: list[tuple[float, float]] = []
    end = time.monotonic() + args.seconds
    while time.monotonic() < end or len(absolute) < 2:
        one, ratio = time_beside(graph, reference, image_size=SIZE, batch=1, latency=latency)
        absolute.append((one.median_ms, one.noise))
        relative.append((ratio.median, ratio.noise))
        print(
            f"  {one.median_ms:7.3f} ms ± {one.noise:.3f}   x {ratio.median:.4f} ± {ratio.noise:.3f}"
        )
    rows = {}
    print(f"\nstudent {shape.label()} against {REFERENCE}, batch 1, {len(absolute)} measurements")
    print(f"{'figure':>10} {'pairs':>7} {'outside':>8} {'share':>7} {'worst':>7} {'noise':>7}")
    for name, figures in (("ms", absolute), ("x ref", relative)):
        d = disagreement(figures)
        outside = sum(x > 1.0 for x in d)
        noise = sorted(n for _, n in figures)[len(figures) // 2]
        rows[name] = {"pairs": len(d), "outside": outside, "worst": max(d), "median_noise": noise}
        print(
            f"{name:>10} {len(d):7d} {outside:8d} {outside / len(d):7.1%} {max(d):7.2f} {noise:7.3f}"
        )
    targets = benchlib.judged(
        [
            benchlib.Target(
                "ratio pairs outside their noise", rows["x ref"]["outside"], 0, at_most=True
            ),
        ]
    )
    print(json.dumps({"measurements": len(absolute), "figures": rows, "targets": targets}))


if __name__ == "__main__":
    main()
