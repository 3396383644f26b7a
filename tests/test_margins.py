"""Margins against an independent float64 formulation: numpy angles and hand-derived
derivatives (d/dc s*cos(m1*acos(c)+m2) = s*m1*sin(m1*theta+m2)/sin(theta))."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from orchestrator.losses.margins import COS_EPS, Margin, margin_logits, target_logit

MARGINS = {
    "arcface": Margin.arcface(64.0, 0.5),
    "cosface": Margin.cosface(64.0, 0.35),
    "combined": Margin(scale=32.0, m1=0.9, m2=0.4, m3=0.15),
    "combined_m1_gt_1": Margin(scale=30.0, m1=1.2, m2=0.2, m3=0.1),
}


def reference(c: np.ndarray, m: Margin) -> tuple[np.ndarray, np.ndarray]:
    """Value and d value / d cos, element by element, in float64 with explicit angles."""
    values, grads = [], []
    theta_max = (math.pi - m.m2) / m.m1
    for x in c.tolist():
        if m.m1 == 1.0 and m.m2 == 0.0:
            values.append(m.scale * (x - m.m3))
            grads.append(m.scale)
            continue
        xc = min(max(x, -1 + COS_EPS), 1 - COS_EPS)
        theta = math.acos(xc)
        clamp_grad = 1.0 if -1 + COS_EPS <= x <= 1 - COS_EPS else 0.0
        if theta <= theta_max or theta_max >= math.pi:
            values.append(m.scale * (math.cos(m.m1 * theta + m.m2) - m.m3))
            grads.append(
                clamp_grad * m.scale * m.m1 * math.sin(m.m1 * theta + m.m2) / math.sin(theta)
            )
        else:
            values.append(m.scale * (x - 1 - math.cos(theta_max) - m.m3))
            grads.append(m.scale)
    return np.array(values), np.array(grads)


def cosines() -> np.ndarray:
    rng = np.random.default_rng(0)
    grid = np.linspace(-0.999, 0.999, 41)
    edges = np.array([-1.0, 1.0, -0.99999, 0.99999, 0.0])
    return np.concatenate([grid, edges, rng.uniform(-1, 1, 50)])


@pytest.mark.parametrize("name", list(MARGINS))
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_target_logit_matches_reference(name: str, dtype: torch.dtype, rtol: float) -> None:
    margin = MARGINS[name]
    c = cosines()
    if dtype == torch.float32:
        # Stay away from +-1 where fp32's acos itself loses digits; the edges are tested below.
        c = c[np.abs(c) < 0.999]
    ref_value, ref_grad = reference(c, margin)
    x = torch.tensor(c, dtype=dtype, requires_grad=True)
    value = target_logit(x, margin)
    value.sum().backward()
    assert x.grad is not None
    atol = rtol * margin.scale
    np.testing.assert_allclose(value.detach().double().numpy(), ref_value, rtol=rtol, atol=atol)
    np.testing.assert_allclose(x.grad.double().numpy(), ref_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(MARGINS))
def test_cosines_at_plus_minus_one_are_finite(name: str) -> None:
    margin = MARGINS[name]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.tensor([-1.0, 1.0], dtype=dtype, requires_grad=True)
        target_logit(x, margin).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_arcface_fallback_is_monotone_and_continuous() -> None:
    margin = Margin.arcface(1.0, 0.5)
    theta = torch.linspace(0.0, math.pi, 20001, dtype=torch.float64)
    values = target_logit(torch.cos(theta), margin)
    steps = values[1:] - values[:-1]
    assert (steps <= 1e-12).all(), "the target logit must never grow as the angle grows"
    # Continuity at theta + m = pi: the largest step is of the order of the grid spacing.
    assert steps.abs().max() < 1e-3
    # Past the threshold it is the fallback line, not cos(theta + m) (which would rise again).
    beyond = torch.tensor([math.cos(math.pi - 0.1)], dtype=torch.float64)
    assert float(target_logit(beyond, margin)) < math.cos(math.pi - 0.1 + 0.5)


def test_arcface_value_uses_angle_addition() -> None:
    # cos(theta + m) = c cos m - sqrt(1 - c^2) sin m, a second independent formula.
    c, m, s = 0.6, 0.5, 64.0
    expected = s * (c * math.cos(m) - math.sqrt(1 - c * c) * math.sin(m))
    got = float(target_logit(torch.tensor([c], dtype=torch.float64), Margin.arcface(s, m)))
    assert got == pytest.approx(expected, rel=1e-12)


def test_combined_really_combines_all_three() -> None:
    c = torch.tensor([0.3], dtype=torch.float64)
    theta = math.acos(0.3)
    m = Margin(scale=10.0, m1=0.9, m2=0.3, m3=0.2)
    assert float(target_logit(c, m)) == pytest.approx(10 * (math.cos(0.9 * theta + 0.3) - 0.2))
    only_m2 = float(target_logit(c, Margin(scale=10.0, m2=0.3)))
    assert float(target_logit(c, m)) != pytest.approx(only_m2)


def test_margin_logits_touch_only_owned_targets() -> None:
    torch.manual_seed(0)
    cos = torch.rand(4, 6, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([2, -1, 0, 5])
    margin = Margin.arcface(8.0, 0.5)
    logits = margin_logits(cos, labels, margin)
    expected = 8.0 * cos.clone()
    for row, label in enumerate(labels.tolist()):
        if label >= 0:
            theta = math.acos(float(cos[row, label]))
            expected[row, label] = 8.0 * math.cos(theta + 0.5)
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
