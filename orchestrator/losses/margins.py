"""Additive angular / cosine margins as pure functions on cosine logits.

One family covers all three margins (Deng et al., "ArcFace", CVPR 2019, eq. 4):

    f(cos_t) = s * (cos(m1 * theta_t + m2) - m3),    theta_t = acos(cos_t)

ArcFace is (m1, m2, m3) = (1, m, 0), CosFace (Wang et al., CVPR 2018) is (1, 0, m). The
margin touches the target class only; every other logit stays ``s * cos``.

The gradient is the exact one, d f / d cos_t = s * m1 * sin(m1*theta + m2) / sin(theta):
autograd runs through ``acos`` (insightface's arcface_torch applies the margin under
``no_grad``, a straight-through approximation that is ~14% off; we do not).

Two numerical guards:
- cosines are clamped to [-1 + COS_EPS, 1 - COS_EPS] before ``acos`` (whose derivative is
  infinite at +-1); at exactly +-1 the clamp's own gradient is zero, so nothing is NaN.
- where m1*theta + m2 > pi, cos() stops decreasing in theta and the margin would *reward*
  a worse angle. Past theta_max = (pi - m2) / m1 we continue with the CosFace-like line
  ``cos_t - (1 + cos(theta_max)) - m3``, which is strictly decreasing in theta and equals
  the margin curve at theta_max (insightface's ``cos_t - m*sin(m)`` is the same idea with a
  jump of ~0.12 at m=0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from orchestrator.config import MarginConfig, MarginType

COS_EPS = 1e-6


@dataclass(frozen=True)
class Margin:
    """s * (cos(m1*theta + m2) - m3) on the target logit, s * cos elsewhere."""

    scale: float
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0

    @classmethod
    def arcface(cls, scale: float, m: float) -> Margin:
        return cls(scale=scale, m2=m)

    @classmethod
    def cosface(cls, scale: float, m: float) -> Margin:
        return cls(scale=scale, m3=m)

    @classmethod
    def from_config(cls, config: MarginConfig) -> Margin:
        match config.type:
            case MarginType.ARCFACE:
                return cls.arcface(config.scale, config.m)
            case MarginType.COSFACE:
                return cls.cosface(config.scale, config.m)
            case MarginType.COMBINED:
                return cls(scale=config.scale, m1=config.m1, m2=config.m2, m3=config.m3)

    @property
    def is_angular(self) -> bool:
        """False for a pure cosine margin, which needs no acos."""
        return self.m1 != 1.0 or self.m2 != 0.0

    @property
    def theta_max(self) -> float:
        """The largest angle where cos(m1*theta + m2) still decreases."""
        return (math.pi - self.m2) / self.m1


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def target_logit(cos_t: torch.Tensor, margin: Margin) -> torch.Tensor:
    """Margin-adjusted, scaled logit of the target class, any shape, computed in >= fp32.

    This is the one place a margin is applied; the dense and the sharded losses both call it.
    """
    cos_t = at_least_fp32(cos_t)
    if not margin.is_angular:
        return margin.scale * (cos_t - margin.m3)
    clamped = cos_t.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS)
    theta = torch.acos(clamped)
    body = torch.cos(margin.m1 * theta + margin.m2) - margin.m3
    if margin.theta_max >= math.pi:
        return margin.scale * body
    fallback = cos_t - (1.0 + math.cos(margin.theta_max)) - margin.m3
    return margin.scale * torch.where(theta <= margin.theta_max, body, fallback)


def margin_logits(cos: torch.Tensor, labels: torch.Tensor, margin: Margin) -> torch.Tensor:
    """Scaled logits with the margin on each row's target column.

    cos: (B, C_local) cosines. labels: (B,) column index in [0, C_local), or -1 for a row
    whose target is not in these columns (another shard owns it): that row gets no margin.
    """
    owned = labels >= 0  # (B,)
    column = labels.clamp_min(0).unsqueeze(1)  # (B, 1)
    cos_t = cos.gather(1, column).squeeze(1)  # (B,)
    target = target_logit(cos_t, margin).to(cos.dtype)  # (B,)
    is_target = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, column, owned.unsqueeze(1))
    return torch.where(is_target, target.unsqueeze(1), margin.scale * cos)  # (B, C_local)
