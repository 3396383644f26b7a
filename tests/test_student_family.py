"""The student family (every named architecture one point of it), what a student costs,
and the Pareto front's arithmetic. One process, no Ray."""

from __future__ import annotations

import io
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from orchestrator.config import (
    NAMED_SHAPES,
    Arch,
    ConfigError,
    Constraint,
    Family,
    Goal,
    Head,
    LatencyConfig,
    Objective,
    SearchAlgorithm,
    StudentConfig,
    load_config,
)
from orchestrator.config.family import BackboneShape
from orchestrator.cost import (
    REFERENCE,
    Latency,
    Relative,
    latency_from,
    measure_cost,
    reference_graph,
    relative_from,
    spread,
    time_beside,
    timed_metrics,
)
from orchestrator.export import to_onnx
from orchestrator.formats.student import (
    STUDENT_KIND,
    StudentExport,
    load_student,
    write_student_export,
)
from orchestrator.models import build_backbone, build_shape, profile_model
from orchestrator.models.iresnet import IResNet
from orchestrator.models.mobilefacenet import MobileFaceNet
from orchestrator.pareto import dominates, front_rows, non_dominated
from orchestrator.tune import effective_search, search_algorithm
from orchestrator.tune_summary import TrialRow

pytestmark = pytest.mark.unit

SIZE = 32  # small images keep every backbone cheap; the layout does not depend on it
# insightface's model zoo: the stage depths of its iResNets
INSIGHTFACE_DEPTHS = {
    Arch.IRESNET18: (2, 2, 2, 2),
    Arch.IRESNET34: (3, 4, 6, 3),
    Arch.IRESNET50: (3, 4, 14, 3),
    Arch.IRESNET100: (3, 13, 30, 3),
    Arch.IRESNET200: (6, 26, 60, 6),
}


def as_built_before_the_family(arch: Arch, emb_dim: int) -> torch.nn.Module:
    """Each named architecture as its class is documented (insightface's figures), built
    without the family's table."""
    match arch:
        case Arch.MOBILEFACENET:
            return MobileFaceNet(emb_dim, width=2, depths=(1, 4, 6, 2), input_size=SIZE)
        case Arch.SMALL_MOBILEFACENET:
            return MobileFaceNet(emb_dim, width=1, depths=(1, 4, 6, 2), input_size=SIZE)
        case Arch.TINY_MOBILEFACENET:
            return MobileFaceNet(emb_dim, width=1, depths=(1, 1, 1, 1), input_size=SIZE)
        case Arch.TINY_IRESNET:
            return IResNet((1, 1, 1, 1), (16, 32, 64, 128), emb_dim=emb_dim, input_size=SIZE)
    return IResNet(INSIGHTFACE_DEPTHS[arch], emb_dim=emb_dim, input_size=SIZE)


@pytest.mark.parametrize("arch", list(Arch), ids=lambda a: a.value)
def test_every_named_arch_is_its_family_point(arch: Arch) -> None:
    torch.manual_seed(0)
    reference = as_built_before_the_family(arch, 32).eval()
    point = build_backbone(arch, 32, input_size=SIZE).eval()
    ours, theirs = point.state_dict(), reference.state_dict()
    assert [(k, v.shape) for k, v in ours.items()] == [(k, v.shape) for k, v in theirs.items()]
    assert profile_model(point, SIZE) == profile_model(reference, SIZE)
    point.load_state_dict(theirs)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(point(x), reference(x))
    assert StudentConfig(arch=arch).is_named()


def random_points(count: int, seed: int) -> list[BackboneShape]:
    rng = random.Random(seed)
    points = []
    for family in [Family.MOBILEFACENET, Family.IRESNET] * (count // 2):
        first = 1 if family is Family.MOBILEFACENET else rng.randint(1, 2)
        depths = (first, rng.randint(1, 2), rng.randint(1, 2), rng.randint(1, 2))
        points.append(
            BackboneShape(
                family=family,
                width=rng.choice([0.125, 0.25, 0.375, 0.5]),
                depths=depths,
                feature_width=rng.choice([64, 96]) if family is Family.MOBILEFACENET else 0,
                head=rng.choice(list(Head)),
            )
        )
    return points


@pytest.mark.parametrize("shape", random_points(6, seed=3), ids=lambda s: s.label())
def test_a_family_point_builds_runs_and_exports_with_onnx_parity(shape: BackboneShape) -> None:
    model = build_shape(shape, 24, input_size=SIZE).eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        want = model(x).numpy()
    assert want.shape == (3, 24) and np.isfinite(want).all()
    session = onnxruntime.InferenceSession(to_onnx(model, SIZE), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_students_point_comes_from_its_arch_and_overrides() -> None:
    config = StudentConfig(
        arch=Arch.TINY_MOBILEFACENET, width=0.5, depths=(1, 2, 2, 1), head=Head.FC
    )
    shape = config.shape()
    assert shape == BackboneShape(Family.MOBILEFACENET, 0.5, (1, 2, 2, 1), 512, Head.FC)
    assert not config.is_named() and shape.channels() == (32, 64)
    # The overrides reach the YAML config with the usual checks and key paths.
    loaded = load_config(None, ["student.width=0.5", "student.depths=[1,2,2,1]"])
    assert loaded.student.shape().depths == (1, 2, 2, 1)
    bad = {
        "student.depths=[2,2,2,2]": "student.depths: a MobileFaceNet's first stage",
        "student.width=0.01": "student.width: 0.01 leaves 1 channels",
        "student.feature_width=64 student.arch=iresnet18": "student.feature_width: an iResNet",
        "student.head=pool": "student.head",
    }
    for overrides, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides.split())


def test_an_export_keeps_its_point_and_an_old_export_is_its_arch(tmp_path: Path) -> None:
    shape = BackboneShape(Family.IRESNET, 0.125, (1, 2, 1, 1), 0, Head.GDC)
    model = build_shape(shape, 16, input_size=SIZE).eval()
    export = StudentExport(
        arch=Arch.TINY_IRESNET,
        emb_dim=16,
        image_size=SIZE,
        student=model.state_dict(),
        classifier=None,
        config={},
        epochs_done=(0,),
        train_seconds=1.0,
        shape=shape,
    )
    write_student_export(str(tmp_path / "s.pt"), export)
    loaded, back = load_student(str(tmp_path / "s.pt"))
    assert back.shape == shape
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # An export written before the family has no shape: its arch's named point.
    named = build_backbone(Arch.TINY_IRESNET, 16, input_size=SIZE).eval()
    old = {
        "kind": STUDENT_KIND,
        "version": 1,
        "arch": "tiny_iresnet",
        "emb_dim": 16,
        "image_size": SIZE,
        "student": named.state_dict(),
        "classifier": None,
        "config": {},
        "epochs_done": [0],
        "train_seconds": 1.0,
    }
    buffer = io.BytesIO()
    torch.save(old, buffer)
    (tmp_path / "old.pt").write_bytes(buffer.getvalue())
    loaded, back = load_student(str(tmp_path / "old.pt"))
    assert back.shape is None
    with torch.no_grad():
        assert torch.equal(loaded(x), named(x))


def test_the_cost_of_a_student_is_its_profile_and_its_timed_export() -> None:
    shape = NAMED_SHAPES["tiny_mobilefacenet"]
    model = build_shape(shape, 16, input_size=SIZE)
    latency = LatencyConfig(threads=1, serving_batch=4, warmup=2, repeats=12, rounds=3)
    cost, graph = measure_cost(model, image_size=SIZE, latency=latency)
    profile = profile_model(model, SIZE)
    assert (cost.params, cost.macs, cost.onnx_bytes) == (profile.params, profile.macs, len(graph))
    for timed, batch in ((cost.latency, 1), (cost.serving, 4)):
        assert (timed.batch, timed.runs, timed.rounds, timed.threads) == (batch, 12, 3, 1)
        assert 0 < timed.p10_ms <= timed.median_ms <= timed.p90_ms and timed.noise >= 0
    metrics = cost.metrics()
    assert metrics["macs"] == profile.macs and metrics["onnx_mb"] == len(graph) / 1e6
    assert metrics["latency_ms"] == cost.latency.median_ms


def test_the_spread_of_timed_rounds_by_hand() -> None:
    # Values 1 2 2 3 4 4 6 8: median 3.5; p10 and p90 (inclusive, 7 gaps) at 0.7 and 6.3:
    # 1.7 and 6.6. Round medians 2.5 and 5: 0.286 and 0.429 from 3.5; half the p10-p90
    # width, 4.9 / 7 = 0.7, is the larger.
    median, p10, p90, noise = spread([[1, 2, 3, 4], [2, 4, 6, 8]])
    assert (median, p10, p90) == pytest.approx((3.5, 1.7, 6.6)) and noise == pytest.approx(0.7)
    # One round of three at twice the others': its median is 1.0 from the median (1), more
    # than half the p10-p90 width (1 to 2: 0.5).
    assert spread([[1, 1, 1], [1, 1, 1], [2, 2, 2]]) == pytest.approx((1.0, 1.0, 2.0, 1.0))


def test_a_student_timed_beside_the_reference_network() -> None:
    reference = reference_graph(SIZE)
    assert reference == reference_graph(SIZE)  # the same file every time
    session = onnxruntime.InferenceSession(reference, providers=["CPUExecutionProvider"])
    out = session.run(None, {"image": np.zeros((2, 3, SIZE, SIZE), np.float32)})[0]
    assert out.shape == (2, 512)
    named = build_shape(NAMED_SHAPES[REFERENCE], 512, input_size=SIZE)
    assert len(reference) == len(to_onnx(named, SIZE))  # the named network, other weights
    # A quarter of its width: a tenth of its MACs (6.0 M against 60.4 M).
    small = build_shape(replace(NAMED_SHAPES[REFERENCE], width=0.25), 16, input_size=SIZE)
    assert profile_model(small, SIZE).macs * 10 < profile_model(named, SIZE).macs
    student = to_onnx(small, SIZE)
    latency = LatencyConfig(threads=1, serving_batch=4, warmup=1, repeats=10, rounds=2)
    one, ratio = time_beside(student, reference, image_size=SIZE, batch=4, latency=latency)
    assert (one.batch, one.runs, one.rounds, one.threads) == (4, 10, 2, 1)
    assert 0 < one.p10_ms <= one.median_ms <= one.p90_ms and one.noise >= 0
    assert ratio.batch == 4 and 0 < ratio.p10 <= ratio.median <= ratio.p90 and ratio.noise >= 0
    # The ratio is the graph's time over the reference's (measured: 0.25 and 3.9; a
    # factor of two from either bound, beyond what a pair's noise can reach).
    assert ratio.median < 0.5
    _, reverse = time_beside(reference, student, image_size=SIZE, batch=1, latency=latency)
    assert reverse.median > 2.0


def test_timings_and_ratios_go_into_a_report_and_come_back() -> None:
    latency = LatencyConfig(threads=2, serving_batch=4, warmup=1, repeats=10, rounds=3)
    one = Latency(1, 2, 10, 3, median_ms=2.0, p10_ms=1.5, p90_ms=3.0, noise=0.25)
    serving = Latency(4, 2, 10, 3, median_ms=7.0, p10_ms=6.0, p90_ms=9.0, noise=0.2)
    ratios = (Relative(1, 0.4, 0.35, 0.5, 0.1), Relative(4, 0.5, 0.45, 0.6, 0.12))
    metrics = timed_metrics(one, serving, 2_000_000, ratios)
    assert metrics["latency_ms"] == 2.0 and metrics["serving_latency_ms"] == 7.0
    assert metrics["onnx_mb"] == 2.0
    assert metrics["latency_vs_ref"] == 0.4 and metrics["serving_vs_ref_noise"] == 0.12
    assert latency_from(metrics, "latency", 1, latency) == one
    assert latency_from(metrics, "serving", 4, latency) == serving
    assert relative_from(metrics, "latency", 1) == ratios[0]
    assert relative_from(metrics, "serving", 4) == ratios[1]
    # A trial's own timing has no ratio: nothing comes back.
    assert relative_from(timed_metrics(one, serving, 2_000_000), "latency", 1) is None


def test_objectives_and_constraints_are_checked() -> None:
    config = load_config(
        None,
        [
            "tune.objectives=[{metric: auc}, {metric: latency_ms, goal: min}]",
            "tune.constraints=[{metric: macs, at_most: 1.0e6}]",
        ],
    )
    assert config.tune.accuracy_metric() == "auc" and config.tune.measures_cost()
    assert config.tune.constraints[0].describe() == "macs <= 1e+06"
    within = Constraint("params", at_most=2e6, at_least=1e5)
    assert within.holds(1e6) and not within.holds(3e6) and not within.holds(5e4)
    for overrides, message in {
        "tune.objectives=[{metric: latency_ms, goal: min}]": "are all costs",
        "tune.objectives=[{metric: auc, goal: min}]": "an accuracy is maximised",
        "tune.constraints=[{metric: latncy_ms, at_most: 3}]": r"tune\.constraints\[0\]\.metric",
        "tune.constraints=[{metric: macs}]": "give at_most and/or at_least",
        "tune.space.emb_dim=[64,128]": r"tune\.space\.emb_dim: method proxyless trains in",
    }.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, [overrides])


def dense_front(values: np.ndarray, signs: np.ndarray) -> set[int]:
    """The non-dominated rows, by a dominance matrix (an independent computation)."""
    v = values * signs  # larger is better on every column
    ge = (v[:, None, :] >= v[None, :, :]).all(axis=2)
    gt = (v[:, None, :] > v[None, :, :]).any(axis=2)
    dominated = (ge & gt).any(axis=0)  # some row i dominates row j
    return {int(j) for j in np.flatnonzero(~dominated)}


def test_the_front_is_the_non_dominated_set() -> None:
    goals = [Objective("auc"), Objective("latency_ms", Goal.MIN)]
    # By hand: (0.9, 5) and (0.8, 2) and (0.6, 1) trade off; (0.7, 3) loses to (0.8, 2);
    # (0.9, 6) loses to (0.9, 5) on latency alone; the tie (0.8, 2) twice keeps both.
    points = [(0.9, 5.0), (0.7, 3.0), (0.8, 2.0), (0.6, 1.0), (0.9, 6.0), (0.8, 2.0)]
    assert non_dominated(points, goals) == [0, 2, 3, 5]
    assert dominates((0.8, 2.0), (0.7, 3.0), goals) and not dominates((0.8, 2.0), (0.8, 2.0), goals)
    rng = np.random.default_rng(0)
    three = [Objective("auc"), Objective("latency_ms", Goal.MIN), Objective("macs", Goal.MIN)]
    for _ in range(20):
        values = rng.integers(0, 6, size=(25, 3)).astype(float)  # many ties
        expected = dense_front(values, np.array([1.0, -1.0, -1.0]))
        assert set(non_dominated([tuple(r) for r in values], three)) == expected


def test_the_front_takes_completed_trials_within_their_constraints() -> None:
    def row(trial: str, status: str, auc: float, latency: float) -> TrialRow:
        metrics = {"val_auc": auc, "latency_ms": latency, "macs": 1e6}
        return TrialRow(trial, status, 2, auc, {}, metrics, None, None)

    rows = [
        row("a", "completed", 0.9, 5.0),
        row("b", "completed", 0.8, 2.0),
        row("c", "stopped early", 0.95, 1.0),  # better on both, but never finished
        row("d", "refused", 0.0, 0.5),
        row("e", "completed", 0.7, 0.9),
    ]
    goals = [Objective("auc"), Objective("latency_ms", Goal.MIN)]
    assert [r.trial_id for r in front_rows(rows, goals)] == ["a", "b", "e"]
    bound = (Constraint("latency_ms", at_most=4.0),)
    assert [r.trial_id for r in front_rows(rows, goals, bound)] == ["b", "e"]


def test_several_objectives_make_optunas_search_and_a_grid_stays_a_grid() -> None:
    objectives = "tune.objectives=[{metric: auc}, {metric: macs, goal: min}]"
    config = load_config(None, [objectives, "seed=7"])
    assert effective_search(config.tune) is SearchAlgorithm.OPTUNA  # from the default random
    searcher = search_algorithm(config)
    assert (searcher.metric, searcher.mode) == (["val_auc", "macs"], ["max", "min"])
    grid = load_config(None, [objectives, "tune.search=grid"])
    assert effective_search(grid.tune) is SearchAlgorithm.GRID and search_algorithm(grid) is None
    one = load_config(None, ["tune.search=optuna", "tune.metric=auc"])
    assert search_algorithm(one).metric == "val_auc"
    assert search_algorithm(load_config(None, [])) is None  # random, one objective
