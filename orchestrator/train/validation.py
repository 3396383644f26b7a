"""Validation inside the run and the choice of its best epoch. Rank 0 measures the student
on the held-out set (``data.eval``) and the ``run.val_targets`` benchmarks, each loaded
once per run; :func:`new_best` decides, as a pure function, whether an epoch's metrics
replace ``<run>/best``."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from orchestrator.benchmarks.suite import BinBenchmark, load_bin_benchmark
from orchestrator.config import ExperimentConfig, val_targets
from orchestrator.evaluation import (
    EvalSet,
    Flip,
    NonFiniteEmbeddingsError,
    embed_images,
    evaluate_model,
    load_eval_set,
    pair_verification,
)
from orchestrator.formats.best import BestRecord
from orchestrator.metric_names import BENCHMARK_METRIC, Metric, validation_key

NONFINITE_KEY = "val_nonfinite"  # 1.0: the epoch's validation embeddings were not finite
NONFINITE_SCORE = -1.0  # every metric is in [0, 1]: -1 is below any measured value


@dataclass
class Validator:
    """Rank 0's validation: ``eval_uri`` and the config's ``run.val_targets``, loaded on
    first use and kept for the rest of the run."""

    eval_uri: str
    config: ExperimentConfig
    tag: str  # the run's prefix on the lines it prints
    eval_set: EvalSet | None = None
    benches: dict[str, BinBenchmark] = field(default_factory=dict)

    def metrics(self, student: nn.Module) -> dict[str, float]:
        """The student's validation metrics, with ``val_nonfinite`` 0; or, when its
        embeddings were not finite, every metric at ``NONFINITE_SCORE`` and ``val_nonfinite``
        1 (recorded, not hidden: Tune and ASHA rank the trial last and ``run.keep_best``
        never picks the epoch)."""
        self.eval_set = self.eval_set or load_eval_set(self.eval_uri)
        try:
            return {**self.measured(student, self.eval_set), NONFINITE_KEY: 0.0}
        except NonFiniteEmbeddingsError as err:
            print(f"{self.tag} WARNING: validation failed this epoch: {err}", flush=True)
            return failed_validation(self.config)

    def measured(self, student: nn.Module, eval_set: EvalSet) -> dict[str, float]:
        report = evaluate_model(student, eval_set)
        values = {metric.validation_key: metric.read(report) for metric in Metric}
        for name, uri in val_targets(self.config).items():
            if name not in self.benches:
                image_size = self.config.data.image_size
                self.benches[name] = load_bin_benchmark(uri, image_size=image_size)
            bench = self.benches[name]
            emb = embed_images(student, bench.images, flip=Flip.SUM, label=f"val {name}")
            key = validation_key(name + BENCHMARK_METRIC)
            values[key] = pair_verification(bench.pairs, emb)["acc_10fold"]
        return {key: value for key, value in values.items() if value is not None}


def failed_validation(config: ExperimentConfig) -> dict[str, float]:
    """The metrics of a validation whose embeddings were not finite."""
    keys = [metric.validation_key for metric in Metric]
    keys += [validation_key(name + BENCHMARK_METRIC) for name in val_targets(config)]
    return {**dict.fromkeys(keys, NONFINITE_SCORE), NONFINITE_KEY: 1.0}


def new_best(
    validation: dict[str, float], *, metric: str, epoch: int, best: BestRecord | None
) -> BestRecord | None:
    """The record of ``epoch`` when its ``metric`` beats ``best`` (any measured value beats
    none); None when it does not, when the metric was not measured, or when the epoch's
    embeddings were not finite."""
    value = validation.get(validation_key(metric))
    if value is None or validation.get(NONFINITE_KEY):
        return None
    if best is not None and not best.improved_by(metric, value):
        return None
    return BestRecord(metric, epoch, value)
