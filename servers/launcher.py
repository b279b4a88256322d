"""One server process for every caller: the experiments harness, ``conclab check``, the benchmarks, the tests.

``ServerProcess(backend, options)`` runs ``python -m conclab.servers BACKEND
--port 0 OPTIONS``; ``ServerProcess.command(argv)`` runs any other program that
keeps the same start-up contract (the minimal servers in benchmarks/minimal/).
The contract is docs/protocol.md sections 4 and 5: ``listening on HOST:PORT``
on stdout once it accepts, errors as one line on stderr, and after SIGTERM a
drain and one final JSON line on stdout.

How it is built:

* It starts through ``processes.spawn``: pinned to ``cpus`` if given (every
  thread of it once it is up), registered so ``processes.stop_all`` ends it
  whatever happens to the caller, and sent SIGTERM if the caller dies.
  ``nofile`` runs it under RLIMIT_NOFILE soft = hard (the fd-exhaustion
  scenario); the go backend is compiled first then, not under that limit.
* stdout and stderr go to files, never pipes: nobody has to read them while it
  runs, so no pipe fills up and blocks the server, and a failure can be
  explained afterwards in the server's own words. With ``log_stem`` they are
  ``<log_stem>.out`` / ``.err`` and stay (the harness keeps them in a run's
  raw/logs/); without, they live in a private temporary directory that
  ``close()`` removes.
* Ready means the ready line is in the stdout file. It is polled with a
  deadline (the go backend compiles itself on first use); exiting first, or the
  deadline, raises ``ServerStartError`` whose message is one line ending with
  the server's last stderr line.
* What the kernel says about it (fds, RSS, CPU time, CLOSE_WAIT sockets) comes
  from /proc and psutil, for the process it started (with ``--procs N``, the
  parent; ``worker_pids()`` names its workers); what the server says, from STATS over a fresh
  ``Client`` (the lab's one STATS client) or from /metrics.
* ``stop()`` signals (SIGTERM: the graceful drain), waits ``grace`` seconds,
  then SIGKILLs; it returns the exit status and the final JSON line, and sets
  ``stopped_in`` when the server exited on its own. ``close()`` kills whatever
  is still running and is always safe; the context manager calls it.

``wait_until`` and ``free_port`` are here too: the one bounded poll and the one
free-port finder of the lab.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import psutil

from . import processes
from .client import IO_TIMEOUT_S, Client
from .protocol import ProtocolError

START_TIMEOUT_S = 120.0      # the go backend compiles itself on first use
START_POLL_S = 0.02
STATS_TIMEOUT_S = 2.0        # try_stats: the harness asks between points and retries, it does not wait long
KILL_WAIT_S = 5.0            # after SIGKILL, how long the kernel may take to reap it
READY_PREFIX = "listening on "


class ServerStartError(Exception):
    """The server did not come up; the message is one line, ending with the server's own last words."""


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` every ``interval`` seconds until it is true or ``timeout`` has passed; its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's choice; another process may still take it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A lab server in a subprocess, up and listening once constructed (or ``ServerStartError``)."""

    def __init__(self, backend: str, options=(), *, cpus=None, nofile: int | None = None,
                 log_stem: str | None = None) -> None:
        if backend == "go" and nofile is not None:
            from .base import StartupError
            from .golang import build
            try:
                build()                  # compile here, not under the server's low fd limit
            except StartupError as exc:
                raise ServerStartError(f"go did not build: {exc}") from None
        argv = [sys.executable, "-m", "conclab.servers", backend, "--port", "0", *options]
        self._start(backend, argv, cpus, nofile, log_stem)

    @classmethod
    def command(cls, argv, *, name: str | None = None, cpus=None, nofile: int | None = None,
                log_stem: str | None = None) -> "ServerProcess":
        """Any program that prints the ready line (a minimal server, a binary): ``argv`` as given."""
        server = cls.__new__(cls)
        server._start(name or os.path.basename(str(argv[0])), [str(a) for a in argv], cpus, nofile, log_stem)
        return server

    def _start(self, name: str, argv: list, cpus, nofile, log_stem) -> None:
        self.backend = name
        self.args = argv
        self.cpus = list(cpus) if cpus else None
        self.final: dict | None = None
        self.stopped_in: float | None = None          # seconds from stop()'s signal to the exit
        self._tmpdir = None
        if log_stem is None:
            self._tmpdir = tempfile.mkdtemp(prefix="conclab-server-")
            log_stem = os.path.join(self._tmpdir, "server")
        self.out_path, self.err_path = log_stem + ".out", log_stem + ".err"
        try:
            with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
                self.proc = processes.spawn(argv, stdout=out, stderr=err, cpus=self.cpus, nofile=nofile,
                                            die_with_parent=True)
        except BaseException:
            self._remove_tmpdir()
            raise
        self.pid = self.proc.pid
        try:
            self.host, self.port = self._wait_ready(START_TIMEOUT_S)
            self.process = psutil.Process(self.pid)
        except BaseException:
            self.close()
            raise
        if self.cpus:
            processes.pin_all_tasks(self.pid, self.cpus)

    # -- starting --------------------------------------------------------------------------------

    def _wait_ready(self, timeout: float) -> tuple[str, int]:
        wait_until(lambda: self._ready_line() is not None or not self.alive(), timeout, START_POLL_S)
        line = self._ready_line()
        if line is not None:
            host, port = line[len(READY_PREFIX):].strip().rsplit(":", 1)
            return host.strip("[]"), int(port)
        if not self.alive():
            raise ServerStartError(f"{self.backend} exited with status {self.proc.returncode}: {self.last_words()}")
        raise ServerStartError(f"{self.backend} not listening after {timeout:g} s: {self.last_words()}")

    def _ready_line(self) -> str | None:
        """The ready line, once it is complete in the stdout file."""
        for line in self._stdout_lines():
            if line.startswith(READY_PREFIX):
                return line
        return None

    def _stdout_lines(self) -> list[str]:
        """stdout's complete lines (a line still being written is left out)."""
        try:
            with open(self.out_path, "rb") as out:
                text = out.read().decode("utf-8", "replace")
        except OSError:
            return []
        return text.split("\n")[:-1]

    # -- where it is -----------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def target(self) -> str:
        """HOST:PORT as the load generator takes it (an IPv6 host in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    # -- what the kernel says about it -----------------------------------------------------------

    def alive(self) -> bool:
        return self.proc.poll() is None

    def worker_pids(self) -> list[int]:
        """The server's worker processes (``--procs N`` over 1), else []."""
        with contextlib.suppress(psutil.Error):
            return [child.pid for child in self.process.children()]
        return []

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss(self) -> int:
        return self.process.memory_info().rss

    def cpu_seconds(self) -> float:
        """User + system CPU time of every thread so far."""
        times = self.process.cpu_times()
        return times.user + times.system

    def cpu_percent(self, window: float) -> float:
        """The server's CPU use over the next ``window`` seconds, % of one core (every thread)."""
        cpu0, t0 = self.cpu_seconds(), time.monotonic()
        time.sleep(window)
        return 100.0 * (self.cpu_seconds() - cpu0) / (time.monotonic() - t0)

    def close_wait(self) -> int:
        """Server sockets on its port in CLOSE_WAIT: the peer closed, the server did not."""
        return sum(1 for c in self.process.net_connections(kind="tcp")
                   if c.status == psutil.CONN_CLOSE_WAIT and c.laddr and c.laddr.port == self.port)

    # -- what it says ----------------------------------------------------------------------------

    def errors(self) -> str:
        """Everything on its stderr so far."""
        try:
            with open(self.err_path, "rb") as err:
                return err.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def last_words(self) -> str:
        """The last non-empty stderr line (a traceback's last line names the error)."""
        lines = [line.strip() for line in self.errors().splitlines() if line.strip()]
        return lines[-1] if lines else "no message on stderr"

    def connect(self, timeout: float = IO_TIMEOUT_S) -> Client:
        return Client(self.address, timeout)

    def stats(self, timeout: float = IO_TIMEOUT_S) -> dict:
        """The STATS counters over a fresh connection (which counts in them). Raises OSError or ValueError."""
        with self.connect(timeout) as client:
            return client.stats()

    def try_stats(self, timeout: float = STATS_TIMEOUT_S) -> dict | None:
        """``stats()``, or None if it does not answer in time or answers nonsense (the harness retries)."""
        try:
            return self.stats(timeout)
        except (OSError, ValueError, ProtocolError):
            return None

    def metrics(self, timeout: float = IO_TIMEOUT_S) -> str:
        """The text of /metrics; only for a server started with ``--metrics-port P`` (P not 0)."""
        port = self.metrics_port
        if not port:
            raise ValueError("started without --metrics-port (or with port 0, which it does not report)")
        host = f"[{self.host}]" if ":" in self.host else self.host
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as response:
            return response.read().decode("utf-8")

    @property
    def metrics_port(self) -> int | None:
        for i, arg in enumerate(self.args):
            if arg == "--metrics-port" and i + 1 < len(self.args):
                return int(self.args[i + 1])
            if arg.startswith("--metrics-port="):
                return int(arg.split("=", 1)[1])
        return None

    # -- stopping it -----------------------------------------------------------------------------

    def stop(self, sig=signal.SIGTERM, grace: float = processes.STOP_GRACE_S) -> tuple[int | None, dict | None]:
        """Signal, wait up to ``grace`` s, SIGKILL if still there: (exit status, final JSON line or None).

        Sets ``final`` and ``stopped_in`` (None if it had to be killed). Stopping a
        stopped server changes nothing and returns the same.
        """
        if self.proc.poll() is None:
            began = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(grace)
                self.stopped_in = time.monotonic() - began
            except subprocess.TimeoutExpired:
                pass
        status = processes.stop(self.proc, signal.SIGKILL, KILL_WAIT_S)     # kills a straggler; unregisters
        self.final = self._final_line()
        return status, self.final

    def _final_line(self) -> dict | None:
        lines = [line for line in self._stdout_lines() if line.startswith("{")]
        try:
            return json.loads(lines[-1]) if lines else None
        except ValueError:
            return None

    def close(self) -> None:
        """Kill it if it still runs, and remove its private log directory (if it has one)."""
        processes.stop(self.proc, signal.SIGKILL, KILL_WAIT_S)        # an exited one is only unregistered
        self._remove_tmpdir()

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        where = self.target if hasattr(self, "port") else "starting"
        return f"<ServerProcess {self.backend} pid {getattr(self, 'pid', None)} {where}>"


def log_stem(raw_dir: str, *parts) -> str:
    """raw/logs/<experiment>-<variant>-r<repeat>-<n>: where one server's output goes."""
    directory = os.path.join(raw_dir, "logs")
    os.makedirs(directory, exist_ok=True)
    stem = "-".join(str(p) for p in parts if p != "")
    n = 0
    while os.path.exists(os.path.join(directory, f"{stem}-{n}.out")):
        n += 1
    return os.path.join(directory, f"{stem}-{n}")
