"""The sections of a training run: ``optim``, ``scaling``, ``sharding`` and ``run``."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from orchestrator.metric_names import Metric
from orchestrator.typed_yaml import (
    require,
)


class Precision(enum.StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"  # autocast of the forward pass; on CUDA always worth it, on CPU optional


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 10
    batch_size: int = 128  # global batch, split across workers
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", f"must be > 0, found {self.lr}")
        require(self.epochs >= 1, "epochs", f"must be >= 1, found {self.epochs}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, found {self.batch_size}")
        require(
            0 <= self.warmup_epochs <= self.epochs,
            "warmup_epochs",
            f"must be in [0, epochs={self.epochs}], found {self.warmup_epochs}",
        )


@dataclass(frozen=True)
class ScalingConfig:
    """How many Train workers, and what each holds.

    ``num_workers`` is a count, or ``[min, max]`` for an elastic run (Ray Train's elastic
    scaling): it starts with as many workers as the cluster has room for, up to ``max``,
    continues from its last checkpoint with the workers that remain when one is lost (at
    least ``min``), and grows back when capacity returns, checked every ``resize_check_s``.
    """

    num_workers: int | tuple[int, ...] = 2
    cpus_per_worker: float = (
        0.5  # leave CPUs for Ray Data (README "Object storage and the input pipeline")
    )
    use_gpu: bool = False
    # On a cluster reached by RAY_ADDRESS (it may autoscale): how long to wait for the
    # resources the run needs before refusing it. A private local cluster never waits.
    resources_wait_s: float = 600.0
    # Elastic runs only: how often Ray Train looks for room to grow the worker group.
    resize_check_s: float = 60.0
    # How long Ray Train waits for a worker group to start before it gives up on that size
    # (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S). After a node is lost, an elastic run first
    # asks for the old size while the node is not yet known dead: this bounds that wait.
    worker_start_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        count = self.num_workers
        if isinstance(count, tuple):
            require(
                len(count) == 2 and 1 <= count[0] <= count[1],
                "num_workers",
                f"expected a count or [min, max] with 1 <= min <= max, found {list(count)}",
            )
        else:
            require(count >= 1, "num_workers", f"must be >= 1, found {count}")
        require(self.resources_wait_s >= 0, "resources_wait_s", "must be >= 0")
        require(self.resize_check_s > 0, "resize_check_s", "must be > 0")
        require(self.worker_start_timeout_s > 0, "worker_start_timeout_s", "must be > 0")
        require(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[-1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def world_sizes(self) -> range:
        """Every worker count the run may train at."""
        return range(self.min_workers, self.max_workers + 1)

    def describe(self) -> str:
        """``2`` or ``1-2`` (elastic)."""
        if self.elastic:
            return f"{self.min_workers}-{self.max_workers}"
        return str(self.max_workers)


def uneven_world_size(batch: int, scaling: ScalingConfig) -> int | None:
    """The first world size of ``scaling`` that ``batch`` does not split evenly over."""
    return next((n for n in scaling.world_sizes if batch % n), None)


class ClassifierMode(enum.StrEnum):
    AUTO = "auto"  # sharded when num_workers > 1 and W (fp32) is at least auto_min_bytes
    DENSE = "dense"  # every worker holds all of W (one shared copy per node)
    SHARDED = "sharded"  # each worker holds C/N rows; the softmax is combined by collectives


@dataclass(frozen=True)
class ShardingConfig:
    """How the inherited classifier is laid out over the workers (method proxyless).

    The rule for ``auto``: shard when there is more than one worker and W, as float32, is at
    least ``auto_min_bytes``; otherwise replicate it. Sharded, each worker reads only its rows
    [start, start + C/N) from storage and the loss is computed in class chunks of
    ``chunk_size`` rows (memory W_r + O(global batch x chunk_size)).
    """

    mode: ClassifierMode = ClassifierMode.AUTO
    auto_min_bytes: int = 256 * 2**20
    chunk_size: int = 65536
    matmul_precision: Precision = Precision.FP32  # bf16: the two chunk GEMMs; stats stay fp32
    # Partial FC-style negative sampling, sharded layout only. Below 1.0 the softmax is an
    # APPROXIMATION (all positives of the batch kept, this fraction of each shard's rows).
    sample_rate: float = 1.0

    def __post_init__(self) -> None:
        require(self.auto_min_bytes >= 0, "auto_min_bytes", "must be >= 0")
        require(
            0.0 < self.sample_rate <= 1.0,
            "sample_rate",
            f"must be in (0, 1], found {self.sample_rate}",
        )
        require(self.chunk_size >= 1, "chunk_size", f"must be >= 1, found {self.chunk_size}")


@dataclass(frozen=True)
class RunConfig:
    """How a training run executes: fault tolerance, checkpoints, evaluation, devices."""

    max_failures: int = 0  # worker-group restarts from the last checkpoint before giving up
    checkpoint_every_epochs: int = 1
    # Also checkpoint every this many steps inside an epoch (0: off). A run resumed from such
    # a checkpoint trains on exactly the images of that epoch it had not trained on yet;
    # the checkpoint holds 8 bytes per image trained so far in the epoch.
    checkpoint_every_steps: int = 0
    # Checkpoints kept per run: the most recent ones (Ray Train's CheckpointConfig; the
    # latest is kept whatever this says, so a resume always has one). 0: every one is kept.
    keep_checkpoints: int = 2
    # Besides those, <storage>/<name>/best/ holds the state of the epoch with the highest
    # validation best_metric so far (written when a validation improves on it).
    keep_best: bool = True
    best_metric: str = Metric.ACC_10FOLD.value  # a Metric, or <val target>_acc
    # Benchmarks validated with data.eval, like arcface_torch's val_targets: names of
    # insightface .bin sets under data.val_dir (lfw, cfp_fp, agedb_30, ...) or paths/URIs to
    # .bin files. Each reports val_<name>_acc per validation (usable as tune.metric,
    # retrain.metric, run.best_metric: <name>_acc).
    val_targets: tuple[str, ...] = ()
    # The run lock (<storage_path>/.locks/<name>.json): a crashed run's lock expires after
    # lock_ttl_s (a live run's heartbeat keeps pushing it forward); lock_settle_s is the
    # wait between writing the lock and reading it back (two runs that raced see one owner).
    lock_ttl_s: float = 600.0
    lock_settle_s: float = 1.0
    eval_every_epochs: int = 1  # 0: evaluate only after the last epoch
    precision: Precision = Precision.FP32
    channels_last: bool = False
    log_every_s: float = 10.0
    shuffle_buffer: int = 1000  # rows in each worker's local shuffle buffer
    # BatchNorm statistics over the global batch (all workers) instead of each worker's
    # own: for small per-worker batches. One all-reduce per BatchNorm layer per step.
    sync_batchnorm: bool = False
    # Write the image ids each worker trained on, per epoch, to <storage>/<name>/audit/
    # (to check that the workers split every epoch exactly; costs a little I/O per epoch).
    audit_ids: bool = False

    def __post_init__(self) -> None:
        require(self.max_failures >= -1, "max_failures", "must be >= 0, or -1 for unlimited")
        require(self.checkpoint_every_epochs >= 1, "checkpoint_every_epochs", "must be >= 1")
        require(
            self.checkpoint_every_steps >= 0,
            "checkpoint_every_steps",
            f"must be >= 0 (0: only at epoch ends), found {self.checkpoint_every_steps}",
        )
        require(self.keep_checkpoints >= 0, "keep_checkpoints", "must be >= 0 (0: keep all)")
        require(self.lock_ttl_s > 0, "lock_ttl_s", "must be > 0")
        require(self.lock_settle_s >= 0, "lock_settle_s", "must be >= 0")
        require(self.eval_every_epochs >= 0, "eval_every_epochs", "must be >= 0")
        require(self.log_every_s > 0, "log_every_s", "must be > 0")
        require(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0")
