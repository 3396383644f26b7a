"""Face-recognition backbones. Model code never touches torch.distributed."""

from __future__ import annotations

from torch import nn

from orchestrator.config import NAMED_SHAPES, Arch, BackboneShape, Family, Head
from orchestrator.models.iresnet import IResNet
from orchestrator.models.mobilefacenet import MobileFaceNet
from orchestrator.models.profile import ModelProfile, profile_model

__all__ = ["ModelProfile", "build_backbone", "build_shape", "profile_model"]


def build_backbone(
    arch: Arch,
    emb_dim: int,
    *,
    dropout: float = 0.0,
    input_size: int = 112,
    shape: BackboneShape | None = None,
) -> nn.Module:
    """The backbone for ``arch`` (its point of the family, or ``shape`` when given):
    (B, 3, input_size, input_size) -> (B, emb_dim)."""
    return build_shape(
        shape or NAMED_SHAPES[arch.value], emb_dim, dropout=dropout, input_size=input_size
    )


def build_shape(
    shape: BackboneShape, emb_dim: int, *, dropout: float = 0.0, input_size: int = 112
) -> nn.Module:
    """Any point of the student family."""
    if input_size % 16 != 0:
        raise ValueError(
            f"input_size must be a multiple of 16 (four stride-2 stages), found {input_size}"
        )
    gdc = shape.head is Head.GDC
    if shape.family is Family.MOBILEFACENET:
        return MobileFaceNet(
            emb_dim=emb_dim,
            width=shape.width,
            depths=shape.depths,
            dropout=dropout,
            input_size=input_size,
            feature_width=shape.feature_width,
            gdc=gdc,
        )
    return IResNet(
        depths=shape.depths,
        widths=shape.channels(),
        emb_dim=emb_dim,
        dropout=dropout,
        input_size=input_size,
        gdc=gdc,
    )
