"""Human-readable report tables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per model: 10-fold accuracy, TAR@FAR, AUC, EER, rank-1/5, cross-model."""
    header = [
        "model",
        "acc 10-fold",
        "TAR@1e-1",
        "TAR@1e-2",
        "AUC",
        "EER",
        "rank-1",
        "rank-5",
        "cross acc",
        "cross rank-1",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in rows.items():
        cross = m.get("cross_model") or {}
        tar = m.get("tar_at_far", {})
        acc = f"{m['acc_10fold']:.4f} ± {m['acc_10fold_std']:.4f}"
        cells = [
            name,
            acc,
            _fmt(tar.get("1e-1")),
            _fmt(tar.get("1e-2")),
            _fmt(m["auc"]),
            _fmt(m["eer"]),
            _fmt(m["rank1"]),
            _fmt(m["rank5"]),
            _fmt(cross.get("acc_10fold")),
            _fmt(cross.get("rank1")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
