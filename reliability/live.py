"""A live server and the probes the scenarios measure it with (no test framework in here).

``LiveServer`` starts ``python -m servers BACKEND --port 0 ...`` (optionally
under a low RLIMIT_NOFILE) and reads what the kernel says about it: open fds,
RSS, CPU time, CLOSE_WAIT sockets. ``Client`` is a blocking framed-protocol
client. Everything here is bounded in time: every wait has a deadline.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import psutil

from conclab.servers import protocol
from conclab.servers.protocol import FrameDecoder

LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
START_TIMEOUT = 60.0        # the go backend compiles itself on first use
IO_TIMEOUT = 10.0
STOP_TIMEOUT = 20.0

# The variants `conclab check` knows, with the options the test suite gives them
# (tests/lab.py VARIANTS): the connection-dispatch pool gets 32 workers.
VARIANTS = {
    "threads": ("threads", []),
    "threadpool": ("threadpool", ["--workers", "32"]),
    "threadpool-request": ("threadpool", ["--dispatch", "request"]),
    "asyncio": ("asyncio", []),
    "uvloop": ("uvloop", []),
    "gevent": ("gevent", []),
    "epoll": ("epoll", []),
    "go": ("go", []),
}


def variant_name(backend: str, options) -> str:
    """The variant id of (backend, options): threadpool with --dispatch request is its own."""
    options = list(options)
    if backend == "threadpool" and "--dispatch" in options and options[options.index("--dispatch") + 1] == "request":
        return "threadpool-request"
    return backend


class StartFailed(RuntimeError):
    pass


class LiveServer:
    """One backend in a subprocess. stderr goes to a file (a pipe nobody reads could fill and block it)."""

    def __init__(self, backend: str, options=(), *extra: str, nofile: int | None = None) -> None:
        self.backend = backend
        if backend == "go" and nofile is not None:
            from conclab.servers.golang import build
            build()                                    # compile here, not under the server's low fd limit
        cmd = [sys.executable, "-m", "conclab.servers", backend, "--port", "0", *options, *extra]
        self.stderr = tempfile.TemporaryFile(mode="w+")
        def in_child():
            LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)   # never outlive the checker, even a SIGKILLed one
            if nofile is not None:                     # soft = hard: Go would raise a soft limit to the hard one
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True, preexec_fn=in_child)
        self.pid = self.proc.pid
        self.stopped_in: float | None = None           # seconds from the signal to the exit
        line = self._readline(START_TIMEOUT)
        if not line.startswith("listening on "):
            self.close()
            raise StartFailed(f"{backend} did not start: {line!r} {self.errors()[-500:]}")
        host, port = line.split()[-1].rsplit(":", 1)
        self.address = (host.strip("[]"), int(port))
        self.process = psutil.Process(self.pid)

    def _readline(self, timeout: float) -> str:
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return ""
        return self.proc.stdout.readline()

    # -- what the kernel says about it ---------------------------------------------------------
    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss(self) -> int:
        return self.process.memory_info().rss

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def cpu_percent(self, window: float) -> float:
        """The server's CPU use over the next ``window`` seconds, % of one core (every thread)."""
        cpu0, t0 = self.cpu_seconds(), time.monotonic()
        time.sleep(window)
        return 100.0 * (self.cpu_seconds() - cpu0) / (time.monotonic() - t0)

    def close_wait(self) -> int:
        """Server sockets in CLOSE_WAIT: the peer closed, the server did not."""
        return sum(1 for c in self.process.net_connections(kind="tcp")
                   if c.status == psutil.CONN_CLOSE_WAIT and c.laddr and c.laddr.port == self.address[1])

    def errors(self) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read()

    def alive(self) -> bool:
        return self.proc.poll() is None

    # -- talking to it -------------------------------------------------------------------------
    def connect(self, timeout: float = IO_TIMEOUT) -> "Client":
        return Client(self.address, timeout)

    def stats(self) -> dict:
        with self.connect() as client:
            return client.stats()

    # -- stopping it ---------------------------------------------------------------------------
    def stop(self, sig=signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> tuple[int | None, dict | None]:
        """Signal, wait; (exit status, final JSON line or None). ``stopped_in`` is the time it took."""
        began = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return None, None
        self.stopped_in = time.monotonic() - began
        lines = [line for line in out.splitlines() if line.startswith("{")]
        return self.proc.returncode, (json.loads(lines[-1]) if lines else None)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.communicate(timeout=STOP_TIMEOUT)
        self.stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Client:
    """A blocking framed-protocol client (the one the tests use too)."""

    def __init__(self, address, timeout: float = IO_TIMEOUT) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.decoder = FrameDecoder(max_frame=2**32 - 1)
        self.frames: list = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frame(self) -> tuple[int, bytes]:
        while not self.frames:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("closed by the server")
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    def send_frame(self, op: int, payload: bytes = b"") -> None:
        self.sock.sendall(protocol.encode(op, payload))

    def request(self, op: int, payload: bytes = b"") -> tuple[int, bytes]:
        self.send_frame(op, payload)
        return self.recv_frame()

    def stats(self) -> dict:
        op, payload = self.request(protocol.STATS)
        if op != protocol.STATS:
            raise ConnectionError(f"STATS answered with op {op:#x}: {payload[:80]!r}")
        return json.loads(payload)

    def ending(self, timeout: float) -> str:
        """Read until the server closes: 'eof', 'reset' or 'open' (still open after ``timeout``)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    return "eof"
                self.frames.extend(self.decoder.feed(data))
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        except TimeoutError:
            return "open"
        except protocol.ProtocolError:
            return "garbage"

    def closed_by_server(self) -> bool:
        """True if the server closed (EOF or reset) with no more data before the timeout."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0), not FIN."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

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
    return bool(predicate())


def mib(nbytes: float) -> float:
    return nbytes / (1 << 20)
