"""A redis-server the lab starts itself: the shared rate limit's store, on a free loopback port.

The Redis store of the rate limit (docs/ratelimit.md) needs a Redis to talk to;
the experiments (``redis_call``), the reliability scenario (``redis_outage``) and
the tests start their own with ``RedisProcess``, never a system one:

* Debian's ``redis-server`` binary (``scripts/setup.sh`` installs it), bound to
  127.0.0.1 on a port nobody listens on, with ``--save '' --appendonly no`` and
  its working directory a private temporary one: nothing is kept on disk, and
  a restart starts empty (as a crash of a cache would).
* Started through ``processes.spawn``, so it is pinned to ``cpus`` when given,
  registered for ``processes.stop_all`` and dies with its parent, like a lab server.
  Ready means PING answers (a deadline, ``START_TIMEOUT_S``).
* ``stop()`` kills it (SIGKILL: a crash, no goodbye to its clients) and
  ``start()`` brings it back **on the same port**, so a server that was given
  its URL sees an outage and then a Redis again, with an empty script cache.
* ``cpu_seconds()`` is its own user + system CPU (``/proc/PID/stat``): what a
  request's Redis round trip costs Redis, beside what it costs the server.
* ``call()`` sends one command with the lab's own RESP codec (servers/redis_bucket.py).

A missing binary is one line (``RedisMissing``) naming scripts/setup.sh.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from typing import Self

from . import processes
from .launcher import free_port, wait_until
from .redis_bucket import RespReader, command

BINARY = "redis-server"
START_TIMEOUT_S = 10.0
PING_INTERVAL_S = 0.02
CALL_TIMEOUT_S = 5.0
KILL_WAIT_S = 10.0
HOST = "127.0.0.1"
MISSING = "redis-server is not installed: run scripts/setup.sh (as root) to install it"


class RedisMissing(RuntimeError):
    """No ``redis-server`` binary on PATH (the message says how to get one)."""


class RedisStartError(RuntimeError):
    """redis-server did not answer PING in time."""


def find_binary() -> str:
    """The path of ``redis-server``, or RedisMissing."""
    binary = shutil.which(BINARY)
    if binary is None:
        raise RedisMissing(MISSING)
    return binary


class RedisProcess:
    """One redis-server on 127.0.0.1:``port`` that survives ``stop``/``start``; ``close`` ends it for good."""

    def __init__(self, *, cpus=None, binary: str | None = None, directory: str | None = None) -> None:
        self.binary = binary or find_binary()
        self.cpus = list(cpus) if cpus else None
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="conclab-redis-")
        self.port = free_port(HOST)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """What ``--rate-limit-store`` takes."""
        return f"redis://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def argv(self) -> list:
        return [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
                "--dir", self.directory, "--daemonize", "no", "--loglevel", "warning"]

    def start(self) -> Self:
        """Start it (again, on the same port) and wait until PING answers; RedisStartError if it does not."""
        if self.process is not None:
            return self
        self.process = processes.spawn(self.argv(), cpus=self.cpus, die_with_parent=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until(lambda: self.answers() or not self.alive(), START_TIMEOUT_S, PING_INTERVAL_S) \
                or not self.answers():
            self.stop()
            raise RedisStartError(f"redis-server on port {self.port} did not answer PING within {START_TIMEOUT_S:g} s")
        return self

    def stop(self) -> None:
        """Kill it (SIGKILL: like a crash) and reap it; the port and directory stay for ``start``."""
        if self.process is not None:
            processes.stop(self.process, signal.SIGKILL, KILL_WAIT_S)
            self.process = None

    def close(self) -> None:
        """Stop it and remove its directory (if it made it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def answers(self) -> bool:
        try:
            return self.call("PING") == "PONG"
        except OSError:
            return False

    def call(self, *args, db: int = 0):
        """One command in database ``db``, its reply (Redis errors come back as RespError values)."""
        with socket.create_connection((HOST, self.port), timeout=CALL_TIMEOUT_S) as sock:
            sock.sendall(command("SELECT", db) + command(*args))
            reader, replies = RespReader(), []
            while len(replies) < 2:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("redis closed the connection")
                replies += reader.feed(data)
            return replies[1]

    def cpu_seconds(self) -> float | None:
        """Its user + system CPU so far (/proc/PID/stat), or None when it is not running."""
        return proc_cpu_seconds(self.pid) if self.alive() else None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RedisProcess pid {self.pid} {self.url}>"


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` in seconds (/proc/PID/stat fields 14 and 15), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()         # after "(comm)": state is fields[0], utime fields[11]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
