"""A search trial's cost, before it trains: its student built from the config, counted
(parameters, MACs), exported to ONNX and timed; the search's constraints judged on those
numbers. A trial that breaks one never trains; the others carry their cost in every
report they make to Tune, so that ASHA's stopped trials have it too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.config import ExperimentConfig
from orchestrator.cost import StudentCost, measure_cost
from orchestrator.metric_names import (
    ARCHITECTURE_METRICS,
    COST_METRICS,
    report_key,
    validation_key,
)
from orchestrator.models import build_shape
from orchestrator.tune_summary import REFUSED_BY, STUDENT_SHAPE


@dataclass(frozen=True)
class CostVerdict:
    cost: StudentCost
    shape: str  # the student's point of the family, as a label
    broken: tuple[str, ...]  # the constraints it breaks, described

    def metrics(self) -> dict[str, Any]:
        """What every report of the trial carries."""
        return {**self.cost.metrics(), STUDENT_SHAPE: self.shape}

    def refusal(self, config: ExperimentConfig) -> dict[str, Any]:
        """The one report of a refused trial: its cost, and 0 for each accuracy it never
        measured (the worst value: the sampler learns to leave that region)."""
        accuracies = {
            report_key(o.metric): 0.0 for o in config.tune.goals() if o.metric not in COST_METRICS
        }
        accuracies[validation_key(config.tune.accuracy_metric())] = 0.0
        return {**self.metrics(), **accuracies, "epoch": -1, REFUSED_BY: "; ".join(self.broken)}


def judge_cost(config: ExperimentConfig) -> CostVerdict:
    """Measure the trial's student and judge ``tune.constraints``: those on the
    architecture (MACs, params) first, then those on what the export measured."""
    shape = config.student.shape()
    model = build_shape(shape, config.student.emb_dim, input_size=config.data.image_size)
    cost, _ = measure_cost(model, image_size=config.data.image_size, latency=config.tune.latency)
    values = cost.metrics()
    ordered = sorted(config.tune.constraints, key=lambda c: c.metric not in ARCHITECTURE_METRICS)
    broken = tuple(
        c.describe() + f" (found {values[c.metric]:g})"
        for c in ordered
        if c.metric in values and not c.holds(values[c.metric])
    )
    return CostVerdict(cost, shape.label(), broken)


def with_cost(extra: dict[str, Any]) -> Any:
    """Ray Tune's report callback for a Train run, adding ``extra`` to every report."""
    # ray.tune: heavy (about a second to import), imported where it is used
    from ray.tune.integration.ray_train import TuneReportCallback

    class TuneReportWithCost(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: Any, checkpoint: Any) -> None:
            super().after_report(run_context, [{**m, **extra} for m in metrics], checkpoint)

    return TuneReportWithCost()
