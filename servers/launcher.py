"""One backend as a pinned subprocess: ``python -m servers BACKEND --port 0 ...``.

The server is ready when its stdout says ``listening on HOST:PORT`` (DESIGN.md
section 5). Its stdout and stderr go to files under the run's raw/logs/, so no
pipe can fill up and a start failure can be explained with the server's own last
words. ``stop`` is SIGTERM (the graceful drain), then SIGKILL after a grace period.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

from conclab.servers import protocol
from conclab.servers.protocol import FrameDecoder

from . import processes

START_TIMEOUT_S = 120.0      # the go backend compiles itself on first use
START_POLL_S = 0.02
STATS_TIMEOUT_S = 2.0
READY_PREFIX = "listening on "


class ServerStartError(Exception):
    """The backend did not come up; the message is one line (the server's own reason if it gave one)."""


class ServerProcess:
    def __init__(self, backend: str, options, cpus, log_stem: str) -> None:
        self.backend = backend
        self.cpus = list(cpus) if cpus else None
        self.args = [sys.executable, "-m", "conclab.servers", backend, "--port", "0", *options]
        self.out_path, self.err_path = log_stem + ".out", log_stem + ".err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = processes.spawn(self.args, stdout=out, stderr=err, cpus=self.cpus, die_with_parent=True)
        self.pid = self.proc.pid
        self.final: dict | None = None
        self.sampler = None                   # set by Run.serve
        try:
            self.host, self.port = self._wait_ready()
        except BaseException:
            processes.stop(self.proc, signal.SIGKILL, 1.0)
            raise
        if self.cpus:
            processes.pin_all_tasks(self.pid, self.cpus)

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _wait_ready(self) -> tuple[str, int]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self._first_line()
            if line.startswith(READY_PREFIX):
                host, port = line[len(READY_PREFIX):].strip().rsplit(":", 1)
                return host.strip("[]"), int(port)
            if self.proc.poll() is not None:
                raise ServerStartError(f"exited with status {self.proc.returncode}: {self.last_words()}")
            time.sleep(START_POLL_S)
        raise ServerStartError(f"not listening after {START_TIMEOUT_S:g} s: {self.last_words()}")

    def _first_line(self) -> str:
        with open(self.out_path, "rb") as out:
            line = out.readline()
        return line.decode("utf-8", "replace") if line.endswith(b"\n") else ""

    def last_words(self) -> str:
        """The server's last non-empty stderr line (a traceback's last line names the error)."""
        try:
            with open(self.err_path, "rb") as err:
                lines = [line.strip() for line in err.read().decode("utf-8", "replace").splitlines() if line.strip()]
        except OSError:
            lines = []
        return lines[-1] if lines else "no message on stderr"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stats(self) -> dict | None:
        """The server's STATS counters over a fresh connection, or None if it does not answer in time."""
        try:
            with socket.create_connection((self.host, self.port), timeout=STATS_TIMEOUT_S) as sock:
                sock.sendall(protocol.encode(protocol.STATS, b""))
                decoder = FrameDecoder(max_frame=2**32 - 1)
                while True:
                    data = sock.recv(65536)
                    if not data:
                        return None
                    for op, payload in decoder.feed(data):
                        return json.loads(payload) if op == protocol.STATS else None
        except (OSError, ValueError):
            return None

    def stop(self, grace: float = processes.STOP_GRACE_S) -> int | None:
        """SIGTERM (graceful drain), SIGKILL after ``grace`` seconds; keeps the final JSON line."""
        status = processes.stop(self.proc, signal.SIGTERM, grace)
        try:
            with open(self.out_path, "rb") as out:
                lines = [line for line in out.read().decode("utf-8", "replace").splitlines() if line.startswith("{")]
            self.final = json.loads(lines[-1]) if lines else None
        except (OSError, ValueError):
            self.final = None
        return status


def log_stem(raw_dir: str, *parts) -> str:
    """raw/logs/<experiment>-<variant>-r<repeat>-<n>: where one server's output goes."""
    directory = os.path.join(raw_dir, "logs")
    os.makedirs(directory, exist_ok=True)
    stem = "-".join(str(p) for p in parts if p != "")
    n = 0
    while os.path.exists(os.path.join(directory, f"{stem}-{n}.out")):
        n += 1
    return os.path.join(directory, f"{stem}-{n}")
