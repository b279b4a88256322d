"""Test helpers: start a backend as a real process, talk to it over loopback.

The launcher, the client and ``wait_until`` are the reliability package's, so the
tests and ``conclab check`` start and talk to servers with the same code.
"""
from __future__ import annotations

from conclab.reliability.live import Client, LiveServer, wait_until  # noqa: F401  (re-exported for the tests)

# Every test that takes a ``variant`` runs once per entry: (id, backend, extra options).
# The connection-dispatch pool gets 32 workers so the suite's 30 simultaneous clients fit;
# its head-of-line blocking with fewer workers has a test of its own (test_threadpool.py).
VARIANTS = [
    ("threads", "threads", []),
    ("threadpool", "threadpool", ["--workers", "32"]),
    ("threadpool-request", "threadpool", ["--dispatch", "request"]),
    ("asyncio", "asyncio", []),
    ("uvloop", "uvloop", []),
    ("gevent", "gevent", []),
    ("epoll", "epoll", []),
    ("go", "go", []),
]


class Server(LiveServer):
    """``python -m servers BACKEND OPTIONS...`` in a subprocess: ``conclab check``'s launcher, options as arguments."""

    def __init__(self, backend: str, *options: str) -> None:
        super().__init__(backend, options)
