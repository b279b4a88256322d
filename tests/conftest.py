"""Fixtures: every backend test runs once per backend variant over real loopback sockets."""
from __future__ import annotations

import pytest

from conclab.servers import unavailable_reason
from lab import VARIANTS, Server


def pytest_generate_tests(metafunc):
    if "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS], indirect=True, scope="module")


@pytest.fixture(scope="module")
def variant(request):
    name, backend, options = request.param
    reason = unavailable_reason(backend)
    if reason:
        pytest.skip(f"{backend}: {reason}")
    return backend, options


@pytest.fixture
def start(variant):
    """start(*options) -> a running Server of this variant; all are stopped after the test."""
    backend, base_options = variant
    servers = []

    def _start(*options):
        server = Server(backend, *base_options, *options)
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def shared_server(variant):
    """One default server per variant for the tests that do not count or stop it."""
    backend, options = variant
    server = Server(backend, *options)
    yield server
    server.close()
