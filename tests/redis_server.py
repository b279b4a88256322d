"""A real ``redis-server`` for the tests: the lab's own ``RedisProcess`` (servers/redis_process.py).

``redis_server`` is a module fixture (import it into a test module to use it):
one server per module on a free loopback port, started with ``--save ''
--appendonly no`` in a temporary directory, ready once PING answers, killed at
the end. ``stop`` and ``start`` let a test take Redis away and bring it back on
the same port (``process`` is None while it is stopped); ``call`` sends one
command with the lab's own RESP codec; ``url`` is what ``--rate-limit-store`` takes.

If ``redis-server`` is not installed, every test using the fixture fails with
one line saying how to get it: the shared rate limit is part of the lab, so its
tests may not quietly skip.
"""
from __future__ import annotations

import pytest
from conclab.servers.redis_process import RedisMissing, RedisProcess

RedisServer = RedisProcess          # the name the tests knew it by


@pytest.fixture(scope="module")
def redis_server():
    """A running RedisProcess for the module; killed (and its directory removed) at the end."""
    try:
        server = RedisProcess()
    except RedisMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server.start()
    finally:
        server.close()
