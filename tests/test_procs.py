"""The Python backends' process options: --procs N (servers/prefork.py), --switch-interval, --python.

Every test runs over the same Python variants as the conformance suite, over
real loopback sockets; go is left out (it refuses these options: tests/test_cli.py).
"""
from __future__ import annotations

import platform
import signal
import struct
import sys

import psutil
import pytest
from conclab.servers import protocol
from conclab.servers.launcher import free_port, wait_until
from conclab.servers.protocol import ECHO, ERROR, PING, PONG, WORK

pytestmark = pytest.mark.live

MAX_CONNECTIONS = 200          # connections a test may open to reach every worker (the kernel spreads by hash)
EXIT_S = 15.0                  # a drained server (or an orphaned worker) is gone well within this


PYTHON_VARIANTS_ONLY = True    # conftest parametrizes `variant` over the Python variants only


@pytest.fixture
def start_python(start):
    """``start`` (the variants here are the Python ones)."""
    return start


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody has reaped yet counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pids_answering(server, attempts: int = MAX_CONNECTIONS) -> dict[int, dict]:
    """STATS over fresh connections until every worker has answered (or ``attempts`` ran out): pid -> STATS."""
    workers = set(server.worker_pids())
    seen: dict[int, dict] = {}
    for _ in range(attempts):
        stats = server.stats()
        seen[stats["pid"]] = stats
        if set(seen) >= workers:
            break
    return seen


def test_procs_1_is_one_process(start_python):
    server = start_python("--procs", "1")
    stats = server.stats()
    assert server.worker_pids() == []
    assert stats["pid"] == server.pid and stats["procs"] == 1


def test_every_worker_serves_and_stats_names_it(start_python):
    server = start_python("--procs", "2")
    workers = server.worker_pids()
    assert len(workers) == 2 and server.pid not in workers
    with server.connect() as client:
        assert client.request(ECHO, b"hello") == (ECHO, b"hello")
    seen = pids_answering(server)
    assert set(seen) == set(workers)                  # both answered: one port, two processes
    for stats in seen.values():
        assert stats["procs"] == 2 and stats["backend"] == server.backend
        assert stats["switch_interval"] == 0.005      # CPython's default when not asked otherwise
        assert stats["python"] == platform.python_version()


def test_sigterm_drains_every_worker_and_sums_their_counters(start_python):
    server = start_python("--procs", "2", "--drain-timeout", "5")
    workers = server.worker_pids()
    clients = [server.connect() for _ in range(8)]
    try:
        for client in clients:                        # every connection accepted and served before the signal
            assert client.request(ECHO, b"x") == (ECHO, b"x")
        busy = clients[0]
        busy.send(protocol.encode_work(500_000, 0, b"finish me"))
        server.proc.send_signal(signal.SIGTERM)
        assert busy.recv_frame() == (WORK, struct.pack(">II", 500_000, 0) + b"finish me")
        status, final = server.stop(grace=EXIT_S)
    finally:
        for client in clients:
            client.close()
    assert status == 0 and final is not None
    assert final["requests_total"] == len(clients) + 1      # every ECHO and the WORK, summed over workers
    assert final["connections_total"] == len(clients)
    assert final["connections_active"] == 0 and final["workers_failed"] == 0
    assert final["pid"] == server.pid and final["procs"] == 2
    assert all(gone(pid) for pid in workers)          # no worker outlives the server


def test_workers_exit_when_the_parent_is_killed(start_python):
    server = start_python("--procs", "2", "--drain-timeout", "1")
    workers = server.worker_pids()
    assert len(workers) == 2
    server.proc.kill()                                # SIGKILL: the parent gets no say
    assert wait_until(lambda: all(gone(pid) for pid in workers), timeout=EXIT_S)


def test_a_worker_that_dies_ends_the_server_with_status_1(start_python):
    server = start_python("--procs", "2")
    victim, survivor = server.worker_pids()
    psutil.Process(victim).kill()
    assert wait_until(lambda: not server.alive(), timeout=EXIT_S)
    status, final = server.stop()
    assert status == 1
    assert final is not None and final["workers_failed"] == 1
    assert gone(survivor)
    assert f"worker {victim} exited" in server.errors()


def test_max_conns_is_split_between_workers(start_python):
    server = start_python("--procs", "2", "--max-conns", "2")     # ceil(2 / 2) = 1 per worker
    clients = [server.connect() for _ in range(20)]
    try:
        replies = [client.request(PING, b"p")[0] for client in clients]
    finally:
        for client in clients:
            client.close()
    assert replies.count(PONG) == 2 and replies.count(ERROR) == 18


def test_metrics_sum_every_worker(start_python):
    server = start_python("--procs", "2", "--metrics-port", str(free_port()))
    for _ in range(20):
        with server.connect() as client:
            client.request(ECHO, b"m")
    requests = [float(line.split()[-1]) for line in server.metrics().splitlines()
                if line.startswith("conclab_requests_total{")]
    assert requests == [20.0]
    seen = pids_answering(server)
    assert len(seen) == 2 and all(stats["requests_total"] > 1 for stats in seen.values())   # both counted ECHOs


@pytest.mark.parametrize("procs", ["1", "2"])
def test_switch_interval_is_applied(start_python, procs):
    server = start_python("--procs", procs, "--switch-interval", "0.05")
    assert server.stats()["switch_interval"] == 0.05
    status, final = server.stop()
    assert status == 0 and final["switch_interval"] == 0.05


def test_python_runs_the_server_under_that_interpreter(start_python):
    server = start_python("--python", sys.executable, "--procs", "2")
    with server.connect() as client:
        assert client.request(ECHO, b"again") == (ECHO, b"again")
    stats = server.stats()
    assert stats["procs"] == 2 and stats["python"] == platform.python_version()
    assert psutil.Process(server.pid).cmdline()[:3] == [sys.executable, "-m", "conclab.servers"]
    assert "--python" not in psutil.Process(server.pid).cmdline()      # re-executed without it
