"""The pitfall switches (--fault): each one produces its failure, and the fixed server does not."""
from __future__ import annotations

import signal
import time

import pytest

from conclab.servers.launcher import wait_until
from conclab.servers.protocol import ERROR, PING, PONG, WORK, encode_work

pytestmark = pytest.mark.live


def ping_and_hang_up(server, count: int) -> None:
    for _ in range(count):
        with server.connect() as client:
            assert client.request(PING) == (PONG, b"")


def active(server) -> int:
    """connections_active, not counting the STATS connection that asks."""
    return server.stats()["connections_active"] - 1


@pytest.mark.parametrize("fault", ["leak", "none"])
def test_leak_leaves_close_wait_and_fds(start, fault):
    server = start("--fault", fault)
    ping_and_hang_up(server, 1)                  # warm up (under leak, this one leaks too)
    if fault == "leak":                          # (no STATS under leak: its own connection would leak too)
        assert wait_until(lambda: server.close_wait() == 1)
    else:
        assert wait_until(lambda: active(server) == 0)
    baseline = server.fds()
    ping_and_hang_up(server, 8)
    if fault == "leak":
        assert wait_until(lambda: server.close_wait() == 1 + 8), f"CLOSE_WAIT {server.close_wait()}"
        assert server.fds() >= baseline + 8
    else:
        assert wait_until(lambda: active(server) == 0)   # the server has closed all 8: none may linger
        assert wait_until(lambda: server.close_wait() == 0)   # (but the STATS probe's own, for a moment)
        assert wait_until(lambda: server.fds() <= baseline)


IDLE_TIMEOUT = 0.3


@pytest.mark.parametrize("fault", ["no-deadline", "none"])
def test_no_deadline_lets_silent_clients_stay(start, fault):
    server = start("--fault", fault, "--idle-timeout", str(IDLE_TIMEOUT))
    with server.connect() as silent:
        if fault == "none":
            assert silent.recv_frame() == (ERROR, b"idle timeout")       # told as soon as the timeout passes
        else:
            time.sleep(2 * IDLE_TIMEOUT)                                 # silent twice as long as allowed
            assert silent.request(PING, b"still") == (PONG, b"still")


@pytest.mark.parametrize("fault", ["unbounded", "none"])
def test_unbounded_ignores_the_connection_cap(start, fault):
    server = start("--fault", fault, "--max-conns", "2")
    clients = []
    try:
        for n in range(5):
            client = server.connect()
            clients.append(client)
            if fault == "none" and n >= 2:            # over the cap: told so, then closed; never served
                assert client.recv_frame() == (ERROR, b"server busy")
                assert client.closed_by_server()
            else:
                assert client.request(PING) == (PONG, b"")
        rejected = clients[0].stats()["connections_rejected"]   # asked on an admitted connection: the cap is full
    finally:
        for client in clients:
            client.close()
    assert server.alive()
    assert rejected == (3 if fault == "none" else 0)


@pytest.mark.parametrize("fault", ["hard-kill", "none"])
def test_hard_kill_loses_the_reply_in_flight(start, fault):
    server = start("--fault", fault, "--drain-timeout", "5")
    with server.connect() as busy:
        busy.send(encode_work(600_000, 0, b"in flight"))
        time.sleep(0.15)
        status, final = server.stop(signal.SIGTERM)
        if fault == "hard-kill":
            assert status == -signal.SIGTERM and final is None
            with pytest.raises(ConnectionError):
                busy.recv_frame()
        else:
            assert status == 0 and final is not None
            assert busy.recv_frame()[0] == WORK
