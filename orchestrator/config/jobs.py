"""The sections one job each reads: ``synthetic`` (jobs.synthesize), ``tune`` (jobs.tune),
``retrain`` (jobs.retrain) and ``compare`` (jobs.compare)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from orchestrator.config.family import Head
from orchestrator.config.loss import MarginType
from orchestrator.config.method import Method
from orchestrator.config.models import Arch
from orchestrator.config.values import seed_problem
from orchestrator.metric_names import COST_METRICS, IJB_FAR_KEYS, IJB_SETS, Metric
from orchestrator.typed_yaml import (
    require,
)


@dataclass(frozen=True)
class SyntheticConfig:
    """The synthetic-identity generator (``python -m jobs.synthesize``)."""

    out: str = "runs/data/synthetic"
    num_identities: int = 200  # training identities
    eval_identities: int = 50  # held-out identities, disjoint from training
    images_per_identity: int = 12
    pairs_per_fold: int = 60  # half positive, half negative
    seed: int = 0
    image_size: int = 112
    jpeg_quality: int = 90
    shard_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        require(self.num_identities >= 2, "num_identities", "must be >= 2")
        require(seed_problem([self.seed]) is None, "seed", str(seed_problem([self.seed])))
        require(
            self.eval_identities >= 20,
            "eval_identities",
            f"must be >= 20 (10 identity-disjoint folds of 2+ identities), found {self.eval_identities}",
        )
        require(self.images_per_identity >= 2, "images_per_identity", "must be >= 2")
        require(self.pairs_per_fold >= 2, "pairs_per_fold", "must be >= 2")
        # Pairs are drawn without replacement: the smallest fold must hold half of them.
        fold = self.eval_identities // 10  # identities in the smallest of the 10 folds
        same = fold * self.images_per_identity * (self.images_per_identity - 1) // 2
        different = fold * (fold - 1) // 2 * self.images_per_identity**2
        require(
            self.pairs_per_fold // 2 <= min(same, different),
            "pairs_per_fold",
            f"{self.pairs_per_fold} needs {self.pairs_per_fold // 2} distinct same-identity and "
            f"different-identity pairs per fold, but {fold} identities of "
            f"{self.images_per_identity} images hold {same} and {different}: at most "
            f"{2 * min(same, different)}",
        )
        require(1 <= self.jpeg_quality <= 100, "jpeg_quality", "must be in [1, 100]")
        require(self.shard_bytes > 0, "shard_bytes", "must be > 0")


class SearchAlgorithm(enum.StrEnum):
    RANDOM = "random"  # num_samples draws from the lists / ranges
    GRID = "grid"  # every combination of the lists, num_samples times
    OPTUNA = "optuna"  # Optuna's TPE, of one objective or several (a Pareto front)


class Goal(enum.StrEnum):
    MAX = "max"
    MIN = "min"


@dataclass(frozen=True)
class Objective:
    """One number a search optimises: an accuracy (a Metric or ``<val target>_acc``,
    measured after each epoch) or a cost (``latency_ms``, ``serving_latency_ms``, ``macs``,
    ``params``, ``onnx_mb``: measured once per trial, before it trains)."""

    metric: str
    goal: Goal = Goal.MAX


@dataclass(frozen=True)
class Constraint:
    """A bound a trial must keep: ``metric <= at_most`` and/or ``metric >= at_least``. A
    trial that breaks a bound on ``macs`` or ``params`` (known from the architecture) never
    trains, nor does one that breaks a bound on a measured cost."""

    metric: str
    at_most: float | None = None
    at_least: float | None = None

    def __post_init__(self) -> None:
        require(
            self.at_most is not None or self.at_least is not None,
            "at_most",
            f"{self.metric}: give at_most and/or at_least",
        )

    def holds(self, value: float) -> bool:
        return (self.at_most is None or value <= self.at_most) and (
            self.at_least is None or value >= self.at_least
        )

    def describe(self) -> str:
        parts = []
        if self.at_least is not None:
            parts.append(f"{self.metric} >= {self.at_least:g}")
        if self.at_most is not None:
            parts.append(f"{self.metric} <= {self.at_most:g}")
        return " and ".join(parts)


@dataclass(frozen=True)
class LatencyConfig:
    """How a trial's student is timed: its ONNX export under onnxruntime on the CPU, at
    batch 1 and at ``serving_batch``, in ``rounds`` sessions of ``warmup`` untimed runs
    and ``repeats`` timed ones (the sessions' medians give the stated noise)."""

    threads: int = 1
    serving_batch: int = 8
    warmup: int = 5
    repeats: int = 20
    rounds: int = 5

    def __post_init__(self) -> None:
        require(self.threads >= 1, "threads", f"must be >= 1, found {self.threads}")
        require(self.serving_batch >= 1, "serving_batch", "must be >= 1")
        require(self.warmup >= 0, "warmup", "must be >= 0")
        require(self.repeats >= 10, "repeats", f"must be >= 10 (for p10/p90), found {self.repeats}")
        require(self.rounds >= 2, "rounds", f"must be >= 2 (for the noise), found {self.rounds}")


@dataclass(frozen=True)
class FloatSearch:
    """One number to search: a list of choices, or ``range: [low, high]`` sampled
    uniformly (log-uniformly for the learning rate) by random and Optuna search."""

    values: tuple[float, ...] = ()
    range: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        require(not (self.values and self.range), "range", "give values or range, not both")
        require(
            not self.range or (len(self.range) == 2 and 0 < self.range[0] < self.range[1]),
            "range",
            f"must be [low, high] with 0 < low < high, found {list(self.range)}",
        )


@dataclass(frozen=True)
class SearchSpace:
    """What ``jobs.tune`` varies; empty entries keep the base config's value. Each field's
    metadata names the experiment config key it sets."""

    margin_type: tuple[MarginType, ...] = field(default=(), metadata={"sets": "loss.margin.type"})
    margin: FloatSearch = field(
        default_factory=FloatSearch, metadata={"sets": "loss.margin.m", "log": False}
    )
    scale: FloatSearch = field(
        default_factory=FloatSearch, metadata={"sets": "loss.margin.scale", "log": False}
    )
    arch: tuple[Arch, ...] = field(default=(), metadata={"sets": "student.arch"})
    lr: FloatSearch = field(default_factory=FloatSearch, metadata={"sets": "optim.lr", "log": True})
    # proxyless+l2: the embedding-KD weight
    l2_weight: tuple[float, ...] = field(default=(), metadata={"sets": "loss.l2_weight"})
    seed: tuple[int, ...] = field(default=(), metadata={"sets": "seed"})
    # The student family (README "Searching the student"): a multiplier of the arch's
    # channels, blocks per stage, MobileFaceNet's channels before the head, the head.
    width: FloatSearch = field(
        default_factory=FloatSearch, metadata={"sets": "student.width", "log": False}
    )
    depths: tuple[tuple[int, ...], ...] = field(default=(), metadata={"sets": "student.depths"})
    feature_width: tuple[int, ...] = field(default=(), metadata={"sets": "student.feature_width"})
    head: tuple[Head, ...] = field(default=(), metadata={"sets": "student.head"})
    # The embedding width: only for the methods whose student has a width of its own
    # (scratch, logit; Method.needs_teacher_width).
    emb_dim: tuple[int, ...] = field(default=(), metadata={"sets": "student.emb_dim"})


@dataclass(frozen=True)
class TuneConfig:
    """The search of ``python -m jobs.tune``: every trial is a full Ray Train run of the
    experiment config with the values of :class:`SearchSpace` replaced.

    ASHA stops trials whose ``metric`` (measured on ``data.eval`` after every epoch) is in
    the bottom 1 - 1/reduction_factor at an epoch milestone (grace_period,
    grace_period*rf, ...).
    """

    search: SearchAlgorithm = SearchAlgorithm.RANDOM
    num_samples: int = 8
    metric: str = Metric.ACC_10FOLD.value  # a Metric, or <run.val_targets name>_acc
    space: SearchSpace = field(default_factory=SearchSpace)
    early_stopping: bool = True  # ASHA
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: float = 2.0
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs (and GPUs) hold
    storage_path: str = ""  # empty: <experiment storage_path>/tune
    # Several objectives (accuracy and cost): a Pareto front (summary/pareto.*). Empty:
    # the one objective ``metric``, maximised. ASHA stops trials on the first accuracy.
    objectives: tuple[Objective, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    # A custom node resource: each trial's driver (where its student is timed) runs on a
    # node that has it, e.g. one of the device class being served. Empty: any node.
    latency_target: str = ""

    def __post_init__(self) -> None:
        require(self.num_samples >= 1, "num_samples", f"must be >= 1, found {self.num_samples}")
        self._check_objectives()
        problem = seed_problem(self.space.seed)
        require(problem is None, "space.seed", str(problem))
        for name in ("margin", "scale", "lr"):
            span = getattr(self.space, name).range
            require(
                not (span and self.search is SearchAlgorithm.GRID),
                f"space.{name}.range",
                "grid search needs lists of values (a range cannot be enumerated)",
            )
        require(self.grace_period >= 1, "grace_period", "must be >= 1")
        require(self.reduction_factor > 1, "reduction_factor", "must be > 1")
        require(self.max_concurrent_trials >= 0, "max_concurrent_trials", "must be >= 0")

    def _check_objectives(self) -> None:
        names = [o.metric for o in self.objectives]
        require(len(set(names)) == len(names), "objectives", f"a metric is named twice: {names}")
        require(
            not self.objectives or any(n not in COST_METRICS for n in names),
            "objectives",
            f"{names} are all costs: name one accuracy too (ASHA stops trials on it)",
        )
        require(
            all(o.goal is Goal.MAX for o in self.objectives if o.metric not in COST_METRICS),
            "objectives",
            "an accuracy is maximised (goal: max)",
        )

    def accuracy_metric(self) -> str:
        """The accuracy the search ranks and ASHA stops trials on."""
        return next(
            (o.metric for o in self.objectives if o.metric not in COST_METRICS), self.metric
        )

    def goals(self) -> list[Objective]:
        """What the search optimises: ``objectives``, or ``metric`` maximised."""
        return list(self.objectives) or [Objective(self.metric, Goal.MAX)]

    def measures_cost(self) -> bool:
        """True when trials time their student (a cost is optimised or bounded)."""
        named = [o.metric for o in self.objectives] + [c.metric for c in self.constraints]
        return any(n in COST_METRICS for n in named)


@dataclass(frozen=True)
class RetrainConfig:
    """The scheduled retraining pipeline (``python -m jobs.retrain``).

    Finds the newest dataset snapshot under ``snapshots`` (each a dataset directory or
    prefix; newest = most recently published ``dataset.json``), distils a student on it
    with the rest of the experiment config, evaluates it on the fixed ``benchmark``
    (a dataset with pairs) next to the current champion, and promotes it in ``registry``
    when its ``metric`` beats the champion's by at least ``min_improvement``.
    """

    snapshots: str = ""
    benchmark: str = ""
    registry: str = ""
    # a Metric, <run.val_targets name>_acc, or with ijb: <ijb_set>_tar_at_far_<far>
    metric: str = Metric.ACC_10FOLD.value
    # An IJB-B/IJB-C directory the candidate and the champion are also scored on (1:1
    # verification; gate on e.g. IJBC_tar_at_far_1e-4).
    ijb: str = ""
    ijb_set: str = "IJBC"
    min_improvement: float = 0.0
    lock_ttl_s: float = 12 * 3600.0  # a crashed run's lock expires after this
    lock_settle_s: float = 2.0  # wait after writing the lock before trusting it

    def __post_init__(self) -> None:
        require(self.lock_ttl_s > 0, "lock_ttl_s", "must be > 0")
        require(self.lock_settle_s >= 0, "lock_settle_s", "must be >= 0")
        require(
            self.ijb_set in IJB_SETS,
            "ijb_set",
            f"expected one of {IJB_SETS}, found {self.ijb_set!r}",
        )

    def ijb_metrics(self) -> list[str]:
        """The gate metrics ``ijb`` adds: TAR at each FAR of the IJB protocol."""
        return [f"{self.ijb_set}_tar_at_far_{far}" for far in IJB_FAR_KEYS] if self.ijb else []


@dataclass(frozen=True)
class CompareConfig:
    """``python -m jobs.compare``: every method of ``methods`` trained once per seed of
    ``seeds`` at the experiment's budget (optim, data, student), one Ray Tune grid; each
    method is compared with ``baseline`` seed by seed (paired t-interval at
    ``confidence``)."""

    methods: tuple[Method, ...] = tuple(Method)
    seeds: tuple[int, ...] = (0, 1, 2)
    metrics: tuple[str, ...] = (Metric.ACC_10FOLD.value, Metric.AUC.value)
    baseline: Method = Method.PROXYLESS
    confidence: float = 0.95
    max_concurrent_trials: int = 0  # 0: as many as the cluster holds
    storage_path: str = ""  # empty: <experiment storage_path>/compare

    def __post_init__(self) -> None:
        names = [m.value for m in self.methods]
        require(bool(names), "methods", "must name at least one method")
        require(len(set(names)) == len(names), "methods", f"a method is named twice: {names}")
        require(
            self.baseline in self.methods,
            "baseline",
            f"{self.baseline.value} is not among compare.methods {names}",
        )
        require(bool(self.seeds), "seeds", "must name at least one seed")
        require(seed_problem(self.seeds) is None, "seeds", str(seed_problem(self.seeds)))
        require(
            len(set(self.seeds)) == len(self.seeds),
            "seeds",
            f"a seed is named twice: {list(self.seeds)}",
        )
        known = [m.value for m in Metric]
        for metric in self.metrics:
            require(metric in known, "metrics", f"expected names from {known}, found {metric!r}")
        require(
            0.0 < self.confidence < 1.0,
            "confidence",
            f"must be in (0, 1), found {self.confidence}",
        )
        require(self.max_concurrent_trials >= 0, "max_concurrent_trials", "must be >= 0")
