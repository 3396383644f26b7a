"""Typed experiment configuration.

One frozen dataclass per concern, nested in :class:`ExperimentConfig`. YAML files in
``configs/`` are plain data loaded into it; ``--set section.key=value`` overrides go through
the same type checks. Every error names the key and the file it came from::

    configs/demo.yaml: loss.margn: unknown key in LossConfig (did you mean 'margin'?)

Validation of single values and of combinations lives in each dataclass's
``__post_init__`` so that a config built in Python is checked exactly like one from YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    """A config value is unknown, mistyped or contradicts another value."""


class Method(enum.StrEnum):
    """How the student is trained (DESIGN.md section 3)."""

    PROXYLESS = "proxyless"  # inherited frozen teacher classifier (ProxylessKD)
    SCRATCH = "scratch"  # the student's own trainable margin classifier
    L2 = "l2"  # own classifier + squared L2 to the teacher's embeddings
    LOGIT = "logit"  # own classifier + Hinton KD on the teacher's logits
    PROXYLESS_L2 = "proxyless+l2"  # inherited classifier + squared L2 to the teacher

    # The facts about each method, in one place: config validation, the driver, the loss
    # factory and the tests all ask these properties.

    @property
    def inherits_classifier(self) -> bool:
        """The student's logits are taken against the teacher's frozen classifier W."""
        return self in (Method.PROXYLESS, Method.PROXYLESS_L2)

    @property
    def uses_teacher_classifier(self) -> bool:
        """W must be placed for the workers: inherited, or (logit) applied to the teacher's
        own embeddings to make the soft targets."""
        return self.inherits_classifier or self is Method.LOGIT

    @property
    def needs_teacher_embeddings(self) -> bool:
        """Each batch also goes through the teacher backbone."""
        return self in (Method.L2, Method.LOGIT, Method.PROXYLESS_L2)

    @property
    def needs_teacher_width(self) -> bool:
        """The student must embed in the teacher's space: student.emb_dim == teacher.emb_dim.

        ``logit`` does not: Hinton KD compares class probabilities, the teacher's from W on
        the teacher's embeddings and the student's from its own head, so the student's
        width is free."""
        return self.inherits_classifier or self is Method.L2

    @property
    def uses_l2(self) -> bool:
        return self in (Method.L2, Method.PROXYLESS_L2)

    @property
    def shardable(self) -> bool:
        """The class-sharded loss (sharding.mode sharded) implements this method."""
        return self is Method.PROXYLESS


class MarginType(enum.StrEnum):
    ARCFACE = "arcface"  # s*cos(theta + m)
    COSFACE = "cosface"  # s*(cos(theta) - m)
    COMBINED = "combined"  # s*(cos(m1*theta + m2) - m3)


class Arch(enum.StrEnum):
    MOBILEFACENET = "mobilefacenet"
    IRESNET18 = "iresnet18"
    IRESNET34 = "iresnet34"
    IRESNET50 = "iresnet50"
    IRESNET100 = "iresnet100"
    SMALL_MOBILEFACENET = "small_mobilefacenet"  # half width, full depth: the demo's teacher
    TINY_MOBILEFACENET = "tiny_mobilefacenet"  # CPU tests and demos
    TINY_IRESNET = "tiny_iresnet"  # CPU tests and demos


class Precision(enum.StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"  # autocast of the forward pass; on CUDA always worth it, on CPU optional


class OnCorrupt(enum.StrEnum):
    """What ``jobs.prepare_dataset --on-corrupt`` does with an undecodable input image.
    (Training input has no such option: a dataset holds only images that decoded at
    import, so a corrupt one in training means the storage changed, and stops the run.)"""

    ERROR = "error"  # stop at the first undecodable image, naming it
    SKIP = "skip"  # leave it out, count it, and report the count


@dataclass(frozen=True)
class DataConfig:
    """Where the faces come from.

    ``train`` and ``eval`` are dataset directories or object-store prefixes in the format of
    DESIGN.md section 4; ``eval`` holds held-out identities and its ``pairs.parquet``.
    """

    train: str = "runs/data/synthetic/train"
    eval: str = "runs/data/synthetic/eval"
    image_size: int = 112
    # Training augmentation, applied by the decode actors (evaluation never augments).
    flip: bool = True  # random horizontal flip, p = 0.5
    crop_pad: int = 0  # random crop: pad by this many pixels, crop back (0: off, aligned faces)
    # The decode + augment actor pool of the Ray Data pipeline. 0 actors: as many as the
    # CPUs left by the Train workers allow (one slot kept for the Parquet reads).
    decode_actors: int = 0
    decode_cpus: float = 0.5  # CPUs reserved per decode actor and per read task
    decode_batch: int = 256  # images per decode call
    # Object storage: endpoint and region for s3:// URIs when not on AWS (empty: the AWS_*
    # environment decides). Keys are never read from a config: use AWS_ACCESS_KEY_ID /
    # AWS_SECRET_ACCESS_KEY or an instance role / service account.
    endpoint_url: str = ""
    region: str = ""

    def __post_init__(self) -> None:
        _require(self.crop_pad >= 0, "crop_pad", f"must be >= 0, found {self.crop_pad}")
        _require(self.decode_actors >= 0, "decode_actors", "must be >= 0 (0: derived)")
        _require(self.decode_cpus > 0, "decode_cpus", f"must be > 0, found {self.decode_cpus}")
        _require(self.decode_batch >= 1, "decode_batch", "must be >= 1")
        _require(
            self.image_size >= 16 and self.image_size % 16 == 0,
            "image_size",
            f"must be a positive multiple of 16 (the backbones halve it four times), found {self.image_size}",
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
        _require(self.num_identities >= 2, "num_identities", "must be >= 2")
        _require(
            self.eval_identities >= 20,
            "eval_identities",
            f"must be >= 20 (10 identity-disjoint folds of 2+ identities), found {self.eval_identities}",
        )
        _require(self.images_per_identity >= 2, "images_per_identity", "must be >= 2")
        _require(self.pairs_per_fold >= 2, "pairs_per_fold", "must be >= 2")
        _require(1 <= self.jpeg_quality <= 100, "jpeg_quality", "must be in [1, 100]")
        _require(self.shard_bytes > 0, "shard_bytes", "must be > 0")


@dataclass(frozen=True)
class StudentConfig:
    arch: Arch = Arch.MOBILEFACENET
    emb_dim: int = 512
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _require(self.emb_dim > 0, "emb_dim", f"must be > 0, found {self.emb_dim}")
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), found {self.dropout}")


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher: its backbone and its classifier (DESIGN.md section 4 format)."""

    arch: Arch = Arch.IRESNET50
    emb_dim: int = 512
    dropout: float = 0.0  # in the embedding head while jobs.train_teacher trains it
    classifier: str = "runs/teacher/classifier"
    backbone: str = "runs/teacher/backbone.pt"

    def __post_init__(self) -> None:
        _require(self.emb_dim > 0, "emb_dim", f"must be > 0, found {self.emb_dim}")
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), found {self.dropout}")


@dataclass(frozen=True)
class LossConfig:
    """The training objective.

    Margins act on the target cosine only: ArcFace ``s*cos(theta+margin)``, CosFace
    ``s*(cos(theta)-margin)``, combined ``s*(cos(m1*theta+m2)-m3)``.
    """

    method: Method = Method.PROXYLESS
    margin_type: MarginType = MarginType.ARCFACE
    scale: float = 64.0
    margin: float = 0.5  # arcface / cosface
    m1: float = 1.0  # combined only
    m2: float = 0.3  # combined only
    m3: float = 0.2  # combined only
    l2_weight: float = 1.0  # l2 and proxyless+l2
    kd_temperature: float = 4.0  # logit
    kd_weight: float = 1.0  # logit

    def __post_init__(self) -> None:
        _require(self.scale > 0, "scale", f"must be > 0, found {self.scale}")
        _require(
            0.0 <= self.margin < math.pi / 2, "margin", f"must be in [0, pi/2), found {self.margin}"
        )
        if self.margin_type is MarginType.COMBINED:
            _require(self.m1 > 0, "m1", f"must be > 0, found {self.m1}")
            _require(0.0 <= self.m2 < math.pi / 2, "m2", f"must be in [0, pi/2), found {self.m2}")
            _require(0.0 <= self.m3 < 1.0, "m3", f"must be in [0, 1), found {self.m3}")
        _require(
            not self.method.uses_l2 or self.l2_weight > 0,
            "l2_weight",
            f"method {self.method.value} needs l2_weight > 0, found {self.l2_weight}",
        )
        if self.method is Method.LOGIT:
            _require(self.kd_temperature > 0, "kd_temperature", "must be > 0 for method logit")
            _require(self.kd_weight > 0, "kd_weight", "must be > 0 for method logit")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 10
    batch_size: int = 128  # global batch, split across workers
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        _require(self.lr > 0, "lr", f"must be > 0, found {self.lr}")
        _require(self.epochs >= 1, "epochs", f"must be >= 1, found {self.epochs}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, found {self.batch_size}")
        _require(
            0 <= self.warmup_epochs <= self.epochs,
            "warmup_epochs",
            f"must be in [0, epochs={self.epochs}], found {self.warmup_epochs}",
        )


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 2
    cpus_per_worker: float = 0.5  # leave CPUs for Ray Data (DESIGN.md section 5)
    use_gpu: bool = False

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, "num_workers", f"must be >= 1, found {self.num_workers}")
        _require(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")


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
        _require(self.auto_min_bytes >= 0, "auto_min_bytes", "must be >= 0")
        _require(
            0.0 < self.sample_rate <= 1.0,
            "sample_rate",
            f"must be in (0, 1], found {self.sample_rate}",
        )
        _require(self.chunk_size >= 1, "chunk_size", f"must be >= 1, found {self.chunk_size}")


@dataclass(frozen=True)
class RunConfig:
    """How a training run executes: fault tolerance, checkpoints, evaluation, devices."""

    max_failures: int = 0  # worker-group restarts from the last checkpoint before giving up
    checkpoint_every_epochs: int = 1
    eval_every_epochs: int = 1  # 0: evaluate only after the last epoch
    precision: Precision = Precision.FP32
    channels_last: bool = False
    log_every_s: float = 10.0
    shuffle_buffer: int = 1000  # rows in each worker's local shuffle buffer
    # Write the image ids each worker trained on, per epoch, to <storage>/<name>/audit/
    # (to check that the workers split every epoch exactly; costs a little I/O per epoch).
    audit_ids: bool = False

    def __post_init__(self) -> None:
        _require(self.max_failures >= -1, "max_failures", "must be >= 0, or -1 for unlimited")
        _require(self.checkpoint_every_epochs >= 1, "checkpoint_every_epochs", "must be >= 1")
        _require(self.eval_every_epochs >= 0, "eval_every_epochs", "must be >= 0")
        _require(self.log_every_s > 0, "log_every_s", "must be > 0")
        _require(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0")


class SearchAlgorithm(enum.StrEnum):
    RANDOM = "random"  # num_samples draws from the lists / ranges
    GRID = "grid"  # every combination of the lists, num_samples times
    OPTUNA = "optuna"  # Optuna's TPE over the lists / ranges (needs `pip install optuna`)


VALIDATION_METRICS = (
    "val_acc_10fold",
    "val_auc",
    "val_rank1",
    "val_tar_at_far_1e-1",
    "val_tar_at_far_1e-2",
    "val_tar_at_far_1e-3",
    "val_tar_at_far_1e-4",
)


@dataclass(frozen=True)
class TuneConfig:
    """The search of ``python -m jobs.tune``: every trial is a full Ray Train run of the
    experiment config with some values replaced.

    Each ``*_values`` list is searched as a set of choices (grid: every value); each
    ``*_range`` is ``[low, high]``, sampled uniformly (``lr_range``: log-uniformly) by
    random and Optuna search. Empty: the base config's value is kept. ASHA stops trials
    whose ``metric`` (measured on ``data.eval`` after every epoch) is in the bottom
    1 - 1/reduction_factor at an epoch milestone (grace_period, grace_period*rf, ...).
    """

    search: SearchAlgorithm = SearchAlgorithm.RANDOM
    num_samples: int = 8
    metric: str = "val_acc_10fold"
    margin_type_values: tuple[MarginType, ...] = ()
    margin_values: tuple[float, ...] = ()
    margin_range: tuple[float, ...] = ()
    scale_values: tuple[float, ...] = ()
    scale_range: tuple[float, ...] = ()
    arch_values: tuple[Arch, ...] = ()
    lr_values: tuple[float, ...] = ()
    lr_range: tuple[float, ...] = ()
    l2_weight_values: tuple[float, ...] = ()  # proxyless+l2: the embedding-KD weight
    seed_values: tuple[int, ...] = ()
    early_stopping: bool = True  # ASHA
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: float = 2.0
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs (and GPUs) hold
    storage_path: str = ""  # empty: <experiment storage_path>/tune

    def __post_init__(self) -> None:
        _require(self.num_samples >= 1, "num_samples", f"must be >= 1, found {self.num_samples}")
        _require(
            self.metric in VALIDATION_METRICS,
            "metric",
            f"must be one of {', '.join(VALIDATION_METRICS)}, found {self.metric!r}",
        )
        for name in ("margin", "scale", "lr"):
            values, span = getattr(self, f"{name}_values"), getattr(self, f"{name}_range")
            _require(
                not (values and span),
                f"{name}_range",
                f"give {name}_values or {name}_range, not both",
            )
            _require(
                not span or (len(span) == 2 and 0 < span[0] < span[1]),
                f"{name}_range",
                f"must be [low, high] with 0 < low < high, found {list(span)}",
            )
            _require(
                not (span and self.search is SearchAlgorithm.GRID),
                f"{name}_range",
                "grid search needs lists of values (a range cannot be enumerated)",
            )
        _require(self.grace_period >= 1, "grace_period", "must be >= 1")
        _require(self.reduction_factor > 1, "reduction_factor", "must be > 1")
        _require(self.max_concurrent_trials >= 0, "max_concurrent_trials", "must be >= 0")


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
    metric: str = "acc_10fold"  # a key of the evaluation report: acc_10fold, auc, rank1
    min_improvement: float = 0.0
    lock_ttl_s: float = 12 * 3600.0  # a crashed run's lock expires after this
    lock_settle_s: float = 2.0  # wait after writing the lock before trusting it

    def __post_init__(self) -> None:
        _require(
            self.metric in ("acc_10fold", "auc", "rank1"),
            "metric",
            f"must be acc_10fold, auc or rank1, found {self.metric!r}",
        )
        _require(self.lock_ttl_s > 0, "lock_ttl_s", "must be > 0")
        _require(self.lock_settle_s >= 0, "lock_settle_s", "must be >= 0")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    storage_path: str = "runs"
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
    retrain: RetrainConfig = field(default_factory=RetrainConfig)  # jobs.retrain

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "name", "must not be empty")
        # The inherited classifier (and the L2 target) live in the teacher's embedding space.
        _require(
            not self.loss.method.needs_teacher_width
            or self.student.emb_dim == self.teacher.emb_dim,
            "student.emb_dim",
            f"method {self.loss.method.value} needs student.emb_dim == teacher.emb_dim, "
            f"found {self.student.emb_dim} and {self.teacher.emb_dim}",
        )
        _require(
            self.sharding.mode is not ClassifierMode.SHARDED or self.loss.method.shardable,
            "sharding.mode",
            f"sharded is implemented for loss.method proxyless, found {self.loss.method.value}",
        )
        _require(
            self.optim.batch_size % self.scaling.num_workers == 0,
            "optim.batch_size",
            f"the global batch {self.optim.batch_size} must split evenly over "
            f"scaling.num_workers={self.scaling.num_workers}",
        )
        _require(
            self.teacher_optim.batch_size % self.scaling.num_workers == 0,
            "teacher_optim.batch_size",
            f"the global batch {self.teacher_optim.batch_size} must split evenly over "
            f"scaling.num_workers={self.scaling.num_workers}",
        )


class _FieldError(ValueError):
    """Raised by ``__post_init__``; ``key`` is relative to the dataclass that raised it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _FieldError(key, message)


T = TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from plain data, checking keys and types recursively.

    ``source`` (a file name or ``--set``) and the dotted key path appear in every error.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: {prefix.rstrip('.') or '<top level>'}: expected a mapping for "
            f"{cls.__name__}, found {type(data).__name__}"
        )
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = (
                f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            )
            raise ConfigError(f"{source}: {prefix}{key}: unknown key in {cls.__name__}{hint}")
        kwargs[key] = _coerce(hints[key], value, source, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except _FieldError as err:
        raise ConfigError(f"{source}: {prefix}{err.key}: {err.message}") from None


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(
            f"{source}: {key}: expected {expected}, found {value!r} ({type(value).__name__})"
        )

    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return from_dict(hint, value, source, f"{key}.")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [m.value for m in hint]
        if value not in allowed:
            raise bad("one of " + ", ".join(repr(a) for a in allowed))
        return hint(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise bad("a list")
        return tuple(_coerce(item, v, source, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, source, key)
    raise TypeError(f"unsupported config field type {hint!r} at {key}")  # a bug in this module


def to_dict(config: Any) -> dict[str, Any]:
    """Plain data (enums as their values) that :func:`from_dict` accepts back."""

    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    assert dataclasses.is_dataclass(config) and not isinstance(config, type)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else plain(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'loss.margin=0.45'`` -> (['loss', 'margin'], 0.45); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {err}") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``section.key=value`` applied."""
    merged = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return merged


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load ``path`` (YAML) into an :class:`ExperimentConfig` and apply ``--set`` overrides.

    With no path, the defaults plus overrides. Errors name the file, or ``--set`` when the
    offending key came from an override.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"{source}: cannot read config: {err.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        data = loaded
    # Check the file alone first, so an error in it is blamed on the file, not on --set.
    config = from_dict(ExperimentConfig, data, source)
    if not overrides:
        return config
    return from_dict(ExperimentConfig, apply_overrides(data, overrides), f"{source} with --set")


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
