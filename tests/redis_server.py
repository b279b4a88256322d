"""A real ``redis-server`` for the tests: Debian's binary on a free loopback port, nothing kept on disk.

``redis_server`` is a module fixture (import it into a test module to use it):
one server per module, started with ``--save '' --appendonly no`` in a temporary
directory, ready once PING answers, killed at the end. ``RedisServer.stop`` and
``start`` let a test take Redis away and bring it back on the same port;
``call`` sends one command with the lab's own RESP codec.

If ``redis-server`` is not installed, every test using the fixture fails with
one line saying how to get it: the shared rate limit is part of the lab, so its
tests may not quietly skip.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile

import pytest

from conclab.servers.launcher import free_port, wait_until
from conclab.servers.redis_bucket import RespReader, command

START_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 5.0


class RedisServer:
    """One redis-server process on 127.0.0.1:``port``, which survives ``stop``/``start``."""

    def __init__(self, binary: str, directory: str) -> None:
        self.binary, self.directory = binary, directory
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.directory, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until(self.answers, START_TIMEOUT_S, 0.02):
            self.stop()
            raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        """Kill it (SIGKILL: like a crash, no goodbye to the clients) and reap it."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def answers(self) -> bool:
        try:
            return self.call("PING") == "PONG"
        except OSError:
            return False

    def call(self, *args, db: int = 0):
        """One command in database ``db``, its reply (errors come back as RespError values)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=CALL_TIMEOUT_S) as sock:
            sock.sendall(command("SELECT", db) + command(*args))
            reader, replies = RespReader(), []
            while len(replies) < 2:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("redis closed the connection")
                replies += reader.feed(data)
            return replies[1]


@pytest.fixture(scope="module")
def redis_server():
    """A running RedisServer for the module; killed at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run scripts/setup.sh (as root) to install it", pytrace=False)
    with tempfile.TemporaryDirectory(prefix="conclab-redis-") as directory:
        server = RedisServer(binary, directory)
        server.start()
        try:
            yield server
        finally:
            server.stop()
