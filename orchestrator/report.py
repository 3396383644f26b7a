"""Human-readable report tables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.tables import markdown_table, pyplot, save_figure


def fmt_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def models_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per model: 10-fold accuracy, TAR@FAR, AUC, EER, rank-1/5, cross-model, and
    for a trained student its last epoch's images/s and input-wait share."""
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
        "img/s",
        "input wait",
    ]
    table = []
    for name, m in rows.items():
        cross = m.get("cross_model") or {}
        tar = m.get("tar_at_far", {})
        acc = f"{m['acc_10fold']:.4f} ± {m['acc_10fold_std']:.4f}"
        cells = [
            name,
            acc,
            fmt_value(tar.get("1e-1")),
            fmt_value(tar.get("1e-2")),
            fmt_value(m["auc"]),
            fmt_value(m["eer"]),
            fmt_value(m["rank1"]),
            fmt_value(m["rank5"]),
            fmt_value(cross.get("acc_10fold")),
            fmt_value(cross.get("rank1")),
            *last_epoch_throughput(m),
        ]
        table.append(cells)
    return "\n".join(markdown_table(header, table)) + "\n"


def last_epoch_throughput(entry: Mapping[str, Any]) -> list[str]:
    """A trained model's last epoch: images/s and the share of it spent waiting for input."""
    epochs = entry.get("throughput") or []
    if not epochs:
        return ["n/a", "n/a"]
    last = epochs[-1]
    return [f"{last['samples_per_s']:.0f}", f"{last['input_wait_share']:.0%}"]


def roc_plot(curves: Mapping[str, tuple[Any, Any]], path: str, title: str) -> None:
    """ROC curves (log-scale FAR) to a PNG; ``curves`` maps a label to (fpr, tpr)."""
    fig, ax = pyplot().subplots(figsize=(6.4, 4.8), dpi=100)
    for label, (fpr, tpr) in curves.items():
        keep = fpr > 0
        ax.plot(fpr[keep], tpr[keep], label=label, linestyle="--" if "cross" in label else "-")
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
