"""The training objectives: ProxylessKD and the baselines it is compared against.

Every loss takes the student's raw embeddings (B, d), the labels (B,) and, where the
method needs them, the teacher's embeddings of the same images (B, d), and returns a
:class:`LossOutput` whose ``loss`` is what the optimizer minimises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.losses.heads import FrozenClassifier, MarginClassifier, check_labels
from orchestrator.losses.margins import Margin, at_least_fp32, margin_logits


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    terms: dict[str, float] = field(default_factory=dict)  # detached parts, for logging


def margin_cross_entropy(cos: torch.Tensor, labels: torch.Tensor, margin: Margin) -> torch.Tensor:
    """Mean cross-entropy of margin logits. cos: (B, C) cosines, labels: (B,) in [0, C)."""
    logits = margin_logits(cos, labels, margin)
    return F.cross_entropy(at_least_fp32(logits), labels)


def classifier_loss(
    classifier: FrozenClassifier | MarginClassifier,
    margin: Margin,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
) -> LossOutput:
    """Margin cross-entropy of raw embeddings against a normalised classifier (labels checked)."""
    check_labels(labels, classifier.num_classes)
    ce = margin_cross_entropy(classifier.cosine(embeddings), labels, margin)
    return LossOutput(ce, {"ce": float(ce.detach())})


def embedding_l2(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||s/|s| - t/|t|||^2 (a proxy loss in the teacher's space)."""
    diff = F.normalize(student, dim=1) - F.normalize(teacher.detach(), dim=1)
    return diff.pow(2).sum(dim=1).mean()


def hinton_kd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over the batch.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015; the T^2
    factor keeps gradient magnitudes comparable across temperatures.
    """
    log_p_student = F.log_softmax(at_least_fp32(student_logits) / temperature, dim=1)
    log_p_teacher = F.log_softmax(at_least_fp32(teacher_logits.detach()) / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def _need_teacher(teacher: torch.Tensor | None, method: str) -> torch.Tensor:
    if teacher is None:
        raise ValueError(f"method {method} needs the teacher's embeddings of the batch")
    return teacher


class ProxylessLoss(nn.Module):
    """ProxylessKD: margin softmax against the teacher's frozen, inherited classifier.

        L = -1/B sum_i log( e^{f(cos_{i,y_i})} / (e^{f(cos_{i,y_i})} + sum_{j!=y_i} e^{s cos_ij}) )

    with cos_ij = <x_i/|x_i|, w_j/|w_j|>, W the teacher's classifier (frozen) and f the
    margin of :mod:`orchestrator.losses.margins`. Shi, Ren, Chen, Yan, "ProxylessKD: Direct
    Knowledge Distillation with Inherited Classifier for Face Recognition", arXiv:2011.00265.
    """

    def __init__(
        self, teacher_classifier: torch.Tensor, margin: Margin, *, normalized: bool = False
    ) -> None:
        super().__init__()
        self.classifier = FrozenClassifier(teacher_classifier, normalized)
        self.margin = margin

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> LossOutput:
        return classifier_loss(self.classifier, self.margin, embeddings, labels)


class ScratchLoss(nn.Module):
    """Baseline: the student's own trainable margin classifier, no teacher at all."""

    def __init__(self, num_classes: int, emb_dim: int, margin: Margin) -> None:
        super().__init__()
        self.classifier = MarginClassifier(num_classes, emb_dim)
        self.margin = margin

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> LossOutput:
        return classifier_loss(self.classifier, self.margin, embeddings, labels)


class L2Loss(nn.Module):
    """Baseline proxy KD: own margin classifier + w * ||s/|s| - t/|t|||^2.

    The embedding-regression proxy that ProxylessKD argues against (Shi et al. 2020, sec. 3).
    """

    def __init__(self, num_classes: int, emb_dim: int, margin: Margin, *, l2_weight: float) -> None:
        super().__init__()
        self.scratch = ScratchLoss(num_classes, emb_dim, margin)
        self.l2_weight = l2_weight

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> LossOutput:
        ce = self.scratch(embeddings, labels).loss
        l2 = embedding_l2(embeddings, _need_teacher(teacher, "l2"))
        loss = ce + self.l2_weight * l2
        return LossOutput(loss, {"ce": float(ce.detach()), "l2": float(l2.detach())})


class LogitLoss(nn.Module):
    """Baseline logit KD: own margin classifier + w * Hinton KD against the teacher's logits.

    Teacher logits are s * cos(teacher embedding, teacher classifier); student logits are
    s * cos(student embedding, student classifier), both without margin. The teacher's
    classifier (C, d_teacher) only ever meets the teacher's embeddings, so the student's
    width ``emb_dim`` is free (Hinton et al., "Distilling the Knowledge in a Neural
    Network", 2015).
    """

    def __init__(
        self,
        teacher_classifier: torch.Tensor,
        emb_dim: int,
        margin: Margin,
        *,
        temperature: float,
        kd_weight: float,
        normalized: bool = False,
    ) -> None:
        super().__init__()
        self.teacher = FrozenClassifier(teacher_classifier, normalized)
        self.scratch = ScratchLoss(self.teacher.num_classes, emb_dim, margin)
        self.temperature = temperature
        self.kd_weight = kd_weight

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> LossOutput:
        ce = self.scratch(embeddings, labels).loss
        scale = self.scratch.margin.scale
        student_logits = scale * self.scratch.classifier.cosine(embeddings)
        teacher_logits = scale * self.teacher.cosine(_need_teacher(teacher, "logit"))
        kd = hinton_kd(student_logits, teacher_logits, self.temperature)
        loss = ce + self.kd_weight * kd
        return LossOutput(loss, {"ce": float(ce.detach()), "kd": float(kd.detach())})


class ProxylessL2Loss(nn.Module):
    """ProxylessKD plus the embedding proxy: inherited frozen classifier + w * L2."""

    def __init__(
        self,
        teacher_classifier: torch.Tensor,
        margin: Margin,
        *,
        l2_weight: float,
        normalized: bool = False,
    ) -> None:
        super().__init__()
        self.proxyless = ProxylessLoss(teacher_classifier, margin, normalized=normalized)
        self.l2_weight = l2_weight

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> LossOutput:
        ce = self.proxyless(embeddings, labels).loss
        l2 = embedding_l2(embeddings, _need_teacher(teacher, "proxyless+l2"))
        loss = ce + self.l2_weight * l2
        return LossOutput(loss, {"ce": float(ce.detach()), "l2": float(l2.detach())})


def rbf_correlation(embeddings: torch.Tensor, *, gamma: float, order: int) -> torch.Tensor:
    """The (B, B) correlation matrix of a batch under the Gaussian RBF kernel, to ``order``.

    For unit rows x, y: exp(-gamma |x - y|^2) = e^{-2 gamma} e^{2 gamma <x, y>}, and the
    second factor is taken as its Taylor series to ``order``:

        k(x, y) ~= sum_{p=0}^{P} e^{-2 gamma} (2 gamma)^p / p! <x, y>^p

    (Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019, eq. 9).
    The rows of ``embeddings`` are normalised first.
    """
    unit = F.normalize(at_least_fp32(embeddings), dim=1)
    sim = unit @ unit.T
    kernel = torch.zeros_like(sim)
    power = torch.ones_like(sim)
    for p in range(order + 1):
        if p:
            power = power * sim
        kernel = kernel + math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p) * power
    return kernel


def correlation_congruence(
    student: torch.Tensor, teacher: torch.Tensor, *, gamma: float, order: int
) -> torch.Tensor:
    """L_CC = 1/B^2 ||psi(S) - psi(T)||_F^2, psi the RBF correlation matrix of the batch
    (:func:`rbf_correlation`); the teacher's side carries no gradient."""
    diff = rbf_correlation(student, gamma=gamma, order=order) - rbf_correlation(
        teacher.detach(), gamma=gamma, order=order
    )
    return diff.pow(2).mean()


def unit_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the B x d entries of (s/|s| - t/|t|)^2: PocketNet's KD term (an MSE of
    the normalised embeddings), which is :func:`embedding_l2` divided by d."""
    diff = F.normalize(student, dim=1) - F.normalize(teacher.detach(), dim=1)
    return diff.pow(2).mean()


class CckdLoss(nn.Module):
    """Baseline CCKD: own margin classifier + instance congruence + correlation congruence.

        L = CE_margin(s) + a * 1/B sum_i |s_i/|s_i| - t_i/|t_i||^2 + b * L_CC(S, T)

    with L_CC of :func:`correlation_congruence` (Peng, Jin, Liu, Zhou, Wu, Liu, Li, Zhang,
    "Correlation Congruence for Knowledge Distillation", ICCV 2019). The paper's instance
    term is a KD loss; ours is the embedding L2 of our ``l2`` baseline (the student's width
    is the teacher's), so ``cckd`` is ``l2`` plus the correlation term and the two isolate
    what the correlation adds. The batch is each worker's local batch: with
    several workers the correlation matrix is that of the local batch, as in the paper's
    per-GPU implementation, and the gradient is the mean of the workers'.
    """

    def __init__(
        self,
        num_classes: int,
        emb_dim: int,
        margin: Margin,
        *,
        gamma: float,
        order: int,
        instance_weight: float,
        cc_weight: float,
    ) -> None:
        super().__init__()
        self.scratch = ScratchLoss(num_classes, emb_dim, margin)
        self.gamma, self.order = gamma, order
        self.instance_weight, self.cc_weight = instance_weight, cc_weight

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> LossOutput:
        target = _need_teacher(teacher, "cckd")
        ce = self.scratch(embeddings, labels).loss
        l2 = embedding_l2(embeddings, target)
        cc = correlation_congruence(embeddings, target, gamma=self.gamma, order=self.order)
        loss = ce + self.instance_weight * l2 + self.cc_weight * cc
        terms = {"ce": float(ce.detach()), "l2": float(l2.detach()), "cc": float(cc.detach())}
        return LossOutput(loss, terms)


class MultistepLoss(nn.Module):
    """Baseline multi-step KD (PocketNet): own margin classifier + w * MSE of the unit
    embeddings, w = 100 in PocketNet (Boutros, Siebke, Klemt, Damer, Kirchbuchner, Kuijper,
    IEEE Access 2022). Which teacher made ``teacher`` changes with the student's epoch
    (``loss.multistep.schedule``); the worker swaps it, the loss does not know."""

    def __init__(self, num_classes: int, emb_dim: int, margin: Margin, *, kd_weight: float) -> None:
        super().__init__()
        self.scratch = ScratchLoss(num_classes, emb_dim, margin)
        self.kd_weight = kd_weight

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> LossOutput:
        ce = self.scratch(embeddings, labels).loss
        kd = unit_mse(embeddings, _need_teacher(teacher, "multistep"))
        loss = ce + self.kd_weight * kd
        return LossOutput(loss, {"ce": float(ce.detach()), "kd": float(kd.detach())})
