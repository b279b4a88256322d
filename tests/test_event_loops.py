"""The event-loop backends' own machinery, in-process over loopback sockets (no server process).

epoll: the timer heap keeps no state per closed connection (a husk, then a rebuild), and a bug in one
connection's step costs that connection, not the server. gevent: a greenlet whose reads never wait still
yields to the hub, and one whose reads do wait never yields needlessly. Both: a second SIGTERM that
lands while the loop takes its signal handlers away does not kill the drained server.
"""
from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conclab.servers import protocol
from conclab.servers.config import ServerConfig
from conclab.servers.protocol import PING, PONG
from conclab.servers.session import open_session
from conclab.servers.stats import Stats

PING_FRAME = protocol.encode(PING, b"churn")


# -- epoll ------------------------------------------------------------------------------------------
@pytest.fixture
def epoll_loop():
    """An epoll Loop on a loopback listener, driven turn by turn (each turn waits at most 10 ms)."""
    from conclab.servers import epoll
    listener = socket.create_server(("127.0.0.1", 0))
    loop = epoll.Loop(listener, ServerConfig(idle_timeout=60.0), Stats("epoll", 10_000))
    loop.poll_timeout = lambda: 0.01
    yield loop
    for conn in list(loop.conns.values()):
        loop.close(conn)
    for closable in (loop.epoll, loop.wake_r, loop.wake_w, listener):
        closable.close()


def turns_until(loop, condition, limit: int = 200) -> bool:
    for _ in range(limit):
        if condition():
            return True
        loop.turn()
    return condition()


def ping(loop, client: socket.socket, payload: bytes = b"churn") -> tuple[int, bytes]:
    client.sendall(protocol.encode(PING, payload))
    decoder, frames = protocol.FrameDecoder(1 << 20), []

    def answered() -> bool:
        with contextlib.suppress(BlockingIOError):
            frames.extend(decoder.feed(client.recv(65536, socket.MSG_DONTWAIT)))
        return bool(frames)
    assert turns_until(loop, answered), "no reply"
    return frames[0]


def test_epoll_timer_heap_stays_bounded_under_connect_close_churn(epoll_loop):
    """--idle-timeout 60: each connection arms a deadline a minute away. Closed, its entry becomes a husk
    holding nothing, and once husks pass half the heap it is rebuilt: the heap stays about the size of
    what is open, not of everything that closed within the last minute."""
    loop, address, cycles, biggest = epoll_loop, epoll_loop.listener.getsockname(), 1500, 0
    keep = [socket.create_connection(address) for _ in range(5)]      # five that stay open throughout
    assert turns_until(loop, lambda: len(loop.conns) == 5)
    for _ in range(cycles):
        with socket.create_connection(address) as client:
            assert ping(loop, client) == (PONG, b"churn")
        assert turns_until(loop, lambda: len(loop.conns) == 5)
        biggest = max(biggest, len(loop.timers))
    assert loop.stats.connections_active == 5
    assert biggest <= 2 * 6 + 2, f"the timer heap grew to {biggest} entries for at most 6 open connections"
    for when, seq, callback, conn in loop.timers:
        assert callback is None or conn is None or not conn.closed, "a live timer entry of a closed connection"
        assert callback is not None or conn is None, "a husk still holds its connection"
    assert loop.cancelled == sum(1 for entry in loop.timers if entry[2] is None)
    for client in keep:
        client.close()


def test_epoll_husks_hold_no_socket(epoll_loop):
    """A closed connection's cancelled entries hold neither the Connection nor its socket."""
    loop = epoll_loop
    client = socket.create_connection(loop.listener.getsockname())
    assert turns_until(loop, lambda: len(loop.conns) == 1)
    (conn,) = loop.conns.values()
    entry = conn.timer
    assert entry is not None and entry[3] is conn
    client.close()
    assert turns_until(loop, lambda: not loop.conns)
    assert entry[2] is None and entry[3] is None
    assert conn.sock is None and conn.session is None


def test_epoll_a_bug_in_one_connection_costs_only_that_connection(epoll_loop, capsys, monkeypatch):
    """An exception that is not an OSError in a connection's step: one line on stderr naming it, that
    connection is reset and counted closed, and the loop serves the others on."""
    loop = epoll_loop
    address = loop.listener.getsockname()
    victim, bystander = socket.create_connection(address), socket.create_connection(address)
    assert turns_until(loop, lambda: len(loop.conns) == 2)
    victim_port = victim.getsockname()[1]
    real_read = type(loop).read

    def buggy_read(self, conn):
        if conn.sock.getpeername()[1] == victim_port:
            raise RuntimeError("injected failure")
        return real_read(self, conn)
    monkeypatch.setattr(type(loop), "read", buggy_read)
    victim.sendall(PING_FRAME)
    assert turns_until(loop, lambda: len(loop.conns) == 1)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError('injected failure')" in err, err
    victim.settimeout(2.0)
    with pytest.raises(ConnectionResetError):
        victim.recv(1)                                   # reset, not a FIN
    assert ping(loop, bystander, b"still here") == (PONG, b"still here")
    assert loop.stats.connections_active == 1
    victim.close()
    bystander.close()


# -- gevent -----------------------------------------------------------------------------------------
@pytest.fixture
def hub():
    gevent = pytest.importorskip("gevent")
    yield gevent
    gevent.get_hub().destroy(destroy_loop=True)


def new_session():
    return open_session(ServerConfig(idle_timeout=60.0), Stats("gevent", 10), time.monotonic())


def test_gevent_reads_that_never_wait_still_yield_to_the_hub(hub):
    """A socket that always has data: gevent's recv never switches, so without the explicit yield a
    greenlet waiting for I/O would run only after the reader stopped. With it, within two runs of
    YIELD_READS reads (the hub serves a poll's events after the yielding reader's turn)."""
    import gevent.socket
    from conclab.servers.green import YIELD_READS, HubDeadlines
    reader, writer = gevent.socket.socketpair()
    other, poke = gevent.socket.socketpair()
    reads = 3 * YIELD_READS
    writer.sendall(b"x" * (2048 * reads))                 # all there before the first read
    order = []

    def bystander():
        other.recv(1)                                     # parked: woken only by a poll of the hub
        order.append("bystander")
    waiting = hub.spawn(bystander)
    hub.sleep(0.01)
    poke.send(b"!")
    peer = HubDeadlines(reader, new_session())
    for n in range(reads):
        assert len(peer.recv(2048)) == 2048
        order.append(n)
    waiting.join(1.0)
    peer.close()
    assert "bystander" in order
    assert order.index("bystander") <= 2 * YIELD_READS, order
    for sock in (reader, writer, other, poke):
        sock.close()


def test_gevent_reads_that_wait_never_yield_needlessly(hub, monkeypatch):
    """Request by request (each read waits for its data): the hub runs between reads anyway, so the
    run of reads never reaches YIELD_READS and no explicit yield is made."""
    import gevent.socket
    from gevent.event import Event
    from conclab.servers.green import YIELD_READS, HubDeadlines
    reader, writer = gevent.socket.socketpair()
    yields, taken = [], Event()
    real_idle = hub.idle
    monkeypatch.setattr(hub, "idle", lambda *args: (yields.append(args), real_idle(*args)))

    def feed():                                  # one byte, then wait until it was read: every read waits
        for _ in range(3 * YIELD_READS):
            taken.clear()
            hub.sleep(0.001)
            writer.send(b"r")
            taken.wait(5.0)
    feeder = hub.spawn(feed)
    peer = HubDeadlines(reader, new_session())
    for _ in range(3 * YIELD_READS):
        assert peer.recv(64) == b"r"
        taken.set()
    feeder.join(5.0)
    peer.close()
    assert yields == []
    reader.close()
    writer.close()


# -- both: the loop's signal handlers are taken away without a gap -----------------------------------
# Each script installs its loop's SIGTERM handler as the server does, then takes it away and sends
# itself SIGTERM at once: the worst moment for a late second signal. The default action would kill it.
TEARDOWNS = {
    "asyncio": """
        import asyncio
        loop = asyncio.new_event_loop()
        loop.add_signal_handler(signal.SIGTERM, print)
        def take_away():
            loop.close()
    """,
    "gevent": """
        import gevent
        watcher = gevent.signal_handler(signal.SIGTERM, print)
        def take_away():
            watcher.cancel()
    """,
}
GUARDED = """
    from conclab.servers.base import then_ignore_signals
    with then_ignore_signals():
        take_away()
        os.kill(os.getpid(), signal.SIGTERM)
    print("alive")
"""
UNGUARDED = """
    take_away()
    os.kill(os.getpid(), signal.SIGTERM)
    print("alive")
"""


def run_teardown(loop: str, ending: str) -> subprocess.CompletedProcess:
    script = "import os, signal\n" + textwrap.dedent(TEARDOWNS[loop]) + textwrap.dedent(ending)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


@pytest.mark.live
@pytest.mark.parametrize("loop", sorted(TEARDOWNS))
def test_a_signal_while_the_loop_lets_go_of_it_is_ignored(loop):
    done = run_teardown(loop, GUARDED)
    assert (done.returncode, done.stdout.strip()) == (0, "alive"), done.stderr


@pytest.mark.live
@pytest.mark.parametrize("loop", sorted(TEARDOWNS))
def test_without_the_guard_that_signal_kills(loop):
    """The gap is real: taking the handler away restores the default action."""
    assert run_teardown(loop, UNGUARDED).returncode == -signal.SIGTERM
