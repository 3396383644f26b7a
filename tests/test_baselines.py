"""The cckd and multistep baselines against float64 references written here from the
papers' formulas, and multistep's schedule: which teacher file each student epoch uses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from orchestrator.config import (
    ConfigError,
    LossConfig,
    MarginConfig,
    MarginType,
    Method,
    MultistepConfig,
    MultistepStage,
    TeacherConfig,
    load_config,
)
from orchestrator.errors import UsageError
from orchestrator.losses import Margin, build_loss
from orchestrator.losses.objectives import (
    CckdLoss,
    MultistepLoss,
    correlation_congruence,
    rbf_correlation,
)
from orchestrator.teacher.classifiers import check_stage_files, snapshot_uri, stage_backbone
from orchestrator.train.spec import ModelSpec, Role, TeacherStage, TrainSpec
from tests.test_losses import reference_margin_ce

NUM_CLASSES, EMB_DIM, BATCH = 7, 6, 5
MARGIN = MarginConfig(type=MarginType.ARCFACE, scale=16.0, m=0.3)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(BATCH, EMB_DIM, generator=g, dtype=torch.float64)
    teacher = torch.randn(BATCH, EMB_DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    return student.requires_grad_(True), teacher, labels


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum())


def reference_kernel(x: torch.Tensor, y: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """Peng et al. 2019, eq. 9: sum_{p<=P} e^{-2 gamma} (2 gamma)^p / p! (x.y)^p, unit x, y."""
    c = (unit(x) * unit(y)).sum()
    total = torch.zeros((), dtype=torch.float64)
    for p in range(order + 1):
        total = total + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * c**p
    return total


def reference_cc(s: torch.Tensor, t: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """1/B^2 sum_ij (k(s_i, s_j) - k(t_i, t_j))^2, entry by entry."""
    n = s.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            d = reference_kernel(s[i], s[j], gamma, order) - reference_kernel(
                t[i], t[j], gamma, order
            )
            total = total + d * d
    return total / n**2


def reference_instance_l2(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.stack([((unit(s[i]) - unit(t[i])) ** 2).sum() for i in range(s.shape[0])]).mean()


def test_cckd_loss_and_gradient_match_the_papers_formula() -> None:
    config = LossConfig(
        method=Method.CCKD,
        margin=MARGIN,
        cckd=LossConfig().cckd.__class__(gamma=0.4, order=2, instance_weight=0.7, cc_weight=2.5),
    )
    loss_fn = build_loss(config, num_classes=NUM_CLASSES, emb_dim=EMB_DIM).double()
    assert isinstance(loss_fn, CckdLoss)
    s, t, labels = batch(0)
    out = loss_fn(s, labels, t)
    (grad,) = torch.autograd.grad(out.loss, s)

    s_ref = s.detach().clone().requires_grad_(True)
    weight = loss_fn.scratch.classifier.weight.detach().clone()
    expected = (
        reference_margin_ce(s_ref, weight, labels, Margin.from_config(MARGIN))
        + 0.7 * reference_instance_l2(s_ref, t)
        + 2.5 * reference_cc(s_ref, t, 0.4, 2)
    )
    (grad_ref,) = torch.autograd.grad(expected, s_ref)
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-10)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-8, atol=1e-12)
    assert out.terms["cc"] == pytest.approx(float(reference_cc(s, t, 0.4, 2)), rel=1e-10)


def test_correlation_term_gradient_passes_gradcheck() -> None:
    s, t, _ = batch(1)
    assert torch.autograd.gradcheck(
        lambda x: correlation_congruence(x, t, gamma=0.4, order=3), (s,), eps=1e-6, atol=1e-8
    )


def test_taylor_kernel_tends_to_the_gaussian_rbf() -> None:
    """With enough terms the expansion is exp(-gamma |x - y|^2) of the unit rows."""
    s, _, _ = batch(2)
    x = torch.nn.functional.normalize(s.detach(), dim=1)
    exact = torch.exp(-0.4 * torch.cdist(x, x) ** 2)
    torch.testing.assert_close(rbf_correlation(s.detach(), gamma=0.4, order=25), exact)
    # Order 2 (the paper's) is an approximation: close, not equal.
    gap = (rbf_correlation(s.detach(), gamma=0.4, order=2) - exact).abs().max()
    assert 1e-4 < float(gap) < 0.1


def test_correlation_congruence_is_zero_for_the_same_geometry() -> None:
    """Scaled copies of the teacher's embeddings have its correlations: no CC loss; a
    shuffled batch does not."""
    _, t, _ = batch(3)
    scaled = t * torch.tensor([[2.0], [0.5], [3.0], [1.0], [7.0]], dtype=torch.float64)
    assert float(correlation_congruence(scaled, t, gamma=0.4, order=2)) < 1e-20
    shuffled = t[torch.tensor([1, 0, 2, 3, 4])] + 0.3 * torch.ones_like(t)
    assert float(correlation_congruence(shuffled, t, gamma=0.4, order=2)) > 1e-4


def test_multistep_loss_is_pocketnets_margin_loss_plus_weighted_unit_mse() -> None:
    config = LossConfig(
        method=Method.MULTISTEP, margin=MARGIN, multistep=MultistepConfig(kd_weight=100.0)
    )
    loss_fn = build_loss(config, num_classes=NUM_CLASSES, emb_dim=EMB_DIM).double()
    assert isinstance(loss_fn, MultistepLoss)
    s, t, labels = batch(4)
    weight = loss_fn.scratch.classifier.weight.detach()
    mse = torch.stack([((unit(s[i]) - unit(t[i])) ** 2).mean() for i in range(BATCH)]).mean()
    expected = reference_margin_ce(s, weight, labels, Margin.from_config(MARGIN)) + 100.0 * mse
    assert float(loss_fn(s, labels, t).loss) == pytest.approx(float(expected), rel=1e-10)


# --- the schedule ---------------------------------------------------------------------


def test_schedule_names_the_teacher_of_every_student_epoch(tmp_path: Path) -> None:
    """epoch:N is the snapshot of teacher epoch N beside teacher.backbone; final is the
    backbone; a path is itself. Each student epoch uses the last stage started by then."""
    backbone = str(tmp_path / "teacher.pt")
    teacher = TeacherConfig(backbone=backbone, emb_dim=EMB_DIM)
    other = str(tmp_path / "elsewhere.pt")
    schedule = MultistepConfig(
        schedule=(
            MultistepStage(0, "epoch:1"),
            MultistepStage(2, "epoch:3"),
            MultistepStage(3, other),
            MultistepStage(5, "final"),
        )
    )
    assert snapshot_uri(backbone, 3) == str(tmp_path / "teacher.epoch0003.pt")
    expected = [
        snapshot_uri(backbone, 1),
        snapshot_uri(backbone, 1),
        snapshot_uri(backbone, 3),
        other,
        other,
        backbone,
        backbone,
    ]
    by_config = [stage_backbone(teacher, schedule.stage_at(e)) for e in range(7)]
    assert by_config == expected
    spec = TrainSpec(
        role=Role.STUDENT,
        model=ModelSpec(teacher.arch, EMB_DIM, 0.0),
        loss=LossConfig(method=Method.MULTISTEP, multistep=schedule),
        optim=load_config().optim,
        num_classes=NUM_CLASSES,
        num_images=10,
        teacher=teacher,
        teacher_stages=tuple(
            TeacherStage(s.from_epoch, stage_backbone(teacher, s)) for s in schedule.stages()
        ),
    )
    by_spec = [spec.teacher_at(e) for e in range(7)]
    assert [t.backbone for t in by_spec if t is not None] == expected
    # Without a schedule: the final teacher throughout.
    assert MultistepConfig().stage_at(9).teacher == "final"


def test_missing_snapshot_names_the_setting_that_makes_it(tmp_path: Path) -> None:
    teacher = TeacherConfig(backbone=str(tmp_path / "teacher.pt"))
    (tmp_path / "teacher.pt").write_bytes(b"x")
    stages = (MultistepStage(0, "epoch:2"), MultistepStage(1, "final"))
    with pytest.raises(
        FileNotFoundError,
        match=r"schedule\[0\] .*teacher\.epoch0002\.pt does not exist; .*snapshot_epochs "
        r"containing 2",
    ):
        check_stage_files(teacher, stages)
    (tmp_path / "teacher.epoch0002.pt").write_bytes(b"x")
    assert check_stage_files(teacher, stages) == [
        str(tmp_path / "teacher.epoch0002.pt"),
        str(tmp_path / "teacher.pt"),
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["loss.multistep.schedule=[{from_epoch: 1, teacher: final}]"],
            "must start at student epoch 0",
        ),
        (
            [
                "loss.multistep.schedule=[{from_epoch: 0, teacher: epoch:1}, "
                "{from_epoch: 0, teacher: final}]"
            ],
            "from_epoch must increase",
        ),
        (["loss.multistep.schedule=[{from_epoch: 0, teacher: 'epoch:x'}]"], "expected epoch:N"),
        (
            [
                "loss.method=multistep",
                "optim.epochs=2",
                "loss.multistep.schedule=[{from_epoch: 0}, {from_epoch: 2, teacher: final}]",
            ],
            r"a stage starts at student epoch 2 \(0-based\), but optim.epochs is 2",
        ),
        (["teacher.snapshot_epochs=[0]"], "epochs are 1-based"),
        (["loss.cckd.gamma=0"], r"loss\.cckd\.gamma: must be > 0"),
    ],
)
def test_bad_baseline_settings_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_snapshot_epochs_past_the_teachers_last_are_refused() -> None:
    from orchestrator.data.format import DatasetMeta
    from orchestrator.train.teacher_job import teacher_snapshots

    config = load_config(None, ["teacher.snapshot_epochs=[2,12]", "teacher_optim.epochs=10"])
    meta = DatasetMeta.__new__(DatasetMeta)
    with pytest.raises(UsageError, match=r"epochs \[12\] are past the teacher's last"):
        teacher_snapshots(config, meta)
    # None asked for (the default): the teacher keeps no snapshot.
    assert teacher_snapshots(load_config(None, []), meta) is None
