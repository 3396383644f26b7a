"""Generalisation, measured against a control: a teacher trained here (not random) on 60
synthetic identities, its classifier inherited by a ProxylessKD student, and the student's
verification AUC over **all** pairs of 50 held-out identities (4 images each: 19,900
pairs, 300 of them positive) compared with the same student untrained (the paired lr = 0
control: same initial weights, same batches). One process, 32x32 faces.

The threshold comes from a recorded distribution over seeds, not from one run (measured
2026-12-05 on this machine with ``python -m tests.test_generalisation``; see
``RECORDED``): the gain of the distilled student over its control."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from orchestrator.config import Arch, LossConfig, MarginConfig, MarginType, Method
from orchestrator.data.images import to_model_input
from orchestrator.data.synthetic import render_image
from orchestrator.losses import build_loss
from orchestrator.models import build_backbone
from orchestrator.train.step import train_step

TRAIN_IDS, TRAIN_IMAGES, HELD_OUT_IDS, HELD_OUT_IMAGES = 60, 8, 50, 4
SIZE, EMB_DIM, BATCH = 32, 32, 64
TEACHER_STEPS, STUDENT_STEPS = 300, 200
MARGIN = MarginConfig(type=MarginType.ARCFACE, scale=16.0, m=0.2)


@dataclass(frozen=True)
class Faces:
    images: torch.Tensor
    labels: torch.Tensor


def faces(identities: range, per_identity: int) -> Faces:
    pixels = np.stack(
        [render_image(11, i, image=j, size=SIZE) for i in identities for j in range(per_identity)]
    )
    labels = torch.arange(len(identities)).repeat_interleave(per_identity)
    return Faces(to_model_input(pixels), labels)


def train(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    data: Faces,
    *,
    steps: int,
    lr: float,
    seed: int,
) -> None:
    params = [*model.parameters(), *loss_fn.parameters()]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    order = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        index = torch.from_numpy(order.choice(len(data.labels), BATCH, replace=False))
        train_step(
            model,
            loss_fn,
            optimizer=optimizer,
            images=data.images[index],
            labels=data.labels[index],
        )


def all_pairs_auc(model: torch.nn.Module, data: Faces) -> float:
    model.eval()
    with torch.no_grad():
        emb = F.normalize(model(data.images))
    upper = torch.triu_indices(len(data.labels), len(data.labels), offset=1)
    scores = (emb @ emb.T)[upper[0], upper[1]].numpy()
    same = (data.labels[upper[0]] == data.labels[upper[1]]).numpy()
    return float(roc_auc_score(same, scores))


@dataclass(frozen=True)
class Outcome:
    teacher: float
    distilled: float
    control: float

    @property
    def gain(self) -> float:
        return self.distilled - self.control


def distil(seed: int) -> Outcome:
    train_set = faces(range(TRAIN_IDS), TRAIN_IMAGES)
    held_out = faces(range(TRAIN_IDS, TRAIN_IDS + HELD_OUT_IDS), HELD_OUT_IMAGES)
    torch.manual_seed(seed)
    teacher = build_backbone(Arch.TINY_IRESNET, EMB_DIM, input_size=SIZE)
    head = build_loss(
        LossConfig(method=Method.SCRATCH, margin=MARGIN), num_classes=TRAIN_IDS, emb_dim=EMB_DIM
    )
    train(teacher, head, train_set, steps=TEACHER_STEPS, lr=0.1, seed=seed)
    (inherited,) = [p.detach().clone() for n, p in head.named_parameters() if n.endswith("weight")]

    def student(lr: float) -> torch.nn.Module:
        torch.manual_seed(seed + 1000)
        model = build_backbone(Arch.TINY_MOBILEFACENET, EMB_DIM, input_size=SIZE)
        loss_fn = build_loss(
            LossConfig(method=Method.PROXYLESS, margin=MARGIN),
            num_classes=TRAIN_IDS,
            emb_dim=EMB_DIM,
            teacher_classifier=inherited,
        )
        train(model, loss_fn, train_set, steps=STUDENT_STEPS, lr=lr, seed=seed + 1000)
        return model

    return Outcome(
        all_pairs_auc(teacher, held_out),
        all_pairs_auc(student(0.1), held_out),
        all_pairs_auc(student(0.0), held_out),
    )


# Seeds 0-5 (python -m tests.test_generalisation 6, 2026-12-05, this machine):
RECORDED = {
    "teacher": (0.8869, 0.8905, 0.9060, 0.9023, 0.9080, 0.9133),
    "distilled": (0.8978, 0.8816, 0.8752, 0.9056, 0.9017, 0.9073),
    "control": (0.5648, 0.5508, 0.6004, 0.5792, 0.5420, 0.5731),
}
# Gains 0.275-0.360, mean 0.326, sd 0.028: 0.15 is six standard deviations below the mean
# and far above what an untrained or broken student shows (0 by construction for lr = 0).
MIN_GAIN = 0.15
MIN_TEACHER_AUC = 0.8  # recorded 0.887-0.913


@pytest.mark.slow
def test_a_distilled_student_generalises_beyond_its_untrained_control() -> None:
    outcome = distil(seed=0)
    assert outcome.teacher >= MIN_TEACHER_AUC, outcome  # the teacher learned (not random)
    assert outcome.gain >= MIN_GAIN, outcome
    # The student reaches its teacher's level on identities neither saw in training
    # (recorded: distilled - teacher from -0.031 to +0.011).
    assert outcome.distilled >= outcome.teacher - 0.1, outcome


def test_the_recorded_distribution_supports_the_threshold() -> None:
    gains = np.subtract(RECORDED["distilled"], RECORDED["control"])
    assert gains.mean() - 5 * gains.std(ddof=1) > MIN_GAIN
    assert min(RECORDED["teacher"]) > MIN_TEACHER_AUC


if __name__ == "__main__":
    for s in range(int(sys.argv[1]) if len(sys.argv) > 1 else 4):
        print(s, distil(s), flush=True)
