"""Fixtures: every backend test runs once per backend variant over real loopback sockets.

The variants are the lab's table (conclab.servers.VARIANTS); the servers are the
launcher's ``ServerProcess``, the one ``conclab check`` and the harness use.

``live`` tests start processes (servers, load generators, Go builds, notebook
kernels); ``slow`` ones take seconds (a live scenario, or a whole run or report
drawn in-process); every other test is ``unit`` and may not start any process:
``pytest -m unit`` answers in seconds. A test that takes a backend
variant is live by construction; a unit test that tries to start a process
fails at once with a message saying to mark it live.
"""
from __future__ import annotations

import importlib.util
import subprocess
import time
import sys
from pathlib import Path

import pytest

LIVE_FIXTURES = {"variant", "start", "shared_server", "throughput_rounds"}
# Module fixtures that run the harness or draw a whole report in-process: seconds each, so their
# tests are ``slow`` (no process, but not the seconds-long unit loop either).
HEAVY_FIXTURES = {"tiny_run", "tiny", "built", "degraded", "invalid_pool"}

from conclab.servers import VARIANTS as LAB_VARIANTS
from conclab.servers.launcher import ServerProcess

# Test setup on top of the table's options: the connection-dispatch pool gets 32 workers so the
# suite's 30 simultaneous clients fit; its head-of-line blocking with fewer workers has a test of
# its own (test_threadpool.py).
TEST_OPTIONS = {"threadpool": ("--workers", "32")}

# Every test that takes a ``variant`` runs once per entry: (id, backend, options).
VARIANTS = [(v.name, v.backend, [*v.options, *TEST_OPTIONS.get(v.name, ())]) for v in LAB_VARIANTS.values()]


def pytest_collection_modifyitems(items):
    """Each test is live (marked, or using a server fixture), slow, or unit: what -m selects on."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if LIVE_FIXTURES & fixtures:
            item.add_marker(pytest.mark.live)
        if HEAVY_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("live") is None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request, monkeypatch):
    """A unit test that starts a process is a live test in disguise: fail it, naming the fix."""
    if request.node.get_closest_marker("unit") is None:
        return

    def refuse(self, args, *rest, **kwargs):
        raise AssertionError(f"a unit test started a process ({args!r}): mark the test @pytest.mark.live")
    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)


def pytest_generate_tests(metafunc):
    """Every variant; a module that sets ``PYTHON_VARIANTS_ONLY = True`` gets the Python ones (options go refuses)."""
    if "variant" in metafunc.fixturenames:
        python_only = getattr(metafunc.module, "PYTHON_VARIANTS_ONLY", False)
        chosen = [v for v in VARIANTS if not python_only or LAB_VARIANTS[v[0]].is_python]
        metafunc.parametrize("variant", chosen, ids=[v[0] for v in chosen], indirect=True, scope="module")


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


FULL_VS_MINIMAL = Path(__file__).resolve().parent.parent / "benchmarks" / "full_vs_minimal.py"


@pytest.fixture(scope="module")
def bench():
    """benchmarks/full_vs_minimal.py imported as a module (a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("full_vs_minimal", FULL_VS_MINIMAL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module              # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, request):
    """``conclab run NAMES --profile tiny --backends BACKENDS`` of the test module (its constants) into a fresh
    results directory, once per module: (exit code, run dir, seconds)."""
    from conclab.experiments.harness import cli as harness_cli
    module = request.module
    results = tmp_path_factory.mktemp("results")
    started = time.monotonic()
    code = harness_cli.main([",".join(module.NAMES), "--profile", "tiny", "--backends", module.BACKENDS,
                             "--results", str(results), "--run-id", module.RUN_ID])
    return code, results / module.RUN_ID, time.monotonic() - started


@pytest.fixture(scope="session")
def throughput_rounds(tmp_path_factory):
    """``conclab run throughput --profile tiny --repeat 2 --backends threads,asyncio``, once for the session (its
    rounds and its calibration are checked in different modules): (exit code, run dir)."""
    from conclab.experiments.harness import cli as harness_cli
    results = tmp_path_factory.mktemp("rounds")
    code = harness_cli.main(["throughput", "--profile", "tiny", "--repeat", "2", "--backends", "threads,asyncio",
                             "--results", str(results), "--run-id", "rounds"])
    return code, results / "rounds"
