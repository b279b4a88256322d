"""Test helpers: start a backend as a real process, talk to it over loopback."""
from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

from servers import protocol
from servers.protocol import FrameDecoder

START_TIMEOUT = 60.0      # the go backend compiles itself on first use
IO_TIMEOUT = 10.0

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


class Client:
    """A blocking framed-protocol client."""

    def __init__(self, address, timeout: float = IO_TIMEOUT) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.decoder = FrameDecoder(max_frame=2**32 - 1)
        self.frames: list = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, op: int, payload: bytes = b"") -> None:
        self.sock.sendall(protocol.encode(op, payload))

    def recv_frame(self) -> tuple[int, bytes]:
        while not self.frames:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the server")
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    def request(self, op: int, payload: bytes = b"") -> tuple[int, bytes]:
        self.send_frame(op, payload)
        return self.recv_frame()

    def stats(self) -> dict:
        op, payload = self.request(protocol.STATS)
        assert op == protocol.STATS
        return json.loads(payload)

    def closed_by_server(self) -> bool:
        """True if the server closed (EOF or reset) with no more data before the timeout."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
