"""iResNet backbones in the standard face-recognition form.

Improved residual blocks (Duta et al., "Improved Residual Networks", 2020) as used by
ArcFace: a 3x3 stem at 112x112, four stages that halve the resolution to 7x7, and the
BN-Dropout-FC-BN embedding head. Depths 18/34/50/100/200 follow the insightface model zoo
(stage depths 2-2-2-2, 3-4-6-3, 3-4-14-3, 3-13-30-3, 6-26-60-6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class IBasicBlock(nn.Module):
    """BN-conv3x3-BN-PReLU-conv3x3(stride)-BN with an identity or 1x1 projection shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels, eps=1e-5),
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels, eps=1e-5),
            nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels, eps=1e-5),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class EmbeddingHead(nn.Module):
    """BN-Dropout-FC-BN: (B, C, h, w) feature map -> (B, emb_dim) embedding. With ``gdc``, a
    global depthwise conv (and BN) turns the map into C numbers before the FC."""

    def __init__(
        self, channels: int, spatial: int, emb_dim: int, dropout: float, gdc: bool = False
    ) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=1e-5)
        self.gdc: nn.Module = nn.Identity()
        if gdc:
            self.gdc = nn.Sequential(
                nn.Conv2d(channels, channels, spatial, groups=channels, bias=False),
                nn.BatchNorm2d(channels, eps=1e-5),
            )
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * (1 if gdc else spatial * spatial), emb_dim)
        self.features = nn.BatchNorm1d(emb_dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.gdc(self.bn(x)))
        return self.features(self.fc(torch.flatten(x, 1)))


class IResNet(nn.Module):
    def __init__(
        self,
        depths: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        emb_dim: int = 512,
        dropout: float = 0.0,
        input_size: int = 112,
        gdc: bool = False,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0], eps=1e-5),
            nn.PReLU(widths[0]),
        )
        stages: list[nn.Module] = []
        in_channels = widths[0]
        for depth, channels in zip(depths, widths, strict=True):
            blocks = [IBasicBlock(in_channels, channels, stride=2)]
            blocks += [IBasicBlock(channels, channels, stride=1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = channels
        self.stages = nn.Sequential(*stages)
        spatial = input_size // 2 ** len(depths)
        self.head = EmbeddingHead(in_channels, spatial, emb_dim, dropout, gdc=gdc)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
