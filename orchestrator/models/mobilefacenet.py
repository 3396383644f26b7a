"""MobileFaceNet (Chen et al., "MobileFaceNets", CCBR 2018), in the wider form of the
insightface model zoo ("mbf": 2x channel width, stage depths 1-4-6-2, 512-d output).

Depthwise-separable inverted residual blocks, a global depthwise conv (GDC) instead of
global pooling, and a linear 1x1 projection to the embedding followed by BatchNorm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel: int = 1,
    stride: int = 1,
    groups: int = 1,
    act: bool = True,
    padding: int | None = None,
) -> nn.Sequential:
    """Conv-BN, followed by PReLU unless ``act`` is False (a linear bottleneck)."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel,
            stride,
            kernel // 2 if padding is None else padding,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if act:
        layers.append(nn.PReLU(out_channels))
    return nn.Sequential(*layers)


class DepthWise(nn.Module):
    """1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear project, residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(in_channels, hidden),
            conv_bn(hidden, hidden, kernel=3, stride=stride, groups=hidden),
            conv_bn(hidden, out_channels, act=False),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileFaceNet(nn.Module):
    def __init__(
        self,
        emb_dim: int = 512,
        width: float = 2.0,
        depths: Sequence[int] = (1, 4, 6, 2),
        dropout: float = 0.0,
        input_size: int = 112,
        feature_width: int = 512,
        gdc: bool = True,
    ) -> None:
        """``width``: channels 64 x width in stages 1-2 and 128 x width in stages 3-4 (2 is
        insightface's mbf). ``depths``: blocks per stage at 56, 28, 14 and 7 pixels. The
        first stage is the stem's one depthwise conv, as in insightface's mbf, so
        ``depths[0]`` must be 1; the others count the stride-1 blocks after each stage's
        stride-2 block. ``feature_width``: the channels of the 1x1 conv before the head;
        ``gdc``: a global depthwise conv head (else linear over the flattened map)."""
        super().__init__()
        if len(depths) != 4 or depths[0] != 1:
            raise ValueError(
                f"depths must be 4 stage depths starting with 1 (the stem), found {tuple(depths)}"
            )
        c64, c128 = max(1, round(64 * width)), max(1, round(128 * width))
        layers: list[nn.Module] = [
            conv_bn(3, c64, kernel=3, stride=2),
            # 64 groups (insightface's mbf at width 2: two channels a group), fewer when the
            # channels do not divide into 64
            conv_bn(c64, c64, kernel=3, groups=math.gcd(c64, 64)),  # 56x56
            DepthWise(c64, c64, hidden=c64, stride=2),  # 28x28
            *[DepthWise(c64, c64, hidden=c64, stride=1) for _ in range(depths[1])],
            DepthWise(c64, c128, hidden=c128, stride=2),  # 14x14
            *[DepthWise(c128, c128, hidden=c128, stride=1) for _ in range(depths[2])],
            DepthWise(c128, c128, hidden=2 * c128, stride=2),  # 7x7
            *[DepthWise(c128, c128, hidden=c128, stride=1) for _ in range(depths[3])],
            conv_bn(c128, feature_width),
        ]
        self.body = nn.Sequential(*layers)
        spatial = input_size // 16
        # Global depthwise conv: a learned spatial weighting instead of average pooling.
        self.gdc: nn.Module = nn.Identity()
        if gdc:
            self.gdc = conv_bn(
                feature_width,
                feature_width,
                kernel=spatial,
                groups=feature_width,
                act=False,
                padding=0,
            )
        self.dropout = nn.Dropout(dropout)
        flat = feature_width if gdc else feature_width * spatial * spatial
        self.fc = nn.Linear(flat, emb_dim, bias=False)
        self.features = nn.BatchNorm1d(emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.gdc(self.body(x)), 1)
        return self.features(self.fc(self.dropout(x)))
