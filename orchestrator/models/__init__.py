"""Face-recognition backbones. Model code never touches torch.distributed."""

from __future__ import annotations

from torch import nn

from orchestrator.config import Arch
from orchestrator.models.iresnet import STAGE_DEPTHS, IResNet
from orchestrator.models.mobilefacenet import MobileFaceNet
from orchestrator.models.profile import ModelProfile, profile_model

__all__ = ["ModelProfile", "build_backbone", "profile_model"]


def build_backbone(
    arch: Arch, emb_dim: int, *, dropout: float = 0.0, input_size: int = 112
) -> nn.Module:
    """The backbone for ``arch``: (B, 3, input_size, input_size) -> (B, emb_dim)."""
    if input_size % 16 != 0:
        raise ValueError(
            f"input_size must be a multiple of 16 (four stride-2 stages), found {input_size}"
        )
    match arch:
        case Arch.MOBILEFACENET:
            return MobileFaceNet(emb_dim=emb_dim, dropout=dropout, input_size=input_size)
        case Arch.SMALL_MOBILEFACENET:
            return MobileFaceNet(emb_dim=emb_dim, width=1, dropout=dropout, input_size=input_size)
        case Arch.TINY_MOBILEFACENET:
            return MobileFaceNet(
                emb_dim=emb_dim,
                width=1,
                depths=(1, 1, 1, 1),
                dropout=dropout,
                input_size=input_size,
            )
        case Arch.TINY_IRESNET:
            return IResNet(
                depths=(1, 1, 1, 1),
                widths=(16, 32, 64, 128),
                emb_dim=emb_dim,
                dropout=dropout,
                input_size=input_size,
            )
        case Arch.IRESNET18 | Arch.IRESNET34 | Arch.IRESNET50 | Arch.IRESNET100 | Arch.IRESNET200:
            return IResNet(
                STAGE_DEPTHS[arch.value], emb_dim=emb_dim, dropout=dropout, input_size=input_size
            )
