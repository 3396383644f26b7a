"""The promotion rule of jobs.retrain, case by case, on hand-made metrics: no path
promotes without both numbers (unit tier; the pipeline around it is in test_retrain.py)."""

from __future__ import annotations

import pytest

from orchestrator.retrain import MissingMetricError, gate

WHERE = "registry/candidates/abc.json"


def decide(new: object, old: object | None, *, margin: float = 0.01, champion: bool = True) -> bool:
    candidate = {} if new is None else {"acc_10fold": new}
    measured = None if not champion else ({} if old is None else {"acc_10fold": old})
    return gate(
        "acc_10fold", candidate=candidate, champion=measured, margin=margin, where=WHERE
    ).promote


@pytest.mark.parametrize(
    ("new", "old", "margin", "promote"),
    [
        (0.95, 0.90, 0.01, True),  # better by more than the margin
        (0.85, 0.90, 0.01, False),  # worse
        (0.90, 0.90, 0.0, True),  # equal, no margin asked: not worse
        (0.90, 0.90, 0.01, False),  # equal, a margin asked
        (0.905, 0.90, 0.01, False),  # better, but inside the margin
        (0.91, 0.90, 0.01, True),  # exactly at the margin (>=)
        (0.95, 0.90, -0.1, True),  # a negative margin tolerates a small loss...
        (0.85, 0.90, -0.1, True),
        (0.79, 0.90, -0.1, False),  # ...but not a large one
    ],
)
def test_the_gate_compares_both_numbers(
    new: float, old: float, margin: float, promote: bool
) -> None:
    verdict = gate(
        "acc_10fold",
        candidate={"acc_10fold": new},
        champion={"acc_10fold": old},
        margin=margin,
        where=WHERE,
    )
    assert verdict.promote is promote
    assert verdict.champion_value == old
    assert f"{new:.4f}" in verdict.why and f"{old:.4f}" in verdict.why


def test_no_champion_at_all_promotes_and_says_so() -> None:
    verdict = gate(
        "acc_10fold", candidate={"acc_10fold": 0.5}, champion=None, margin=0.5, where=WHERE
    )
    assert verdict.promote and verdict.champion_value is None and "no champion yet" in verdict.why


@pytest.mark.parametrize(
    ("new", "old", "missing"),
    [
        (0.9, None, "champion's acc_10fold is missing"),  # champion exists, metric not measured
        (None, 0.9, "candidate's acc_10fold is missing"),
        (float("nan"), 0.9, "candidate's acc_10fold is nan"),
        (0.9, float("inf"), "champion's acc_10fold is inf"),
        (0.9, "0.8", "champion's acc_10fold is '0.8'"),
    ],
)
def test_a_missing_or_non_finite_number_decides_nothing(
    new: object, old: object, missing: str
) -> None:
    with pytest.raises(MissingMetricError, match=missing) as err:
        decide(new, old)
    assert WHERE in str(err.value) and "nothing was promoted" in str(err.value)


def test_a_missing_candidate_metric_is_refused_even_without_a_champion() -> None:
    with pytest.raises(
        MissingMetricError, match=r"candidate's acc_10fold is missing \(measured: eer\)"
    ):
        gate("acc_10fold", candidate={"eer": 0.1}, champion=None, margin=0.0, where=WHERE)


def test_a_tar_undefined_at_its_far_is_missing_not_zero() -> None:
    """IJB metrics whose TAR is None at that FAR are left out of the metrics: the champion
    then lacks the gate's key, which must not read as "no champion"."""
    metric = "IJBC_tar_at_far_1e-6"
    with pytest.raises(MissingMetricError, match="champion's IJBC_tar_at_far_1e-6 is missing"):
        gate(metric, candidate={metric: 0.4}, champion={"acc_10fold": 0.9}, margin=0.0, where=WHERE)
