"""The counters behind STATS, the metrics endpoint and the final shutdown line.

One ``Stats`` per server process. Threaded backends update it from many
threads, so every update takes a lock; it is uncontended in the event-loop
backends and cheap there (docs/performance.md), and the hot path updates it
once per read, not once per frame.
"""
from __future__ import annotations

import os
import threading

COUNTERS = ("connections_active", "connections_total", "connections_rejected", "requests_total",
            "bytes_in", "bytes_out", "idle_timeouts", "frame_timeouts", "protocol_errors", "rate_limited")


class Stats:
    def __init__(self, backend: str, max_conns: int) -> None:
        self.backend = backend
        self.max_conns = max_conns
        self.lock = threading.Lock()
        self.aborted = 0      # connections cut at the drain deadline (reported on the final line)
        for name in COUNTERS:
            setattr(self, name, 0)

    def try_open(self) -> bool:
        """Admit one more connection unless the cap is reached (then count it rejected)."""
        with self.lock:
            if self.connections_active >= self.max_conns:
                self.connections_rejected += 1
                return False
            self.connections_active += 1
            self.connections_total += 1
            return True

    def closed(self) -> None:
        with self.lock:
            self.connections_active -= 1

    def record(self, requests: int, bytes_in: int, bytes_out: int) -> None:
        with self.lock:
            self.requests_total += requests
            self.bytes_in += bytes_in
            self.bytes_out += bytes_out

    def count(self, counter: str) -> None:
        with self.lock:
            setattr(self, counter, getattr(self, counter) + 1)

    def snapshot(self) -> dict:
        with self.lock:
            counters = {name: getattr(self, name) for name in COUNTERS}
        return {"backend": self.backend, "pid": os.getpid(), **counters}
