"""What a student costs to run, measured: parameters and MACs from one forward pass, and
the latency of its ONNX export under onnxruntime with the threads and batch sizes a config
names (the median of repeated runs after a warm-up, in several sessions, and its noise).

The latency of a network does not depend on its weights, so a search times each trial's
architecture once, before it trains, and the front's trained students again at the end.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from orchestrator.config import LatencyConfig
from orchestrator.export import to_onnx
from orchestrator.metric_names import MACS, ONNX_MB, PARAMS, TIMING_SPREAD, TIMINGS
from orchestrator.models import profile_model


@dataclass(frozen=True)
class Latency:
    """Wall time of one ``session.run``, in milliseconds, over ``rounds`` sessions of
    ``runs`` timed runs each: the median and p10/p90 of every run, and ``noise``, relative
    to the median: the larger of the largest distance of one session's median from the
    median of all (what changes from one session to the next: memory placement, the
    machine's load) and half the p10-p90 width (what changes from one run to the next).
    Measured on these 2-core machines: two measurements of one graph a second apart
    differed by at most 0.44 of their two noises added (90 pairs); by the sessions' medians
    alone, 2 pairs in 50 differed by more."""

    batch: int
    threads: int
    runs: int  # timed runs in each round
    rounds: int
    median_ms: float
    p10_ms: float
    p90_ms: float
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


def timed_metrics(one: Latency, serving: Latency, onnx_bytes: int) -> dict[str, float]:
    """What an export's timing gives, by the names a search reports (:data:`TIMINGS`,
    :data:`TIMING_SPREAD`)."""
    out = {ONNX_MB: onnx_bytes / 1e6}
    for (timing, median), timed in zip(TIMINGS.items(), (one, serving), strict=True):
        spread = (timed.p10_ms, timed.p90_ms, timed.noise)
        out[median] = timed.median_ms
        out |= {f"{timing}_{part}": v for part, v in zip(TIMING_SPREAD, spread, strict=True)}
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


def time_onnx(graph: bytes, *, image_size: int, batch: int, latency: LatencyConfig) -> Latency:
    """Time ``graph`` (input ``image``, (B, 3, S, S) float32) on the CPU with
    ``latency.threads`` threads: ``latency.rounds`` sessions, each run ``latency.warmup``
    times untimed and then ``latency.repeats`` times timed."""
    x = np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size))
    feed = {"image": x.astype(np.float32)}
    rounds = [time_session(graph, feed, latency) for _ in range(latency.rounds)]
    times = [t for one in rounds for t in one]
    median = statistics.median(times)
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    sessions = max(abs(statistics.median(one) / median - 1.0) for one in rounds)
    noise = max(sessions, (deciles[-1] - deciles[0]) / (2.0 * median))
    return Latency(
        batch=batch,
        threads=latency.threads,
        runs=latency.repeats,
        rounds=latency.rounds,
        median_ms=median,
        p10_ms=deciles[0],
        p90_ms=deciles[-1],
        noise=noise,
    )


def time_session(graph: bytes, feed: dict[str, np.ndarray], latency: LatencyConfig) -> list[float]:
    """One round: a new onnxruntime session, its warm-up, its timed runs (ms)."""
    # onnxruntime: heavy, only for ONNX models
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = latency.threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = onnxruntime.InferenceSession(
        graph, sess_options=options, providers=["CPUExecutionProvider"]
    )
    for _ in range(latency.warmup):
        session.run(None, feed)
    times = []
    for _ in range(latency.repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


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
