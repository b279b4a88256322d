"""``--cpu-offload process`` (servers/offload.py): WORK's CPU part in a process pool, beside an event loop.

The live tests run over the event-loop variants (asyncio, uvloop, gevent, epoll: the backends that
take the option, ``config.OFFLOAD_BACKENDS``) over real loopback sockets. conftest's ``variant``
parametrizes every variant (or every Python one), so ``loop_variant`` takes the event loops from the
same table, skipped the same way when one cannot run here, and ``start_loop`` is conftest's ``start``
for them (launcher ``ServerProcess``es, closed after the test). The other backends refuse the option,
checked in-process. The ordering tests compare arrivals, never durations: a PING sent while another
connection's WORK computes is answered before that WORK (without the option the loop would be busy
burning, and the PONG would come after it).
"""
from __future__ import annotations

import os
import select
import struct

import psutil
import pytest
from conclab.servers import VARIANTS, cli, protocol, session as session_module
from conclab.servers.config import OFFLOAD_BACKENDS, ServerConfig
from conclab.servers.launcher import ServerProcess, free_port, wait_until
from conclab.servers.protocol import ECHO, PING, PONG, WORK
from conclab.servers.stats import Stats

LONG_CPU_US = 800_000          # long enough that the other connection's PING is certainly served meanwhile
OFFLOAD = ("--cpu-offload", "process")
LOOP_VARIANTS = [name for name, v in VARIANTS.items() if v.backend in OFFLOAD_BACKENDS]


def work(io_us: int, cpu_us: int, tag: bytes) -> bytes:
    return struct.pack(">II", io_us, cpu_us) + tag


@pytest.fixture(params=LOOP_VARIANTS, scope="module")
def loop_variant(request):
    """An event-loop variant of the lab's table (skipped, like conftest's ``variant``, if it cannot run here)."""
    variant = VARIANTS[request.param]
    reason = variant.unavailable()
    if reason:
        pytest.skip(f"{variant.backend}: {reason}")
    return variant


@pytest.fixture
def start_loop(loop_variant):
    """start(*options) -> a running ServerProcess of this event-loop variant; all are closed after the test."""
    servers = []

    def _start(*options):
        server = ServerProcess(loop_variant.backend, [*loop_variant.options, *options])
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.close()


class RequestsRead:
    """How many requests the server has read, besides the STATS this asks with (one connection of its own)."""

    def __init__(self, server) -> None:
        self.client = server.connect()
        self.asked = 0

    def __call__(self) -> int:
        self.asked += 1
        return self.client.stats()["requests_total"] - self.asked

    def close(self) -> None:
        self.client.close()


def wait_read(server, send) -> None:
    """``send()`` a request, then wait until the server has read it (its requests_total says so)."""
    read = RequestsRead(server)
    before = read()
    send()
    try:
        assert wait_until(lambda: read() > before), "the server never read the request"
    finally:
        read.close()


def has_reply(client) -> bool:
    """Whether anything has arrived on ``client`` (asked without waiting, nothing consumed)."""
    return bool(client.frames) or bool(select.select([client.sock], [], [], 0)[0])


# -- live: the event loops ------------------------------------------------------------------------

@pytest.mark.live
def test_work_is_answered_and_counted_in_stats_and_metrics(start_loop):
    metrics_port = free_port()
    server = start_loop(*OFFLOAD, "--metrics-port", str(metrics_port))
    with server.connect() as client:
        assert client.request(WORK, work(0, 20_000, b"cpu only")) == (WORK, work(0, 20_000, b"cpu only"))
        assert client.request(WORK, work(5_000, 20_000, b"io then cpu")) == (WORK, work(5_000, 20_000, b"io then cpu"))
        assert client.request(WORK, work(5_000, 0, b"io only")) == (WORK, work(5_000, 0, b"io only"))
        stats = client.stats()
    assert stats["cpu_offload"] == "process" and stats["offloaded"] == 2
    assert 'conclab_offloaded_total{backend="%s"} 2.0' % server.backend in server.metrics()


@pytest.mark.live
def test_without_the_option_nothing_is_offloaded(start_loop):
    server = start_loop()
    with server.connect() as client:
        assert client.request(WORK, work(0, 1_000, b"here")) == (WORK, work(0, 1_000, b"here"))
        stats = client.stats()
    assert stats["cpu_offload"] == "none" and stats["offloaded"] == 0


@pytest.mark.live
def test_another_connection_is_served_while_one_computes(start_loop):
    server = start_loop(*OFFLOAD)
    with server.connect() as computing, server.connect() as other:
        wait_read(server, lambda: computing.send_frame(WORK, work(0, LONG_CPU_US, b"long")))
        assert other.request(PING, b"meanwhile") == (PONG, b"meanwhile")
        assert not has_reply(computing), "the WORK was answered before the PING sent while it computed"
        assert computing.recv_frame() == (WORK, work(0, LONG_CPU_US, b"long"))


@pytest.mark.live
def test_replies_on_one_connection_keep_request_order(start_loop):
    server = start_loop(*OFFLOAD)
    frames = [(WORK, work(0, 200_000, b"1")), (PING, b"2"), (WORK, work(10_000, 50_000, b"3")), (ECHO, b"4"),
              (WORK, work(0, 0, b"5")), (WORK, work(0, 30_000, b"6")), (PING, b"7")]
    expected = [(PONG if op == PING else op, payload) for op, payload in frames]
    with server.connect() as client:
        client.send(b"".join(protocol.encode(op, payload) for op, payload in frames))   # pipelined, in one write
        assert [client.recv_frame() for _ in frames] == expected


@pytest.mark.live
def test_sigterm_during_an_offloaded_work_delivers_its_reply(start_loop):
    server = start_loop(*OFFLOAD)
    client = server.connect()
    wait_read(server, lambda: client.send_frame(WORK, work(0, 500_000, b"in flight")))
    status, final = server.stop()
    with client:
        assert client.recv_frame() == (WORK, work(0, 500_000, b"in flight"))
    assert status == 0 and final["event"] == "stopped"
    assert final["offloaded"] == 1 and final["connections_aborted"] == 0 and final["cpu_offload"] == "process"


@pytest.mark.live
def test_the_drain_stops_a_computation_whose_connection_is_gone(start_loop):
    """The reset connection is closed when the loop sees the reset (epoll: at once) or aborted at --drain-timeout
    (the others read nothing while a request computes, so they do not see it); either way the pool is then shut
    down without waiting for the computation."""
    server = start_loop(*OFFLOAD, "--drain-timeout", "1")
    client = server.connect()
    wait_read(server, lambda: client.send_frame(WORK, work(0, 60_000_000, b"a minute")))
    client.reset()
    status, final = server.stop()                  # a 60 s computation is not waited for (stop's grace is 10 s)
    assert status == 0 and final["offloaded"] == 0


@pytest.mark.live
def test_each_of_procs_workers_has_its_own_pool(start_loop):
    server = start_loop(*OFFLOAD, "--procs", "2")
    clients = [server.connect() for _ in range(4)]
    for n, client in enumerate(clients):
        client.send_frame(WORK, work(0, 50_000, b"%d" % n))
    for n, client in enumerate(clients):
        with client:
            assert client.recv_frame() == (WORK, work(0, 50_000, b"%d" % n))
    status, final = server.stop()
    assert status == 0 and final["procs"] == 2 and final["workers_failed"] == 0
    assert final["offloaded"] == 4 and final["cpu_offload"] == "process"


def pool_workers(server) -> list:
    """The server's pool processes (spawned: ``--multiprocessing-fork`` on their command line)."""
    return [child for child in psutil.Process(server.pid).children()
            if "--multiprocessing-fork" in child.cmdline()]


def gone(process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.live
def test_a_broken_pool_falls_back_to_computing_in_the_server(start_loop):
    server = start_loop(*OFFLOAD)
    workers = pool_workers(server)
    assert len(workers) == len(os.sched_getaffinity(server.pid))          # one per CPU it may run on
    workers[0].kill()
    assert wait_until(lambda: gone(workers[0]))
    with server.connect() as client:
        for n in range(2):
            assert client.request(WORK, work(0, 10_000, b"%d" % n)) == (WORK, work(0, 10_000, b"%d" % n))
        assert client.stats()["offloaded"] == 0
    status, _ = server.stop()
    assert status == 0
    warnings = [line for line in server.errors().splitlines() if "--cpu-offload" in line]
    assert len(warnings) == 1 and "process pool failed" in warnings[0]


@pytest.mark.live
def test_the_pool_dies_with_its_server(start_loop):
    server = start_loop(*OFFLOAD)
    family = psutil.Process(server.pid).children()
    assert pool_workers(server)
    server.proc.kill()
    assert wait_until(lambda: all(gone(process) for process in family), 10.0), "a pool process outlived its server"


# -- the other backends refuse it (in-process: refused before anything starts) --------------------

@pytest.mark.parametrize("backend", ["threads", "threadpool", "go"])
def test_the_other_backends_refuse_it_in_one_line(backend, capsys):
    assert cli.main([backend, *OFFLOAD]) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "--cpu-offload is for event-loop backends only" in captured.err


# -- the session's side ------------------------------------------------------------------------------

@pytest.fixture
def burns(monkeypatch):
    """The cpu_us values session.burn was asked for (the burn itself skipped)."""
    asked: list = []
    monkeypatch.setattr(session_module, "burn", asked.append)
    return asked


def work_request(config: ServerConfig | None = None):
    """The Request a session makes of one WORK of 0 µs wait and 30 ms compute, and its session."""
    session = session_module.Session(config or ServerConfig(), Stats("epoll", 10), now=0.0)
    [request] = session.feed(protocol.encode(WORK, work(0, 30_000, b"w")), now=1.0)
    return request, session


def test_computed_skips_the_burn_and_counts_idle_time_from_when_it_ended(burns):
    request, session = work_request()
    assert request.computed(7.5) == protocol.encode(WORK, work(0, 30_000, b"w"))
    assert burns == [] and session.idle_since == 7.5


def test_run_burns_here_unless_the_session_computes_elsewhere(burns):
    request, session = work_request()
    request.run(2.0)
    assert burns == [30_000] and session.idle_since == pytest.approx(2.03)
    burns.clear()
    request, session = work_request()
    elsewhere: list = []
    session.compute = lambda cpu_us: elsewhere.append(cpu_us) or 9.0       # when it ended
    request.run(2.0)
    assert burns == [] and elsewhere == [30_000] and session.idle_since == 9.0


def test_a_held_frame_gives_its_budget_back_when_computed_elsewhere(burns):
    session = session_module.Session(ServerConfig(), Stats("epoll", 10), now=0.0)
    frame = protocol.encode(WORK, work(0, 30_000, b"x" * 100))
    assert session.feed(frame[:10], now=1.0) == []                        # the frame is held, its bytes reserved
    assert session.stats.buffered_bytes == len(frame) - 4
    [request] = session.feed(frame[10:], now=1.0)
    request.computed(2.0)
    assert session.stats.buffered_bytes == 0 and burns == []
