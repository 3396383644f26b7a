"""The student family: the MobileFaceNet and iResNet backbones described by numbers a search
can vary. Every named architecture (:class:`orchestrator.config.Arch`) is one point of it
(:data:`NAMED_SHAPES`), and ``student.width`` / ``depths`` / ``feature_width`` / ``head``
move a student away from its named point within the same family.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from orchestrator.typed_yaml import require


class Family(enum.StrEnum):
    MOBILEFACENET = "mobilefacenet"  # depthwise-separable inverted residuals, base 64/128
    IRESNET = "iresnet"  # improved residual blocks, base 64/128/256/512


class Head(enum.StrEnum):
    """How the last feature map becomes the embedding."""

    GDC = "gdc"  # a global depthwise conv (one weight per pixel and channel), then linear
    FC = "fc"  # linear over the flattened feature map (many parameters at 7x7)


# The channels of each family at width 1.0: MobileFaceNet's two channel widths (stages 1-2
# and 3-4), iResNet's four stage widths.
BASE_CHANNELS: dict[Family, tuple[int, ...]] = {
    Family.MOBILEFACENET: (64, 128),
    Family.IRESNET: (64, 128, 256, 512),
}
DEFAULT_FEATURE_WIDTH = 512  # MobileFaceNet's 1x1 conv before the head


@dataclass(frozen=True)
class BackboneShape:
    """One buildable backbone of the family. ``depths``: blocks per stage at 56, 28, 14 and
    7 pixels (MobileFaceNet: the first stage is the stem's one depthwise conv, so 1; the
    others count the stride-1 blocks after each stage's stride-2 block; iResNet: every block
    of the stage). ``feature_width``: MobileFaceNet's channels before the head (iResNet's
    are its last stage's: 0)."""

    family: Family
    width: float
    depths: tuple[int, ...]
    feature_width: int
    head: Head

    def __post_init__(self) -> None:
        require(self.width > 0, "width", f"must be > 0, found {self.width}")
        require(
            len(self.depths) == 4 and min(self.depths) >= 1,
            "depths",
            f"expected 4 stage depths, each >= 1, found {list(self.depths)}",
        )
        if self.family is Family.MOBILEFACENET:
            require(
                self.depths[0] == 1,
                "depths",
                f"a MobileFaceNet's first stage is its stem: depths[0] must be 1, found "
                f"{list(self.depths)}",
            )
            require(self.feature_width >= 1, "feature_width", "must be >= 1 for a MobileFaceNet")
        else:
            require(
                self.feature_width == 0,
                "feature_width",
                f"an iResNet's features are its last stage's channels: leave it 0, found "
                f"{self.feature_width}",
            )
        small = min(self.channels())
        require(
            small >= 4,
            "width",
            f"{self.width:g} leaves {small} channels in a stage; at least 4 are needed",
        )

    def channels(self) -> tuple[int, ...]:
        """The channel widths at this width multiplier (rounded to whole channels)."""
        return tuple(max(1, round(c * self.width)) for c in BASE_CHANNELS[self.family])

    def label(self) -> str:
        """A short name for tables and plots, e.g. ``mbf w1 d1-2-2-1 f256 gdc``."""
        short = "mbf" if self.family is Family.MOBILEFACENET else "ir"
        depths = "-".join(str(d) for d in self.depths)
        feature = f" f{self.feature_width}" if self.feature_width else ""
        return f"{short} w{self.width:g} d{depths}{feature} {self.head.value}"


def mobilefacenet(width: float, depths: tuple[int, ...]) -> BackboneShape:
    return BackboneShape(Family.MOBILEFACENET, width, depths, DEFAULT_FEATURE_WIDTH, Head.GDC)


def iresnet(width: float, depths: tuple[int, ...]) -> BackboneShape:
    return BackboneShape(Family.IRESNET, width, depths, 0, Head.FC)


# Each named architecture's point of the family (keyed by Arch value).
NAMED_SHAPES: dict[str, BackboneShape] = {
    "mobilefacenet": mobilefacenet(2.0, (1, 4, 6, 2)),
    "small_mobilefacenet": mobilefacenet(1.0, (1, 4, 6, 2)),
    "tiny_mobilefacenet": mobilefacenet(1.0, (1, 1, 1, 1)),
    "iresnet18": iresnet(1.0, (2, 2, 2, 2)),
    "iresnet34": iresnet(1.0, (3, 4, 6, 3)),
    "iresnet50": iresnet(1.0, (3, 4, 14, 3)),
    "iresnet100": iresnet(1.0, (3, 13, 30, 3)),
    "iresnet200": iresnet(1.0, (6, 26, 60, 6)),
    "tiny_iresnet": iresnet(0.25, (1, 1, 1, 1)),
}


def shape_from_dict(data: dict[str, object], where: str) -> BackboneShape:
    """A shape as written into an export (:meth:`as_dict`); a malformed one is a ValueError
    naming ``where``."""
    try:
        return BackboneShape(
            family=Family(str(data["family"])),
            width=float(data["width"]),  # type: ignore[arg-type]
            depths=tuple(int(d) for d in data["depths"]),  # type: ignore[attr-defined]
            feature_width=int(data["feature_width"]),  # type: ignore[call-overload]
            head=Head(str(data["head"])),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: malformed backbone shape {data!r} ({err})") from None


def as_dict(shape: BackboneShape) -> dict[str, object]:
    return {
        "family": shape.family.value,
        "width": shape.width,
        "depths": list(shape.depths),
        "feature_width": shape.feature_width,
        "head": shape.head.value,
    }
