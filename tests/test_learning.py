"""Learning, proven strictly and deterministically in one process: synthetic faces of 24
identities held in memory (32x32), 80 steps of ``train_step`` for ProxylessKD and each
baseline. Held-in top-1 against the classifier goes from chance (1/24) to >= 0.9 and the
loss falls below 0.3x its start, with wide margins (measured in the docstring of
``test_each_method_learns``); reruns give identical numbers.

The top-1 is computed here, independently of the loss code (argmax of the cosine to the
classifier rows against the dataset's labels), and the first step's loss is checked against
a float64 ArcFace written out by hand: a loss that aims at the wrong row or a margin with
the wrong sign fails this file."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orchestrator.config import Arch, LossConfig, MarginConfig, MarginType, Method
from orchestrator.data.images import to_model_input
from orchestrator.data.synthetic import render_image
from orchestrator.losses import build_loss
from orchestrator.models import build_backbone
from orchestrator.train.step import train_step

IDENTITIES, IMAGES, SIZE, EMB_DIM = 24, 6, 32, 16
STEPS, BATCH, LR = 80, 32, 0.1
# A margin that a 60-step run can satisfy: ArcFace at s = 16, m = 0.2.
MARGIN = MarginConfig(type=MarginType.ARCFACE, scale=16.0, m=0.2)
METHODS = [Method.PROXYLESS, Method.SCRATCH, Method.L2, Method.LOGIT, Method.PROXYLESS_L2]


@dataclass(frozen=True)
class Faces:
    images: torch.Tensor  # (N, 3, SIZE, SIZE) model input
    labels: torch.Tensor  # (N,)
    teacher_classifier: torch.Tensor  # (IDENTITIES, EMB_DIM), unit rows


@pytest.fixture(scope="module")
def faces() -> Faces:
    return make_faces()


def make_faces() -> Faces:
    pixels = np.stack(
        [render_image(3, i, image=j, size=SIZE) for i in range(IDENTITIES) for j in range(IMAGES)]
    )
    labels = torch.arange(IDENTITIES).repeat_interleave(IMAGES)
    # The teacher's classifier: unit rows drawn once (a teacher's class centres).
    weight = F.normalize(
        torch.randn(IDENTITIES, EMB_DIM, generator=torch.Generator().manual_seed(9))
    )
    return Faces(to_model_input(pixels), labels, weight)


@dataclass(frozen=True)
class Learned:
    top1_before: float
    top1_after: float
    loss_start: float  # mean of the first 5 steps
    loss_end: float  # mean of the last 5 steps
    first_loss: float


def classifier_rows(loss_fn: torch.nn.Module, faces: Faces, method: Method) -> torch.Tensor:
    """The rows the method classifies with: the inherited W, or its own trained one."""
    if method.inherits_classifier:
        return faces.teacher_classifier
    own = [p for name, p in loss_fn.named_parameters() if name.endswith("classifier.weight")]
    assert len(own) == 1, [name for name, _ in loss_fn.named_parameters()]
    return own[0].detach()


def top1(student: torch.nn.Module, rows: torch.Tensor, faces: Faces) -> float:
    student.eval()
    with torch.no_grad():
        cosine = F.normalize(student(faces.images)) @ F.normalize(rows).T  # (N, IDENTITIES)
    student.train()
    return float((cosine.argmax(dim=1) == faces.labels).float().mean())


def learn(method: Method, faces: Faces, *, seed: int = 0) -> Learned:
    torch.manual_seed(seed)
    student = build_backbone(Arch.TINY_MOBILEFACENET, EMB_DIM, input_size=SIZE)
    loss_fn = build_loss(
        LossConfig(method=method, margin=MARGIN),
        num_classes=IDENTITIES,
        emb_dim=EMB_DIM,
        teacher_classifier=faces.teacher_classifier,
        normalized=True,
    )
    optimizer = torch.optim.SGD(
        [*student.parameters(), *loss_fn.parameters()], lr=LR, momentum=0.9, weight_decay=5e-4
    )
    before = top1(student, classifier_rows(loss_fn, faces, method), faces)
    order = np.random.default_rng(seed)
    # A teacher whose embedding of an image is its class centre (what L2 / logit KD chase).
    teacher = faces.teacher_classifier[faces.labels]
    losses = []
    for _ in range(STEPS):
        index = torch.from_numpy(order.choice(len(faces.labels), BATCH, replace=False))
        out = train_step(
            student,
            loss_fn,
            optimizer=optimizer,
            images=faces.images[index],
            labels=faces.labels[index],
            teacher_embeddings=teacher[index],
        )
        losses.append(float(out.loss))
    after = top1(student, classifier_rows(loss_fn, faces, method), faces)
    return Learned(
        before, after, float(np.mean(losses[:5])), float(np.mean(losses[-5:])), losses[0]
    )


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
def test_each_method_learns(method: Method, faces: Faces) -> None:
    """Measured (2026-12-05, this machine): top-1 from 0.03-0.04 to 0.979-1.000 for every
    method; loss end / start 0.03-0.16 (l2 and logit keep a KD term). At 60 steps logit
    reached only 0.847, hence 80."""
    learned = learn(method, faces)
    assert learned.top1_before < 0.2, learned  # about chance: 1/24
    assert learned.top1_after >= 0.9, learned
    assert learned.loss_end < 0.3 * learned.loss_start, learned


def arcface_reference(
    embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, *, s: float, m: float
) -> float:
    """ArcFace written out in float64: s*cos(theta_y + m) for the target (theta_y + m <= pi
    here), s*cos(theta_j) for the others, cross-entropy averaged over the batch."""
    cosine = F.normalize(embeddings.double()) @ F.normalize(weight.double()).T
    theta = torch.acos(cosine.gather(1, labels[:, None]).clamp(-1, 1))
    assert float((theta + m).max()) <= math.pi
    logits = s * cosine.scatter(1, labels[:, None], torch.cos(theta + m))
    return float(F.cross_entropy(logits, labels))


def test_the_first_step_loss_is_arcface_against_the_inherited_rows(faces: Faces) -> None:
    """The proxyless loss of the untrained student equals ArcFace computed by hand against
    W's rows of the labels: the margin's sign and the row each label takes are right."""
    torch.manual_seed(0)
    student = build_backbone(Arch.TINY_MOBILEFACENET, EMB_DIM, input_size=SIZE)
    config = LossConfig(method=Method.PROXYLESS, margin=MARGIN)
    loss_fn = build_loss(
        config, num_classes=IDENTITIES, emb_dim=EMB_DIM,
        teacher_classifier=faces.teacher_classifier, normalized=True,
    )  # fmt: skip
    index = torch.arange(0, len(faces.labels), 5)
    embeddings = student(faces.images[index]).detach()
    labels = faces.labels[index]
    got = float(loss_fn(embeddings, labels).loss)
    margin = config.margin
    want = arcface_reference(
        embeddings, labels, faces.teacher_classifier, s=margin.scale, m=margin.m
    )
    assert got == pytest.approx(want, rel=1e-5)
    permuted = labels.roll(1)  # another row per label: a different number
    assert (
        abs(
            arcface_reference(
                embeddings, permuted, faces.teacher_classifier, s=margin.scale, m=margin.m
            )
            - got
        )
        > 0.1
    )


def test_a_rerun_gives_identical_numbers(faces: Faces) -> None:
    assert learn(Method.PROXYLESS, faces) == learn(Method.PROXYLESS, faces)
    assert learn(Method.PROXYLESS, faces, seed=1) != learn(Method.PROXYLESS, faces)
