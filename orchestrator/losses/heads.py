"""Classifiers over normalised embeddings: the frozen inherited one and a trainable one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.losses.margins import at_least_fp32


class LabelRangeError(ValueError):
    """A label outside [0, num_classes): training on it would be silently wrong."""


def check_labels(labels: torch.Tensor, num_classes: int, where: str = "batch") -> None:
    """Fail naming the first offending label and C (never a silent constant loss)."""
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise LabelRangeError(
            f"{where}: label {int(labels[index])} at position {index} is outside "
            f"[0, num_classes={num_classes})"
        )


def unit_rows(weight: torch.Tensor, normalized: bool) -> torch.Tensor:
    """``weight`` detached with unit-length rows in >= float32. Rows already unit-length in
    fp32/fp64 (``normalized``: e.g. what :func:`orchestrator.classifier.read_rows` returns,
    or a read-only view of the node's shared object-store copy) are used as they are, so a
    shared copy stays shared; anything else is normalised into a copy."""
    if normalized and weight.dtype in (torch.float32, torch.float64):
        return weight.detach()
    return F.normalize(at_least_fp32(weight.detach()), dim=1)


class FrozenClassifier(nn.Module):
    """The teacher's classifier W (C, d), inherited by the student and never trained.

    Rows are L2-normalised here unless ``normalized`` says they are already. W is a non-persistent buffer, so it is not a
    parameter (no gradient, never in the optimizer or DDP) and not in the student's
    state_dict (checkpoints refer to the classifier by URI and checksum instead).
    """

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, normalized: bool = False) -> None:
        super().__init__()
        self.register_buffer("weight", unit_rows(weight, normalized), persistent=False)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, d) raw embeddings -> (B, C) cosines."""
        return F.normalize(embeddings, dim=1) @ self.weight.to(embeddings.dtype).T


class MarginClassifier(nn.Module):
    """A trainable normalised classifier, the student's own for the baselines."""

    def __init__(self, num_classes: int, emb_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, emb_dim) * 0.01)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, d) raw embeddings -> (B, C) cosines."""
        return F.normalize(embeddings, dim=1) @ F.normalize(self.weight, dim=1).T
