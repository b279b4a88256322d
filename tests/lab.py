"""Test helpers: start a backend as a real process, talk to it over loopback.

The client and ``wait_until`` are the reliability package's, so the tests and
``conclab check`` talk to servers with the same code.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys

from reliability.live import Client, wait_until  # noqa: F401  (re-exported for the tests)

START_TIMEOUT = 60.0      # the go backend compiles itself on first use

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


class Server:
    """``python -m servers BACKEND`` in a subprocess, stopped with SIGTERM."""

    def __init__(self, backend: str, *options: str) -> None:
        self.backend = backend
        cmd = [sys.executable, "-m", "servers", backend, "--port", "0", *options]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self._readline(START_TIMEOUT)
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"{backend} did not start: {line!r} {self.proc.stderr.read()}")
        host, port = line.split()[-1].rsplit(":", 1)
        self.address = (host.strip("[]"), int(port))
        self.pid = self.proc.pid

    def _readline(self, timeout: float) -> str:
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return ""
        return self.proc.stdout.readline()

    def connect(self) -> "Client":
        return Client(self.address)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> tuple[int, dict | None]:
        """Signal the server, wait for it; return (exit status, final JSON line or None)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        lines = [line for line in out.splitlines() if line.startswith("{")]
        return self.proc.returncode, (json.loads(lines[-1]) if lines else None)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()
