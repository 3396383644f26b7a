"""What a student costs to run, measured: parameters and MACs from one forward pass, and
the latency of its ONNX export under onnxruntime with the threads and batch sizes a config
names (the median of repeated runs after a warm-up, in several sessions, and its noise).

The latency of a network does not depend on its weights, so a search times each trial's
architecture once, before it trains, and the front's trained students again at the end,
each beside a fixed reference network (:class:`Relative`): on a shared machine the
milliseconds drift with the machine, the ratio to a network timed alongside does not.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator.config import LatencyConfig
from orchestrator.config.family import NAMED_SHAPES
from orchestrator.export import to_onnx
from orchestrator.metric_names import (
    MACS,
    ONNX_MB,
    PARAMS,
    RELATIVE_SPREAD,
    TIMING_SPREAD,
    TIMINGS,
    relative_key,
)
from orchestrator.models import build_shape, profile_model

REFERENCE = "tiny_mobilefacenet"  # the network Relative figures divide by (reference_graph)


@dataclass(frozen=True)
class Latency:
    """Wall time of one ``session.run``, in milliseconds, over ``rounds`` sessions of
    ``runs`` timed runs each: the median and p10/p90 of every run, and ``noise``, relative
    to the median: the larger of the largest distance of one session's median from the
    median of all and half the p10-p90 width. That is the spread within one measurement
    (about a second). On a shared machine the speed of a core also changes over seconds,
    for reasons outside this machine: two measurements of one graph at different times can
    differ by more than their two noises added (``bench/latency_repeat.py`` on the 2-core
    machines: in 0.2-0.5% of pairs, by up to 1.25 times that sum; a CI run of the search
    test, by 1.13 times). An absolute figure says what a graph cost then and there; compare
    graphs by their :class:`Relative` figures, which repeat."""

    batch: int
    threads: int
    runs: int  # timed runs in each round
    rounds: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    noise: float


@dataclass(frozen=True)
class Relative:
    """A graph's time over the :func:`reference_graph`'s, the two run in alternation in the
    same sessions' rounds (one run of each, over and over): the median of the per-pair
    ratios, their p10/p90, and ``noise`` as :class:`Latency` defines it. Whatever slows the
    core slows both runs of a pair, so the ratio repeats where the milliseconds do not
    (``bench/latency_repeat.py``: every pair of measurements within its two noises added,
    at most 0.44 of that sum, quiet or beside the unit tests)."""

    batch: int
    median: float
    p10: float
    p90: float
    noise: float


@dataclass(frozen=True)
class StudentCost:
    params: int
    macs: int
    onnx_bytes: int
    latency: Latency  # batch 1
    serving: Latency  # tune.latency.serving_batch

    def metrics(self) -> dict[str, float]:
        """The numbers by the names of :data:`COST_METRICS`, and the timings' spread."""
        return {
            MACS: float(self.macs),
            PARAMS: float(self.params),
            **timed_metrics(self.latency, self.serving, self.onnx_bytes),
        }


def timed_metrics(
    one: Latency,
    serving: Latency,
    onnx_bytes: int,
    relative: tuple[Relative, Relative] | None = None,
) -> dict[str, float]:
    """What an export's timing gives, by the names a search reports (:data:`TIMINGS`,
    :data:`TIMING_SPREAD`, and with ``relative``, batch 1's and the serving batch's
    :class:`Relative` as :func:`relative_key` and :data:`RELATIVE_SPREAD`)."""
    out = {ONNX_MB: onnx_bytes / 1e6}
    for (timing, median), timed in zip(TIMINGS.items(), (one, serving), strict=True):
        spread = (timed.p10_ms, timed.p90_ms, timed.noise)
        out[median] = timed.median_ms
        out |= {f"{timing}_{part}": v for part, v in zip(TIMING_SPREAD, spread, strict=True)}
    for timing, ratio in zip(TIMINGS, relative or (), strict=False):
        key = relative_key(timing)
        out[key] = ratio.median
        parts = (ratio.p10, ratio.p90, ratio.noise)
        out |= {f"{key}_{part}": v for part, v in zip(RELATIVE_SPREAD, parts, strict=True)}
    return out


def latency_from(
    metrics: dict[str, Any], prefix: str, batch: int, latency: LatencyConfig
) -> Latency:
    """A :class:`Latency` back from :func:`timed_metrics`' numbers (``prefix``: a key of
    :data:`TIMINGS`)."""
    median = metrics[TIMINGS[prefix]]
    return Latency(
        batch=batch,
        threads=latency.threads,
        runs=latency.repeats,
        rounds=latency.rounds,
        median_ms=float(median),
        p10_ms=float(metrics[f"{prefix}_p10_ms"]),
        p90_ms=float(metrics[f"{prefix}_p90_ms"]),
        noise=float(metrics[f"{prefix}_noise"]),
    )


def relative_from(metrics: dict[str, Any], prefix: str, batch: int) -> Relative | None:
    """A :class:`Relative` back from :func:`timed_metrics`' numbers, or None when the
    student was not timed beside the reference."""
    key = relative_key(prefix)
    if key not in metrics:
        return None
    parts = [float(metrics[f"{key}_{part}"]) for part in RELATIVE_SPREAD]
    return Relative(batch, float(metrics[key]), *parts)


def time_onnx(graph: bytes, *, image_size: int, batch: int, latency: LatencyConfig) -> Latency:
    """Time ``graph`` (input ``image``, (B, 3, S, S) float32) on the CPU with
    ``latency.threads`` threads: ``latency.rounds`` sessions, each run ``latency.warmup``
    times untimed and then ``latency.repeats`` times timed."""
    feed = image_feed(batch, image_size)
    rounds = [time_session(graph, feed, latency) for _ in range(latency.rounds)]
    return latency_of(rounds, batch=batch, latency=latency)


def image_feed(batch: int, image_size: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size))
    return {"image": x.astype(np.float32)}


def spread(rounds: list[list[float]]) -> tuple[float, float, float, float]:
    """The median, p10 and p90 of every value of every round, and the noise (relative):
    the larger of the largest distance of one round's median from the median, and half
    the p10-p90 width."""
    values = [v for one in rounds for v in one]
    median = statistics.median(values)
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    sessions = max(abs(statistics.median(one) / median - 1.0) for one in rounds)
    return (
        median,
        deciles[0],
        deciles[-1],
        max(sessions, (deciles[-1] - deciles[0]) / (2.0 * median)),
    )


def latency_of(rounds: list[list[float]], *, batch: int, latency: LatencyConfig) -> Latency:
    median, p10, p90, noise = spread(rounds)
    return Latency(
        batch=batch,
        threads=latency.threads,
        runs=latency.repeats,
        rounds=latency.rounds,
        median_ms=median,
        p10_ms=p10,
        p90_ms=p90,
        noise=noise,
    )


def reference_graph(image_size: int) -> bytes:
    """The network every :class:`Relative` figure divides by: ``tiny_mobilefacenet``
    (512-d) at ``image_size``, its weights drawn from seed 0 (a latency does not depend on
    them; the seed makes the file the same every time)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_shape(NAMED_SHAPES[REFERENCE], 512, input_size=image_size)
    return to_onnx(model, image_size)


def time_beside(
    graph: bytes, reference: bytes, *, image_size: int, batch: int, latency: LatencyConfig
) -> tuple[Latency, Relative]:
    """Time ``graph`` as :func:`time_onnx` does, each timed run followed by one of
    ``reference`` in a session of its own: the graph's latency, and its time relative to
    the reference's, pair by pair."""
    feed = image_feed(batch, image_size)
    pairs = [time_pairs(graph, reference, feed, latency) for _ in range(latency.rounds)]
    own = [[a for a, _ in one] for one in pairs]
    median, p10, p90, noise = spread([[a / b for a, b in one] for one in pairs])
    return latency_of(own, batch=batch, latency=latency), Relative(batch, median, p10, p90, noise)


def time_session(graph: bytes, feed: dict[str, np.ndarray], latency: LatencyConfig) -> list[float]:
    """One round: a new onnxruntime session, its warm-up, its timed runs (ms)."""
    session = new_session(graph, latency)
    for _ in range(latency.warmup):
        session.run(None, feed)
    return [timed_run(session, feed) for _ in range(latency.repeats)]


def time_pairs(
    graph: bytes, reference: bytes, feed: dict[str, np.ndarray], latency: LatencyConfig
) -> list[tuple[float, float]]:
    """One round of :func:`time_beside`: a session of each, both warmed up, then
    ``latency.repeats`` pairs of timed runs (ms), the graph's first."""
    sessions = [new_session(g, latency) for g in (graph, reference)]
    for _ in range(latency.warmup):
        for session in sessions:
            session.run(None, feed)
    return [
        (timed_run(sessions[0], feed), timed_run(sessions[1], feed)) for _ in range(latency.repeats)
    ]


def new_session(graph: bytes, latency: LatencyConfig) -> Any:
    """An onnxruntime CPU session with ``latency.threads`` threads, run sequentially."""
    # onnxruntime: heavy, only for ONNX models
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = latency.threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(
        graph, sess_options=options, providers=["CPUExecutionProvider"]
    )


def timed_run(session: Any, feed: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(None, feed)
    return (time.perf_counter() - start) * 1000.0


def time_graph(graph: bytes, *, image_size: int, latency: LatencyConfig) -> tuple[Latency, Latency]:
    """Batch 1 and the serving batch."""
    one = time_onnx(graph, image_size=image_size, batch=1, latency=latency)
    serving = time_onnx(graph, image_size=image_size, batch=latency.serving_batch, latency=latency)
    return one, serving


def measure_cost(
    model: nn.Module, *, image_size: int, latency: LatencyConfig
) -> tuple[StudentCost, bytes]:
    """The student's cost and its ONNX export (the graph that was timed)."""
    profile = profile_model(model, image_size)
    graph = to_onnx(model.eval(), image_size)
    one, serving = time_graph(graph, image_size=image_size, latency=latency)
    cost = StudentCost(profile.params, profile.macs, len(graph), one, serving)
    return cost, graph
