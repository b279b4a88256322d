"""Fixtures: every backend test runs once per backend variant over real loopback sockets.

The variants are the lab's table (conclab.servers.VARIANTS); the servers are the
launcher's ``ServerProcess``, the one ``conclab check`` and the harness use.
"""
from __future__ import annotations

import pytest

from conclab.servers import VARIANTS as LAB_VARIANTS
from conclab.servers.launcher import ServerProcess

# Test setup on top of the table's options: the connection-dispatch pool gets 32 workers so the
# suite's 30 simultaneous clients fit; its head-of-line blocking with fewer workers has a test of
# its own (test_threadpool.py).
TEST_OPTIONS = {"threadpool": ("--workers", "32")}

# Every test that takes a ``variant`` runs once per entry: (id, backend, options).
VARIANTS = [(v.name, v.backend, [*v.options, *TEST_OPTIONS.get(v.name, ())]) for v in LAB_VARIANTS.values()]


def pytest_generate_tests(metafunc):
    if "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS], indirect=True, scope="module")


@pytest.fixture(scope="module")
def variant(request):
    name, backend, options = request.param
    reason = LAB_VARIANTS[name].unavailable()
    if reason:
        pytest.skip(f"{backend}: {reason}")
    return backend, options


@pytest.fixture
def start(variant):
    """start(*options) -> a running ServerProcess of this variant; all are closed after the test."""
    backend, base_options = variant
    servers = []

    def _start(*options):
        server = ServerProcess(backend, [*base_options, *options])
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def shared_server(variant):
    """One default server per variant for the tests that do not count or stop it."""
    backend, options = variant
    with ServerProcess(backend, options) as server:
        yield server
