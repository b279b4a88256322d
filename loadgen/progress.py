"""A one-line progress bar with the live request rate, on stderr, only when it is a terminal."""
from __future__ import annotations

import sys
import time

REFRESH_S = 0.25          # redraw at most this often
RATE_WINDOW_S = 0.5       # the rate shown is over at least this long (counters move in 0.1 s ticks)
BAR_WIDTH = 24


class Progress:
    """``update(elapsed, count)`` redraws; ``close()`` erases the line. Silent when not enabled.

    ``unit`` "req/s" or "conn/s" shows the rate of ``count``; "held" shows ``count`` itself.
    """

    def __init__(self, enabled: bool, total_s: float, unit: str = "req/s", stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.total_s = max(total_s, 1e-9)
        self.unit = unit
        self.last = (0.0, 0)
        self.rate = 0.0
        self.drawn_at = 0.0
        self.width = 0

    @staticmethod
    def wanted(stream=None) -> bool:
        stream = stream or sys.stderr
        return hasattr(stream, "isatty") and stream.isatty()

    def update(self, elapsed: float, count: int) -> None:
        if not self.enabled or time.monotonic() - self.drawn_at < REFRESH_S:
            return
        last_elapsed, last_count = self.last
        span = elapsed - last_elapsed
        if span >= RATE_WINDOW_S:
            self.rate = max(count - last_count, 0) / span
            self.last = (elapsed, count)
        rate = self.rate
        self.drawn_at = time.monotonic()
        filled = int(BAR_WIDTH * min(elapsed / self.total_s, 1.0))
        shown = f"{count:>10,} {self.unit}" if self.unit == "held" else f"{rate:>10,.0f} {self.unit}  {count:,} total"
        line = f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {elapsed:5.1f}/{self.total_s:.1f} s {shown}"
        self.width = max(self.width, len(line))
        self.stream.write(line.ljust(self.width))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
