"""Margins, classifiers and the training objectives."""

from __future__ import annotations

import torch
from torch import nn

from orchestrator.config import LossConfig, Method
from orchestrator.losses.heads import (
    FrozenClassifier,
    LabelRangeError,
    MarginClassifier,
    check_labels,
)
from orchestrator.losses.margins import Margin, margin_logits, target_logit
from orchestrator.losses.objectives import (
    CckdLoss,
    L2Loss,
    LogitLoss,
    LossOutput,
    MultistepLoss,
    ProxylessL2Loss,
    ProxylessLoss,
    ScratchLoss,
)

__all__ = [
    "FrozenClassifier",
    "LabelRangeError",
    "LossOutput",
    "Margin",
    "MarginClassifier",
    "build_loss",
    "check_labels",
    "margin_logits",
    "target_logit",
]


def checked_classifier(
    weight: torch.Tensor | None, method: Method, *, num_classes: int, emb_dim: int
) -> torch.Tensor:
    """The teacher classifier ``method`` uses, once its shape is shown to fit: (num_classes,
    emb_dim) when the method inherits it, (num_classes, d) otherwise."""
    if weight is None:
        raise ValueError(f"method {method.value} needs the teacher classifier")
    shape = tuple(weight.shape)
    width_ok = not method.inherits_classifier or shape[1:] == (emb_dim,)
    if len(shape) != 2 or shape[0] != num_classes or not width_ok:
        expected = f"emb_dim={emb_dim}" if method.inherits_classifier else "d"
        raise ValueError(
            f"teacher classifier has shape {shape}, expected (num_classes={num_classes}, {expected})"
        )
    return weight


def build_loss(
    config: LossConfig,
    *,
    num_classes: int,
    emb_dim: int,
    teacher_classifier: torch.Tensor | None = None,
    normalized: bool = False,
) -> nn.Module:
    """The loss module for ``config.method``; its parameters (if any) join the optimizer.

    ``emb_dim`` is the student's width. An inherited classifier must be (num_classes,
    emb_dim); for ``logit`` the teacher's classifier only scores the teacher's own
    embeddings, so its width is the teacher's, whatever the student's.
    ``normalized``: the teacher classifier's rows are unit-length fp32 already, so it is
    used without a copy (the shared object-store view stays shared).
    """
    margin = Margin.from_config(config.margin)

    def classifier() -> torch.Tensor:
        return checked_classifier(
            teacher_classifier, config.method, num_classes=num_classes, emb_dim=emb_dim
        )

    match config.method:
        case Method.PROXYLESS:
            return ProxylessLoss(classifier(), margin, normalized=normalized)
        case Method.SCRATCH:
            return ScratchLoss(num_classes, emb_dim, margin)
        case Method.L2:
            return L2Loss(num_classes, emb_dim, margin, l2_weight=config.l2_weight)
        case Method.LOGIT:
            return LogitLoss(
                classifier(),
                emb_dim,
                margin,
                temperature=config.kd_temperature,
                kd_weight=config.kd_weight,
                normalized=normalized,
            )
        case Method.PROXYLESS_L2:
            return ProxylessL2Loss(
                classifier(), margin, l2_weight=config.l2_weight, normalized=normalized
            )
        case Method.CCKD:
            cckd = config.cckd
            return CckdLoss(
                num_classes,
                emb_dim,
                margin,
                gamma=cckd.gamma,
                order=cckd.order,
                instance_weight=cckd.instance_weight,
                cc_weight=cckd.cc_weight,
            )
        case Method.MULTISTEP:
            return MultistepLoss(num_classes, emb_dim, margin, kd_weight=config.multistep.kd_weight)
