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
    L2Loss,
    LogitLoss,
    LossOutput,
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
    "needs_teacher_embeddings",
    "target_logit",
]


def needs_teacher_embeddings(method: Method) -> bool:
    return method in (Method.L2, Method.LOGIT, Method.PROXYLESS_L2)


def build_loss(
    config: LossConfig,
    num_classes: int,
    emb_dim: int,
    teacher_classifier: torch.Tensor | None = None,
    normalized: bool = False,
) -> nn.Module:
    """The loss module for ``config.method``; its parameters (if any) join the optimizer.

    ``normalized``: the teacher classifier's rows are unit-length fp32 already, so the
    proxyless loss can use it without a copy (the shared object-store view stays shared).
    """
    margin = Margin.from_config(config)

    def classifier() -> torch.Tensor:
        if teacher_classifier is None:
            raise ValueError(f"method {config.method.value} needs the teacher classifier")
        if tuple(teacher_classifier.shape) != (num_classes, emb_dim):
            raise ValueError(
                f"teacher classifier has shape {tuple(teacher_classifier.shape)}, expected "
                f"(num_classes={num_classes}, emb_dim={emb_dim})"
            )
        return teacher_classifier

    match config.method:
        case Method.PROXYLESS:
            return ProxylessLoss(classifier(), margin, normalized)
        case Method.SCRATCH:
            return ScratchLoss(num_classes, emb_dim, margin)
        case Method.L2:
            return L2Loss(num_classes, emb_dim, margin, config.l2_weight)
        case Method.LOGIT:
            return LogitLoss(classifier(), emb_dim, margin, config.kd_temperature, config.kd_weight)
        case Method.PROXYLESS_L2:
            return ProxylessL2Loss(classifier(), margin, config.l2_weight)
