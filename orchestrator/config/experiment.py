"""The whole experiment (:class:`ExperimentConfig`): every section, and the checks that
span sections (the method against the classifier layout and the stages, the global batch
against the world sizes, metric names against the benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.config.data import DataConfig, StorageConfig
from orchestrator.config.jobs import CompareConfig, RetrainConfig, SyntheticConfig, TuneConfig
from orchestrator.config.loss import LossConfig
from orchestrator.config.method import Method
from orchestrator.config.models import StudentConfig, TeacherConfig
from orchestrator.config.tracking import TrackingConfig
from orchestrator.config.training import (
    ClassifierMode,
    OptimConfig,
    RunConfig,
    ScalingConfig,
    ShardingConfig,
    uneven_world_size,
)
from orchestrator.config.values import is_single_component, seed_problem
from orchestrator.metric_names import BENCHMARK_METRIC, COST_METRICS, Metric
from orchestrator.typed_yaml import (
    require,
)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    storage_path: str = "runs"
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher_optim: OptimConfig = field(default_factory=OptimConfig)  # jobs.train_teacher
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)  # jobs.tune
    compare: CompareConfig = field(default_factory=CompareConfig)  # jobs.compare
    retrain: RetrainConfig = field(default_factory=RetrainConfig)  # jobs.retrain
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow

    def __post_init__(self) -> None:
        self._check_name_and_seed()
        self._check_method_fits()
        for key, batch in (
            ("optim.batch_size", self.optim.batch_size),
            ("teacher_optim.batch_size", self.teacher_optim.batch_size),
        ):
            self._check_global_batch(key, batch)
        self._check_metric_names()

    def _check_name_and_seed(self) -> None:
        require(bool(self.name.strip()), "name", "must not be empty")
        require(seed_problem([self.seed]) is None, "seed", str(seed_problem([self.seed])))
        require(
            is_single_component(self.name),
            "name",
            f"must be a single path component (no '/', '\\', ':', '..'), found {self.name!r}",
        )

    def _check_method_fits(self) -> None:
        """The method, the classifier layout, the stages and the teacher's input agree."""
        # The inherited classifier (and the L2 target) live in the teacher's embedding space.
        require(
            not self.loss.method.needs_teacher_width
            or self.student.emb_dim == self.teacher.emb_dim,
            "student.emb_dim",
            f"method {self.loss.method.value} needs student.emb_dim == teacher.emb_dim, "
            f"found {self.student.emb_dim} and {self.teacher.emb_dim}",
        )
        searched = [w for w in self.tune.space.emb_dim if w != self.teacher.emb_dim]
        require(
            not self.loss.method.needs_teacher_width or not searched,
            "tune.space.emb_dim",
            f"method {self.loss.method.value} trains in the teacher's {self.teacher.emb_dim}-d "
            f"embedding space; {searched} cannot be searched with it",
        )
        require(
            self.sharding.mode is not ClassifierMode.SHARDED or self.loss.method.shardable,
            "sharding.mode",
            f"sharded is implemented for loss.method proxyless, found {self.loss.method.value}",
        )
        sampling = self.sharding.sample_rate < 1.0
        require(
            not sampling
            or (self.sharding.mode is not ClassifierMode.DENSE and self.loss.method.shardable),
            "sharding.sample_rate",
            f"{self.sharding.sample_rate} has no effect with sharding.mode "
            f"{self.sharding.mode.value} and loss.method {self.loss.method.value}: negative "
            "sampling exists only in the sharded layout (sharding.mode sharded or auto, method "
            "proxyless); remove it or change the mode",
        )
        last_stage = self.loss.multistep.stages()[-1].from_epoch
        require(
            self.loss.method is not Method.MULTISTEP or last_stage < self.optim.epochs,
            "loss.multistep.schedule",
            f"a stage starts at student epoch {last_stage} (0-based), but optim.epochs is "
            f"{self.optim.epochs}",
        )
        crop = self.teacher.input.crop
        require(
            not crop or max(crop[2], crop[3]) <= self.data.image_size,
            "teacher.input.crop",
            f"{list(crop)} reaches outside the {self.data.image_size}x{self.data.image_size} "
            "images of data.image_size",
        )

    def _check_global_batch(self, key: str, batch: int) -> None:
        uneven = uneven_world_size(batch, self.scaling)
        require(
            uneven is None,
            key,
            f"the global batch {batch} must split evenly over every world size of "
            f"scaling.num_workers={self.scaling.describe()}; it does not over {uneven} "
            "(an elastic run keeps the global batch at every size)",
        )

    def _check_metric_names(self) -> None:
        targets = val_targets(self)
        require(
            len(targets) == len(self.run.val_targets),
            "run.val_targets",
            f"two targets have one name: {list(self.run.val_targets)}",
        )
        tune = self.tune
        for key, metric in (
            ("tune.metric", tune.metric),
            ("retrain.metric", self.retrain.metric),
            ("run.best_metric", self.run.best_metric),
            *((f"tune.objectives[{i}].metric", o.metric) for i, o in enumerate(tune.objectives)),
            *((f"tune.constraints[{i}].metric", c.metric) for i, c in enumerate(tune.constraints)),
        ):
            known = [m.value for m in Metric] + [f"{name}{BENCHMARK_METRIC}" for name in targets]
            if key == "retrain.metric":
                known += self.retrain.ijb_metrics()
            if key.startswith(("tune.objectives", "tune.constraints")):
                known += list(COST_METRICS)
            require(
                metric in known,
                key,
                f"expected one of {', '.join(known)} (benchmarks: <run.val_targets name>_acc), "
                f"found {metric!r}",
            )


def val_targets(config: ExperimentConfig) -> dict[str, str]:
    """``run.val_targets`` by benchmark name: a bare name is ``<data.val_dir>/<name>.bin``;
    a path or URI is itself, named by its file's stem."""
    out: dict[str, str] = {}
    for target in config.run.val_targets:
        if target.endswith(".bin"):
            out[target.rstrip("/").rsplit("/", 1)[-1].removesuffix(".bin")] = target
            continue
        require(
            bool(config.data.val_dir) and is_single_component(target),
            "run.val_targets",
            f"{target!r}: a bare name needs data.val_dir (the folder of <name>.bin files); "
            "or give the .bin's path",
        )
        out[target] = f"{config.data.val_dir.rstrip('/')}/{target}.bin"
    return out


# --- loading, with the keys of earlier releases --------------------------------------------
