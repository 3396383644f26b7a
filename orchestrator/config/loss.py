"""The ``loss`` section: the method, the margin, and the settings of the distillation
baselines (CC-KD, multistep stages)."""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from orchestrator.config.method import Method
from orchestrator.typed_yaml import (
    require,
)


class MarginType(enum.StrEnum):
    ARCFACE = "arcface"  # s*cos(theta + m)
    COSFACE = "cosface"  # s*(cos(theta) - m)
    COMBINED = "combined"  # s*(cos(m1*theta + m2) - m3)


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
