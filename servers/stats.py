"""The counters behind STATS, the metrics endpoint and the final shutdown line.

One ``Stats`` per server process. Threaded backends update it from many
threads, so every update takes a lock. The backends in ``ONE_WRITER`` update
it from one thread only (an event loop, or gevent's hub, where no greenlet
switch can happen inside an update), so their per-read ``record`` skips
the lock: taking it was half of the cost of counting a
request there. Readers from other threads (the metrics endpoint) still take
the lock, and see each counter whole. Connection counts (``try_open``,
``closed``, ``count``) always lock: they are per connection, not per request.
The hot path updates the counters once per read, not once per frame.

``buffered_bytes`` is a gauge, not a counter: the bytes of the buffer budget
(``--max-buffered``) the sessions hold now. Sessions change it under the lock,
in every backend (servers/session.py: once per frame that does not arrive
whole in one read, never on the hot path).

``rate_store_calls`` and ``rate_store_errors`` are the redis rate-limit store's
round trips and the requests given its on-error verdict (docs/ratelimit.md):
its client counts them (``calls``, ``failures``) and ``snapshot`` reads them
there, so a request pays no second count; with the memory store they stay 0.

``offloaded`` counts the WORK requests answered after their CPU part ran in
the process pool of ``--cpu-offload process`` (servers/offload.py).
"""
from __future__ import annotations

import os
import threading

ONE_WRITER = frozenset({"epoll", "asyncio", "uvloop", "gevent"})   # backends that count from one thread

COUNTERS = ("connections_active", "connections_total", "connections_rejected", "requests_total",
            "bytes_in", "bytes_out", "idle_timeouts", "frame_timeouts", "protocol_errors", "rate_limited",
            "buffer_rejections", "buffered_bytes", "offloaded", "rate_store_calls", "rate_store_errors")
STORE_COUNTERS = (("rate_store_calls", "calls"), ("rate_store_errors", "failures"))   # read from the store's client


class Stats:
    def __init__(self, backend: str, max_conns: int) -> None:
        self.backend = backend
        self.max_conns = max_conns
        self.lock = threading.Lock()
        self.aborted = 0      # connections cut at the drain deadline (reported on the final line)
        self.facts: dict = {}  # what this process is (procs, python, ...): shown with the counters, never summed
        self.rate_store = None  # the redis rate-limit store's client (servers/session.py: SharedLimit), if any
        for name in COUNTERS:
            setattr(self, name, 0)
        if backend in ONE_WRITER:       # bound once: the per-read counting takes no lock
            self.record = self._record_unlocked

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

    def _record_unlocked(self, requests: int, bytes_in: int, bytes_out: int) -> None:
        self.requests_total += requests
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def count(self, counter: str) -> None:
        with self.lock:
            setattr(self, counter, getattr(self, counter) + 1)

    def snapshot(self) -> dict:
        with self.lock:
            counters = {name: getattr(self, name) for name in COUNTERS}
        store = self.rate_store
        if store is not None:
            for name, count in STORE_COUNTERS:
                counters[name] = getattr(store, count)
        return {"backend": self.backend, "pid": os.getpid(), **self.facts, **counters}
