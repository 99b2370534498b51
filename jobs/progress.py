"""Progress of a stage as a person reads it: rows done, rows per second and time left, one log line
every few seconds (plain lines, not a redrawn bar, so `lvd logs` of a submitted job reads the same).

`lvd run --quiet` turns it off with `set_enabled(False)`.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("lvd")

_enabled = True
EVERY_SECONDS = 5.0


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def is_enabled() -> bool:
    return _enabled


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """Counts rows (and the parts or tasks they come in) of one step of a stage."""

    def __init__(
        self, name: str, total: int | None = None, unit: str = "rows", every: float | None = None
    ) -> None:
        # EVERY_SECONDS is read here, not bound as a default, so a test or a caller can change it.
        self.name, self.total, self.unit = name, total, unit
        self.every = EVERY_SECONDS if every is None else every
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / elapsed
        text = f"{self.name}: {self.done:,}"
        if self.total:
            text += f"/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:,.1f} {self.unit}/s"
        if self.total and 0 < self.done < self.total and rate > 0:
            text += f", ETA {_duration((self.total - self.done) / rate)}"
        return text

    def update(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if _enabled and now - self.last >= self.every:
            self.last = now
            log.info("%s", self.line())

    def close(self) -> None:
        if _enabled and self.done:
            log.info("%s in %s", self.line().split(", ETA")[0], _duration(time.monotonic() - self.t0))
