"""Losses against float64 references written independently of the implementation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from orchestrator.config import Arch, LossConfig, MarginConfig, MarginType, Method
from orchestrator.losses import LabelRangeError, Margin, build_loss
from orchestrator.losses.objectives import LogitLoss, ProxylessLoss, embedding_l2, hinton_kd
from orchestrator.models import build_backbone

NUM_CLASSES, EMB_DIM, BATCH = 11, 8, 6


def reference_margin_ce(
    emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, m: Margin
) -> torch.Tensor:
    """Row-by-row margin softmax CE with explicit angles (ArcFace/CosFace/combined)."""
    losses = []
    for i in range(emb.shape[0]):
        x = emb[i] / emb[i].norm()
        logits = []
        for j in range(weight.shape[0]):
            w = weight[j] / weight[j].norm()
            c = (x * w).sum()
            if j == int(labels[i]):
                theta = torch.acos(c.clamp(-1 + 1e-6, 1 - 1e-6))
                c = torch.cos(m.m1 * theta + m.m2) - m.m3
            logits.append(m.scale * c)
        z = torch.stack(logits)
        losses.append(torch.logsumexp(z, 0) - z[int(labels[i])])
    return torch.stack(losses).mean()


def margins() -> list[tuple[str, LossConfig]]:
    return [
        ("arcface", LossConfig(margin=MarginConfig(type=MarginType.ARCFACE, scale=16.0, m=0.5))),
        ("cosface", LossConfig(margin=MarginConfig(type=MarginType.COSFACE, scale=16.0, m=0.35))),
        (
            "combined",
            LossConfig(
                margin=MarginConfig(type=MarginType.COMBINED, scale=16.0, m1=0.95, m2=0.2, m3=0.1)
            ),
        ),
    ]


@pytest.mark.parametrize(("name", "cfg"), margins())
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_proxyless_loss_and_gradient_match_reference(
    name: str, cfg: LossConfig, dtype: torch.dtype, rtol: float
) -> None:
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(NUM_CLASSES, EMB_DIM, generator=g, dtype=torch.float64)
    emb64 = torch.randn(BATCH, EMB_DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)

    ref_emb = emb64.clone().requires_grad_(True)
    ref = reference_margin_ce(ref_emb, weight, labels, Margin.from_config(cfg.margin))
    ref.backward()

    loss_fn = build_loss(
        cfg, num_classes=NUM_CLASSES, emb_dim=EMB_DIM, teacher_classifier=weight.to(dtype)
    )
    if dtype == torch.float64:
        loss_fn = loss_fn.double()
    emb = emb64.to(dtype).requires_grad_(True)
    out = loss_fn(emb, labels)
    out.loss.backward()
    assert emb.grad is not None and ref_emb.grad is not None
    assert float(out.loss.detach()) == pytest.approx(float(ref.detach()), rel=rtol)
    assert_grad_close(emb.grad, ref_emb.grad, rtol)


def assert_grad_close(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """Element-wise in float64; in float32, relative to the gradient's norm (a component
    near zero carries the absolute rounding error of the larger ones)."""
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))
    else:
        error = float((got.double() - ref).norm() / ref.norm())
        assert error <= rtol, f"relative gradient error {error:.2e} > {rtol:.0e}"


def test_frozen_classifier_is_never_trained() -> None:
    torch.manual_seed(0)
    student = build_backbone(Arch.TINY_IRESNET, EMB_DIM, input_size=32)
    weight = torch.randn(NUM_CLASSES, EMB_DIM)
    loss_fn = build_loss(
        LossConfig(method=Method.PROXYLESS),
        num_classes=NUM_CLASSES,
        emb_dim=EMB_DIM,
        teacher_classifier=weight,
    )
    assert isinstance(loss_fn, ProxylessLoss)
    frozen = loss_fn.classifier.weight
    before = frozen.clone()
    student_before = [p.detach().clone() for p in student.parameters()]
    assert list(loss_fn.parameters()) == [], "the inherited classifier is not a parameter"
    assert "classifier.weight" not in loss_fn.state_dict(), "and it is not checkpointed"
    params = list(student.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.1)
    assert all(frozen is not p for group in optimizer.param_groups for p in group["params"])
    for _ in range(3):
        images = torch.randn(4, 3, 32, 32)
        labels = torch.randint(0, NUM_CLASSES, (4,))
        optimizer.zero_grad()
        loss_fn(student(images), labels).loss.backward()
        optimizer.step()
    assert frozen.grad is None and not frozen.requires_grad
    assert torch.equal(frozen, before), "classifier bytes changed"
    assert torch.allclose(frozen.norm(dim=1), torch.ones(NUM_CLASSES)), "rows normalised once"
    moved = [
        not torch.equal(a, p) for a, p in zip(student_before, student.parameters(), strict=True)
    ]
    assert any(moved), "the student itself did train"


def test_out_of_range_label_is_an_error_naming_label_and_c() -> None:
    loss_fn = build_loss(
        LossConfig(),
        num_classes=NUM_CLASSES,
        emb_dim=EMB_DIM,
        teacher_classifier=torch.randn(NUM_CLASSES, EMB_DIM),
    )
    with pytest.raises(LabelRangeError, match=r"label 11 .*num_classes=11"):
        loss_fn(torch.randn(2, EMB_DIM), torch.tensor([3, 11]))
    with pytest.raises(LabelRangeError, match=r"label -1"):
        loss_fn(torch.randn(2, EMB_DIM), torch.tensor([-1, 0]))


def test_classifier_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(11, 7\).*num_classes=11, emb_dim=8"):
        build_loss(
            LossConfig(),
            num_classes=NUM_CLASSES,
            emb_dim=EMB_DIM,
            teacher_classifier=torch.randn(NUM_CLASSES, 7),
        )


def test_embedding_l2_is_two_minus_two_cosine() -> None:
    s = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[4.0, 3.0], [0.0, 2.0]], dtype=torch.float64)
    cos = torch.tensor([24.0 / 25.0, 0.0], dtype=torch.float64)
    assert float(embedding_l2(s, t)) == pytest.approx(float((2 - 2 * cos).mean()), rel=1e-12)


def test_hinton_kd_matches_kl_formula() -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64)
    t = torch.randn(5, 7, generator=g, dtype=torch.float64)
    temperature = 3.0
    p_t = F.softmax(t / temperature, 1)
    p_s = F.softmax(s / temperature, 1)
    expected = temperature**2 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert float(hinton_kd(s, t, temperature)) == pytest.approx(float(expected), rel=1e-10)
    assert float(hinton_kd(t, t, temperature)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("method", list(Method))
def test_every_method_builds_and_trains_the_right_parameters(method: Method) -> None:
    torch.manual_seed(0)
    weight = torch.randn(NUM_CLASSES, EMB_DIM)
    loss_fn = build_loss(
        LossConfig(method=method),
        num_classes=NUM_CLASSES,
        emb_dim=EMB_DIM,
        teacher_classifier=weight,
    )
    own = sum(p.numel() for p in loss_fn.parameters())
    assert own == (0 if method.inherits_classifier else NUM_CLASSES * EMB_DIM)
    emb = torch.randn(4, EMB_DIM, requires_grad=True)
    out = loss_fn(emb, torch.tensor([0, 1, 2, 3]), torch.randn(4, EMB_DIM))
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach())) and emb.grad is not None
    # The total is the weighted sum of the logged terms (each weight its config default).
    config = LossConfig()
    weights = {
        "ce": 1.0,
        "l2": config.cckd.instance_weight if method is Method.CCKD else config.l2_weight,
        "kd": config.multistep.kd_weight if method is Method.MULTISTEP else config.kd_weight,
        "cc": config.cckd.cc_weight,
    }
    expected = sum(weights[name] * value for name, value in out.terms.items())
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_methods_needing_the_teacher_say_so() -> None:
    loss_fn = build_loss(LossConfig(method=Method.L2), num_classes=NUM_CLASSES, emb_dim=EMB_DIM)
    with pytest.raises(ValueError, match="teacher's embeddings"):
        loss_fn(torch.randn(2, EMB_DIM), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs the teacher classifier"):
        build_loss(LossConfig(method=Method.PROXYLESS), num_classes=NUM_CLASSES, emb_dim=EMB_DIM)


def test_normalized_fp32_classifier_is_used_without_a_copy() -> None:
    w = torch.nn.functional.normalize(torch.randn(NUM_CLASSES, EMB_DIM), dim=1)
    shared = build_loss(
        LossConfig(),
        num_classes=NUM_CLASSES,
        emb_dim=EMB_DIM,
        teacher_classifier=w,
        normalized=True,
    )
    copied = build_loss(
        LossConfig(), num_classes=NUM_CLASSES, emb_dim=EMB_DIM, teacher_classifier=w
    )
    assert isinstance(shared, ProxylessLoss) and isinstance(copied, ProxylessLoss)
    assert shared.classifier.weight.data_ptr() == w.data_ptr()
    assert copied.classifier.weight.data_ptr() != w.data_ptr()
    emb, labels = torch.randn(4, EMB_DIM), torch.tensor([0, 1, 2, 3])
    assert float(shared(emb, labels).loss) == pytest.approx(
        float(copied(emb, labels).loss), rel=1e-6
    )


def test_logit_kd_takes_the_teacher_classifier_at_the_teachers_width() -> None:
    teacher_width = EMB_DIM + 4
    w = torch.randn(NUM_CLASSES, teacher_width)
    loss_fn = build_loss(
        LossConfig(method=Method.LOGIT), num_classes=NUM_CLASSES, emb_dim=EMB_DIM,
        teacher_classifier=w,
    )  # fmt: skip
    assert isinstance(loss_fn, LogitLoss)
    student, teacher = torch.randn(4, EMB_DIM), torch.randn(4, teacher_width)
    out = loss_fn(student, torch.tensor([0, 1, 2, 3]), teacher)
    # The KD term is Hinton KD between the student's own head and W on the teacher's side.
    scale = LossConfig().margin.scale
    s_logits = scale * loss_fn.scratch.classifier.cosine(student)
    t_logits = (
        scale
        * torch.nn.functional.normalize(teacher, dim=1)
        @ torch.nn.functional.normalize(w, dim=1).T
    )
    assert out.terms["kd"] == pytest.approx(float(hinton_kd(s_logits, t_logits, 4.0)), rel=1e-5)
    with pytest.raises(ValueError, match=rf"expected \(num_classes={NUM_CLASSES + 1}, d\)"):
        build_loss(
            LossConfig(method=Method.LOGIT),
            num_classes=NUM_CLASSES + 1,
            emb_dim=EMB_DIM,
            teacher_classifier=w,
        )
    with pytest.raises(
        ValueError, match=rf"expected \(num_classes={NUM_CLASSES}, emb_dim={EMB_DIM}\)"
    ):
        build_loss(LossConfig(), num_classes=NUM_CLASSES, emb_dim=EMB_DIM, teacher_classifier=w)
