"""The writers every summary shares (tune's trial table, compare's method tables, the
evaluation report's ROC plot): Markdown tables, CSV text and PNG figures written to a local
path or an object-store URI."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Any

from orchestrator import storage


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table: ``head``, its rule, one line per row."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def csv_text(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(head)
    writer.writerows(rows)
    return buffer.getvalue()


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend."""
    # matplotlib: optional heavy dependency (half a second to import), only for the figures.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: as above

    return plt


def save_figure(fig: Any, uri: str) -> None:
    """``fig`` as a PNG at ``uri`` (written atomically), and closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    pyplot().close(fig)
    storage.write_bytes_atomic(uri, buffer.getvalue())
