"""A periodic progress line for long work: count, rate, ETA (stderr, no dependencies)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """``[label] 1200/3000 images  410.2 images/s  ETA 4s``, at most every ``every_s``."""

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str = "images",
        every_s: float = 5.0,
        stream: TextIO | None = None,
    ) -> None:
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = time.monotonic()
        self._last = self.start

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._print(extra)

    def close(self, extra: str = "") -> float:
        """Print the final line; returns the elapsed seconds."""
        self._print(extra, final=True)
        return time.monotonic() - self.start

    def _print(self, extra: str, final: bool = False) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        tail = f"done in {format_seconds(elapsed)}" if final else ""
        if not final and self.total and rate > 0:
            tail = f"ETA {format_seconds((self.total - self.done) / rate)}"
        parts = [f"[{self.label}] {count} {self.unit}", f"{rate:.1f} {self.unit}/s", tail, extra]
        print("  ".join(p for p in parts if p), file=self.stream, flush=True)
