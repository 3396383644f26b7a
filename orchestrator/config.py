"""Typed experiment configuration.

One frozen dataclass per concern, nested in :class:`ExperimentConfig`. YAML files in
``configs/`` are plain data loaded into it; ``--set section.key=value`` overrides go through
the same type checks. Every error names the key and the file it came from::

    configs/demo.yaml: loss.margn: unknown key in LossConfig (did you mean 'margin'?)

Validation of single values and of combinations lives in each dataclass's
``__post_init__`` so that a config built in Python is checked exactly like one from YAML.
"""

from __future__ import annotations

import enum
import itertools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.typed_yaml import (
    ConfigError,
    apply_overrides,
    dump_yaml,
    from_dict,
    parse_override,
    read_yaml_mapping,
    require,
    to_dict,
)

__all__ = ["ConfigError", "dump_yaml", "from_dict", "load_config", "to_dict"]


class Method(enum.StrEnum):
    """How the student is trained (README "Millions of identities", orchestrator/losses)."""

    PROXYLESS = "proxyless"  # inherited frozen teacher classifier (ProxylessKD)
    SCRATCH = "scratch"  # the student's own trainable margin classifier
    L2 = "l2"  # own classifier + squared L2 to the teacher's embeddings
    LOGIT = "logit"  # own classifier + Hinton KD on the teacher's logits
    PROXYLESS_L2 = "proxyless+l2"  # inherited classifier + squared L2 to the teacher
    CCKD = "cckd"  # own classifier + L2 + correlation congruence (Peng et al. 2019)
    MULTISTEP = "multistep"  # own classifier + L2 to a teacher checkpoint per stage (PocketNet)

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
        return self in (
            Method.L2,
            Method.LOGIT,
            Method.PROXYLESS_L2,
            Method.CCKD,
            Method.MULTISTEP,
        )

    @property
    def needs_teacher_width(self) -> bool:
        """The student must embed in the teacher's space: student.emb_dim == teacher.emb_dim.

        ``logit`` does not: Hinton KD compares class probabilities, the teacher's from W on
        the teacher's embeddings and the student's from its own head, so the student's
        width is free."""
        return self.inherits_classifier or self in (Method.L2, Method.CCKD, Method.MULTISTEP)

    @property
    def uses_l2(self) -> bool:
        return self in (Method.L2, Method.PROXYLESS_L2)

    @property
    def shardable(self) -> bool:
        """The class-sharded loss (sharding.mode sharded) implements this method."""
        return self is Method.PROXYLESS

    @property
    def loss_settings(self) -> tuple[str, ...]:
        """The method-specific keys of the ``loss`` section this method reads (the margin
        aside, which every method reads); the others have no effect on its runs."""
        return {
            Method.L2: ("l2_weight",),
            Method.PROXYLESS_L2: ("l2_weight",),
            Method.LOGIT: ("kd_temperature", "kd_weight"),
            Method.CCKD: ("cckd",),
            Method.MULTISTEP: ("multistep",),
        }.get(self, ())


METHOD_LOSS_SETTINGS = ("l2_weight", "kd_temperature", "kd_weight", "cckd", "multistep")


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
    IRESNET200 = "iresnet200"
    SMALL_MOBILEFACENET = "small_mobilefacenet"  # half width, full depth: the demo's teacher
    TINY_MOBILEFACENET = "tiny_mobilefacenet"  # CPU tests and demos
    TINY_IRESNET = "tiny_iresnet"  # CPU tests and demos


class Precision(enum.StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"  # autocast of the forward pass; on CUDA always worth it, on CPU optional


class DecodeAt(enum.StrEnum):
    """Where the training JPEGs are decoded and augmented."""

    POOL = "pool"  # a Ray Data actor pool beside the Train workers (cores of its own)
    WORKER = "worker"  # threads inside each Train worker, overlapped with its step


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
    README "Formats"; ``eval`` holds held-out identities and its ``pairs.parquet``.
    """

    train: str = "runs/data/synthetic/train"
    eval: str = "runs/data/synthetic/eval"
    image_size: int = 112
    # Training augmentation (evaluation never augments), drawn per image from the run's
    # seed, the epoch and the image id: one seed, the same augmented images.
    flip: bool = True  # random horizontal flip, p = 0.5
    crop_pad: int = 0  # random crop: pad by this many pixels, crop back (0: off, aligned faces)
    # Hand the epoch's rows to the workers in a fixed order (Ray Data's preserve_order), so
    # that for one seed and one world size each rank trains on the same batches in every
    # run (README "Reproducibility"). false: rows go to whichever worker asks first.
    ordered: bool = True
    # Where JPEGs are decoded and augmented: "pool", an actor pool of the Ray Data pipeline
    # (below), or "worker", data.decode_threads threads in every Train worker that decode
    # the next batch while the current one trains (for nodes with no cores to spare).
    decode: DecodeAt = DecodeAt.POOL
    decode_threads: int = 2
    # The decode + augment actor pool of the Ray Data pipeline. 0 actors: as many as the
    # CPUs left by the Train workers allow (one slot kept for the Parquet reads).
    decode_actors: int = 0
    decode_cpus: float = 0.5  # CPUs reserved per decode actor and per read task
    decode_batch: int = 256  # images per decode call
    # Where the names in run.val_targets resolve: <val_dir>/<name>.bin (insightface's sets).
    val_dir: str = ""
    # Hold the training input at or below this many images/s over all workers (0: off):
    # a slow store simulated, to see what input-bound training looks like.
    throttle_images_per_s: float = 0.0

    def __post_init__(self) -> None:
        require(self.crop_pad >= 0, "crop_pad", f"must be >= 0, found {self.crop_pad}")
        require(self.decode_actors >= 0, "decode_actors", "must be >= 0 (0: derived)")
        require(self.decode_cpus > 0, "decode_cpus", f"must be > 0, found {self.decode_cpus}")
        require(self.decode_batch >= 1, "decode_batch", "must be >= 1")
        require(
            self.decode_threads >= 1,
            "decode_threads",
            f"must be >= 1, found {self.decode_threads}",
        )
        require(self.throttle_images_per_s >= 0, "throttle_images_per_s", "must be >= 0 (0: off)")
        require(
            self.image_size >= 16 and self.image_size % 16 == 0,
            "image_size",
            f"must be a positive multiple of 16 (the backbones halve it four times), found {self.image_size}",
        )


@dataclass(frozen=True)
class StorageConfig:
    """Object storage for every s3:// URI of the run (data, classifier, checkpoints,
    reports): endpoint and region when not on AWS; empty, the ``AWS_*`` environment
    decides. Keys are never read from a config: use AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY or an instance role / service account."""

    endpoint_url: str = ""
    region: str = ""


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


@dataclass(frozen=True)
class StudentConfig:
    arch: Arch = Arch.MOBILEFACENET
    emb_dim: int = 512
    dropout: float = 0.0

    def __post_init__(self) -> None:
        require(self.emb_dim > 0, "emb_dim", f"must be > 0, found {self.emb_dim}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), found {self.dropout}")


class TeacherFormat(enum.StrEnum):
    """What kind of file ``teacher.backbone`` is (README "Bring your own teacher")."""

    AUTO = "auto"  # detected from the file: zip layout, the checkpoint's kind, ONNX protobuf
    CHECKPOINT = "checkpoint"  # this project's teacher checkpoint (jobs.train_teacher)
    TORCHSCRIPT = "torchscript"  # any TorchScript module (B, 3, H, W) -> (B, d)
    INSIGHTFACE = "insightface"  # an arcface_torch backbone state dict; teacher.arch names it
    ONNX = "onnx"  # an ONNX graph (model zoo), run with onnxruntime


class ChannelOrder(enum.StrEnum):
    RGB = "rgb"
    BGR = "bgr"


@dataclass(frozen=True)
class TeacherInputConfig:
    """What the teacher's network expects, applied on the teacher's side only.

    Our images are ``data.image_size`` squares, RGB, fed as ``(x - 127.5) / 127.5``. For the
    teacher they are turned back into pixels, cut to ``crop`` (left, top, right, bottom in
    our image's pixels; empty: the whole image), resized to ``size`` (height, width) when
    that differs, put in ``channels`` order and fed as ``(x - mean) / std`` (one value or
    one per channel, in the teacher's channel order). ``mean``/``std`` unset: 127.5 and
    127.5, except for an ONNX graph that normalises inside (its first nodes Sub and Mul, as
    insightface's loader detects): 0 and 1. Example, a 112x96 SphereFace crop:
    ``{size: [112, 96], crop: [8, 0, 104, 112], std: [128], channels: bgr}``.
    """

    size: tuple[int, ...] = (112, 112)
    crop: tuple[int, ...] = ()
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channels: ChannelOrder = ChannelOrder.RGB

    def __post_init__(self) -> None:
        require(
            len(self.size) == 2 and min(self.size) > 0,
            "size",
            f"expected [height, width], both > 0, found {list(self.size)}",
        )
        require(
            self.crop == ()
            or (
                len(self.crop) == 4
                and min(self.crop) >= 0
                and self.crop[0] < self.crop[2]
                and self.crop[1] < self.crop[3]
            ),
            "crop",
            f"expected [] or [left, top, right, bottom] with left < right and top < bottom, "
            f"found {list(self.crop)}",
        )
        for key, values in (("mean", self.mean), ("std", self.std)):
            require(
                values is None or len(values) in (1, 3),
                key,
                f"expected one value or three (per channel), found {list(values or ())}",
            )
        require(
            self.std is None or min(self.std) > 0,
            "std",
            f"must be > 0, found {list(self.std or ())}",
        )

    def is_ours(self, image_size: int) -> bool:
        """True when the teacher takes exactly what the student takes (no adapter)."""
        return (
            tuple(self.size) == (image_size, image_size)
            and self.crop in ((), (0, 0, image_size, image_size))
            and self.mean in (None, (127.5,), (127.5, 127.5, 127.5))
            and self.std in (None, (127.5,), (127.5, 127.5, 127.5))
            and self.channels is ChannelOrder.RGB
        )


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher.

    ``classifier``: its classifier W in the format of README "Formats" (what
    ``jobs.train_teacher``, ``jobs.build_classifier`` and ``jobs.import_teacher`` write).
    ``backbone``: the file the teacher's embeddings come from, for the methods that need
    them (``l2``, ``logit``, ``proxyless+l2``), for ``jobs.build_classifier mean-embedding``
    and for evaluation, in ``format`` (:class:`TeacherFormat`; ``auto`` detects it).
    ``input``: what that network expects (:class:`TeacherInputConfig`). ``arch`` and
    ``emb_dim`` describe the teacher that ``jobs.train_teacher`` trains and the
    architecture of an ``insightface`` state dict; ``emb_dim`` is also the width W is
    checked against.
    """

    arch: Arch = Arch.IRESNET50
    emb_dim: int = 512
    dropout: float = 0.0  # in the embedding head while jobs.train_teacher trains it
    classifier: str = "runs/teacher/classifier"
    backbone: str = "runs/teacher/teacher.pt"
    format: TeacherFormat = TeacherFormat.AUTO
    input: TeacherInputConfig = field(default_factory=TeacherInputConfig)
    # jobs.train_teacher also keeps the backbone after each of these epochs (1-based) as
    # <backbone without .pt>.epochNNNN.pt: the intermediate teachers of loss.method multistep.
    snapshot_epochs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        require(self.emb_dim > 0, "emb_dim", f"must be > 0, found {self.emb_dim}")
        require(
            all(e >= 1 for e in self.snapshot_epochs),
            "snapshot_epochs",
            f"epochs are 1-based, found {list(self.snapshot_epochs)}",
        )
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), found {self.dropout}")


@dataclass(frozen=True)
class MarginConfig:
    """The margin on the target cosine (README "Millions of identities", orchestrator/losses): ArcFace ``s*cos(theta+m)``,
    CosFace ``s*(cos(theta)-m)``, combined ``s*(cos(m1*theta+m2)-m3)``."""

    type: MarginType = MarginType.ARCFACE
    scale: float = 64.0  # s
    m: float = 0.5  # arcface / cosface
    m1: float = 1.0  # combined only
    m2: float = 0.3  # combined only
    m3: float = 0.2  # combined only

    def __post_init__(self) -> None:
        require(self.scale > 0, "scale", f"must be > 0, found {self.scale}")
        require(0.0 <= self.m < math.pi / 2, "m", f"must be in [0, pi/2), found {self.m}")
        if self.type is MarginType.COMBINED:
            require(self.m1 > 0, "m1", f"must be > 0, found {self.m1}")
            require(0.0 <= self.m2 < math.pi / 2, "m2", f"must be in [0, pi/2), found {self.m2}")
            require(0.0 <= self.m3 < 1.0, "m3", f"must be in [0, 1), found {self.m3}")


@dataclass(frozen=True)
class CckdConfig:
    """``cckd``'s terms (Peng et al., "Correlation Congruence for Knowledge Distillation",
    ICCV 2019): the correlation between two unit embeddings is the Gaussian RBF kernel
    exp(-gamma |x - y|^2), taken as its Taylor expansion to ``order``; the paper's
    gamma = 0.4, order = 2."""

    gamma: float = 0.4
    order: int = 2
    # The weights are ours (the paper tunes its own per task): the instance term as
    # loss.l2_weight's default, the correlation term at 1; search them with jobs.tune.
    instance_weight: float = 1.0  # the instance-level L2 to the teacher's embeddings
    cc_weight: float = 1.0  # the congruence of the batch correlation matrices

    def __post_init__(self) -> None:
        require(self.gamma > 0, "gamma", f"must be > 0, found {self.gamma}")
        require(self.order >= 0, "order", f"must be >= 0, found {self.order}")
        require(self.instance_weight >= 0, "instance_weight", "must be >= 0")
        require(self.cc_weight >= 0, "cc_weight", "must be >= 0")


def started_by(starts: Sequence[int], epoch: int) -> int:
    """The index of the last of the increasing ``starts`` (the first 0) at or before
    ``epoch``: the stage a schedule is in at that epoch."""
    return max(i for i, start in enumerate(starts) if start <= epoch)


FINAL_TEACHER = "final"  # multistep: teacher.backbone itself
TEACHER_EPOCH_PREFIX = "epoch:"  # multistep: the snapshot jobs.train_teacher kept of epoch N


@dataclass(frozen=True)
class MultistepStage:
    """From student epoch ``from_epoch`` (0-based) on, distil from ``teacher``: ``final``
    (teacher.backbone), ``epoch:N`` (the snapshot ``jobs.train_teacher`` kept after its
    epoch N, see ``teacher.snapshot_epochs``) or the path/URI of a teacher file."""

    from_epoch: int
    teacher: str = FINAL_TEACHER

    def __post_init__(self) -> None:
        require(self.from_epoch >= 0, "from_epoch", f"must be >= 0, found {self.from_epoch}")
        require(bool(self.teacher.strip()), "teacher", "must not be empty")
        if self.teacher.startswith(TEACHER_EPOCH_PREFIX):
            number = self.teacher.removeprefix(TEACHER_EPOCH_PREFIX)
            require(
                number.isdigit() and int(number) >= 1,
                "teacher",
                f"expected epoch:N with N >= 1 (a teacher epoch, 1-based), found {self.teacher!r}",
            )

    @property
    def teacher_epoch(self) -> int | None:
        """N of ``epoch:N``, else None."""
        if not self.teacher.startswith(TEACHER_EPOCH_PREFIX):
            return None
        return int(self.teacher.removeprefix(TEACHER_EPOCH_PREFIX))


@dataclass(frozen=True)
class MultistepConfig:
    """``multistep`` (Boutros et al., "PocketNet: Extreme Lightweight Face Recognition
    Network using Neural Architecture Search and Multi-Step Knowledge Distillation", IEEE
    Access 2022): the student's own margin loss plus ``kd_weight`` times the mean squared
    error between the unit student and teacher embeddings (PocketNet's w = 100), the
    teacher changing along ``schedule``. Empty schedule: the final teacher throughout."""

    kd_weight: float = 100.0
    schedule: tuple[MultistepStage, ...] = ()

    def __post_init__(self) -> None:
        require(self.kd_weight > 0, "kd_weight", f"must be > 0, found {self.kd_weight}")
        starts = [stage.from_epoch for stage in self.schedule]
        require(
            not starts or starts[0] == 0,
            "schedule",
            f"the first stage must start at student epoch 0, found {starts[:1]}",
        )
        require(
            all(a < b for a, b in itertools.pairwise(starts)),
            "schedule",
            f"from_epoch must increase from stage to stage, found {starts}",
        )

    def stages(self) -> tuple[MultistepStage, ...]:
        return self.schedule or (MultistepStage(0, FINAL_TEACHER),)

    def stage_at(self, epoch: int) -> MultistepStage:
        """The stage that student epoch ``epoch`` (0-based) distils from."""
        stages = self.stages()
        return stages[started_by([stage.from_epoch for stage in stages], epoch)]


@dataclass(frozen=True)
class LossConfig:
    """The training objective: the method (README "Millions of identities", orchestrator/losses), its margin and the weights
    of the baselines' extra terms."""

    method: Method = Method.PROXYLESS
    margin: MarginConfig = field(default_factory=MarginConfig)
    l2_weight: float = 1.0  # l2 and proxyless+l2
    kd_temperature: float = 4.0  # logit
    kd_weight: float = 1.0  # logit
    cckd: CckdConfig = field(default_factory=CckdConfig)
    multistep: MultistepConfig = field(default_factory=MultistepConfig)

    def __post_init__(self) -> None:
        require(
            not self.method.uses_l2 or self.l2_weight > 0,
            "l2_weight",
            f"method {self.method.value} needs l2_weight > 0, found {self.l2_weight}",
        )
        if self.method is Method.LOGIT:
            require(self.kd_temperature > 0, "kd_temperature", "must be > 0 for method logit")
            require(self.kd_weight > 0, "kd_weight", "must be > 0 for method logit")


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


class Metric(enum.StrEnum):
    """The evaluation report's headline numbers (``report.json``: the first three at the top
    of a model's entry, TAR@FAR under ``tar_at_far``). Tune ranks trials by the validation
    copy a training run reports, ``val_<name>``; retraining compares reports."""

    ACC_10FOLD = "acc_10fold"
    AUC = "auc"
    RANK1 = "rank1"
    TAR_AT_FAR_1E_1 = "tar_at_far_1e-1"
    TAR_AT_FAR_1E_2 = "tar_at_far_1e-2"
    TAR_AT_FAR_1E_3 = "tar_at_far_1e-3"
    TAR_AT_FAR_1E_4 = "tar_at_far_1e-4"

    @property
    def validation_key(self) -> str:
        """The key of this metric in a training run's per-epoch report."""
        return f"val_{self.value}"

    def read(self, report: dict[str, Any]) -> float | None:
        """This metric from one model's entry of an evaluation report (None: not measured,
        e.g. too few negative pairs for the FAR)."""
        if self.value.startswith("tar_at_far_"):
            value = (report.get("tar_at_far") or {}).get(self.value.removeprefix("tar_at_far_"))
        else:
            value = report.get(self.value)
        return None if value is None else float(value)


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


class SearchAlgorithm(enum.StrEnum):
    RANDOM = "random"  # num_samples draws from the lists / ranges
    GRID = "grid"  # every combination of the lists, num_samples times
    OPTUNA = "optuna"  # Optuna's TPE over the lists / ranges (needs `pip install optuna`)


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

    def __post_init__(self) -> None:
        require(self.num_samples >= 1, "num_samples", f"must be >= 1, found {self.num_samples}")
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
        for key, metric in (
            ("tune.metric", self.tune.metric),
            ("retrain.metric", self.retrain.metric),
            ("run.best_metric", self.run.best_metric),
        ):
            known = [m.value for m in Metric] + [f"{name}{BENCHMARK_METRIC}" for name in targets]
            if key == "retrain.metric":
                known += self.retrain.ijb_metrics()
            require(
                metric in known,
                key,
                f"expected one of {', '.join(known)} (benchmarks: <run.val_targets name>_acc), "
                f"found {metric!r}",
            )


MAX_SEED = 2**63 - 1  # a seed is a non-negative 64-bit signed integer


def seed_problem(seeds: Sequence[int]) -> str | None:
    """Why ``seeds`` are not valid seeds (each in [0, 2**63 - 1]), or None."""
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    return f"a seed must be in [0, 2**63 - 1], found {bad}" if bad else None


BENCHMARK_METRIC = "_acc"  # a .bin benchmark's metric: <name>_acc, its 10-fold accuracy
IJB_SETS = ("IJBB", "IJBC")
IJB_FAR_KEYS = ("1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1")  # the FARs IJB reports


def validation_key(metric: str) -> str:
    """The key of ``metric`` (a :class:`Metric` or ``<val target>_acc``) in a training
    run's per-epoch report."""
    return f"val_{metric}"


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


def is_single_component(name: str) -> bool:
    """One path component, never a path that leaves its parent: what run names (one
    directory under storage_path) and a dataset's file names must be."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\:\0")


# --- loading, with the keys of earlier releases --------------------------------------------

# Old dotted key -> its new place. A config or --set that uses an old key still loads, with
# one "warning:" line per key on stderr saying what to write instead.
RENAMED_KEYS: dict[str, str] = {
    "data.endpoint_url": "storage.endpoint_url",
    "data.region": "storage.region",
    "loss.margin_type": "loss.margin.type",
    "loss.scale": "loss.margin.scale",
    "loss.m1": "loss.margin.m1",
    "loss.m2": "loss.margin.m2",
    "loss.m3": "loss.margin.m3",
    "tune.margin_type_values": "tune.space.margin_type",
    "tune.margin_values": "tune.space.margin.values",
    "tune.margin_range": "tune.space.margin.range",
    "tune.scale_values": "tune.space.scale.values",
    "tune.scale_range": "tune.space.scale.range",
    "tune.arch_values": "tune.space.arch",
    "tune.lr_values": "tune.space.lr.values",
    "tune.lr_range": "tune.space.lr.range",
    "tune.l2_weight_values": "tune.space.l2_weight",
    "tune.seed_values": "tune.space.seed",
}


def _deprecated(source: str, old: str, new: str) -> None:
    print(f"warning: {source}: {old} is deprecated; write {new}", file=sys.stderr)


def new_key(path: Sequence[str], value: Any) -> list[str] | None:
    """Where an old key now lives; None when ``path`` is current. ``loss.margin`` was the
    margin's value (a number) before it became the margin section."""
    dotted = ".".join(path)
    if dotted == "loss.margin" and not isinstance(value, dict):
        return ["loss", "margin", "m"]
    if dotted in RENAMED_KEYS:
        return RENAMED_KEYS[dotted].split(".")
    return None


def migrate(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` with every old key moved to its new place (a key given both ways is an
    error); the old values ``val_<metric>`` of ``tune.metric`` lose their prefix."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for section, body in list(out.items()):
        if not isinstance(body, dict):
            continue
        for key in list(body):
            target = new_key([section, key], body[key])
            if target is None:
                continue
            value = body.pop(key)
            node = out
            for part in target[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{source}: {'.'.join(target)}: its section is not a mapping")
            if target[-1] in node:
                raise ConfigError(
                    f"{source}: {section}.{key} and {'.'.join(target)} are the same setting; "
                    "give it once"
                )
            node[target[-1]] = value
            _deprecated(source, f"{section}.{key}", ".".join(target))
    tune = out.get("tune")
    if isinstance(tune, dict) and str(tune.get("metric", "")).startswith("val_"):
        _deprecated(source, f"tune.metric: {tune['metric']}", f"tune.metric: {tune['metric'][4:]}")
        tune["metric"] = tune["metric"][4:]
    return out


def migrate_overrides(overrides: Sequence[str]) -> list[str]:
    """``--set`` overrides with old keys rewritten to their new place."""
    out = []
    for text in overrides:
        path, value = parse_override(text)
        target = new_key(path, value)
        if target is not None:
            _deprecated("--set", ".".join(path), ".".join(target))
            text = ".".join(target) + "=" + text.partition("=")[2]
        out.append(text)
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load ``path`` (YAML) into an :class:`ExperimentConfig` and apply ``--set`` overrides.

    With no path, the defaults plus overrides. Errors name the file, or ``--set`` when the
    offending key came from an override.
    """
    source = "<defaults>" if path is None else str(path)
    data = {} if path is None else migrate(read_yaml_mapping(path), source)
    # Check the file alone first, so an error in it is blamed on the file, not on --set.
    config = from_dict(ExperimentConfig, data, source)
    if not overrides:
        return config
    merged = migrate(apply_overrides(data, migrate_overrides(overrides)), f"{source} with --set")
    return from_dict(ExperimentConfig, merged, f"{source} with --set")
