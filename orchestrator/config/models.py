"""The ``student`` and ``teacher`` sections: architectures, the teacher's file format and
its input geometry."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from orchestrator.config.family import NAMED_SHAPES, BackboneShape, Head
from orchestrator.typed_yaml import (
    require,
)


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


@dataclass(frozen=True)
class StudentConfig:
    """The student: a named architecture, optionally moved within its family (README
    "Searching the student"): ``width`` multiplies its channels, ``depths`` sets its blocks
    per stage, ``feature_width`` its channels before the head (MobileFaceNet), ``head`` how
    the last feature map becomes the embedding. Unset (None, []) keeps the named value."""

    arch: Arch = Arch.MOBILEFACENET
    emb_dim: int = 512
    dropout: float = 0.0
    width: float | None = None
    depths: tuple[int, ...] = ()
    feature_width: int | None = None
    head: Head | None = None

    def __post_init__(self) -> None:
        require(self.emb_dim > 0, "emb_dim", f"must be > 0, found {self.emb_dim}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), found {self.dropout}")
        self.shape()  # a combination the family cannot build is refused here

    def shape(self) -> BackboneShape:
        """The student's point of the family: its arch's, with the overrides applied."""
        named = NAMED_SHAPES[self.arch.value]
        return replace(
            named,
            width=named.width if self.width is None else self.width,
            depths=self.depths or named.depths,
            feature_width=named.feature_width if self.feature_width is None else self.feature_width,
            head=self.head or named.head,
        )

    def is_named(self) -> bool:
        """True when the student is exactly its named architecture."""
        return self.shape() == NAMED_SHAPES[self.arch.value]


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
