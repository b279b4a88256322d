"""The pitfall switches (--fault): each one produces its failure, and the fixed server does not."""
from __future__ import annotations

import signal
import time

import psutil
import pytest

from lab import wait_until
from conclab.servers.protocol import ERROR, PING, PONG, WORK, encode_work


def close_wait(server) -> int:
    """The server's connections in CLOSE_WAIT: the peer closed, the server did not."""
    return sum(1 for c in psutil.Process(server.pid).net_connections(kind="tcp")
               if c.status == psutil.CONN_CLOSE_WAIT and c.laddr.port == server.address[1])


def ping_and_hang_up(server, count: int) -> None:
    for _ in range(count):
        with server.connect() as client:
            assert client.request(PING) == (PONG, b"")


@pytest.mark.parametrize("fault", ["leak", "none"])
def test_leak_leaves_close_wait_and_fds(start, fault):
    server = start("--fault", fault)
    ping_and_hang_up(server, 1)                  # warm up (under leak, this one leaks too)
    time.sleep(0.2)
    baseline, leaked_before = server.fds(), close_wait(server)
    ping_and_hang_up(server, 8)
    if fault == "leak":
        assert wait_until(lambda: close_wait(server) == leaked_before + 8), f"CLOSE_WAIT {close_wait(server)}"
        assert server.fds() >= baseline + 8
    else:
        time.sleep(0.3)
        assert close_wait(server) == 0
        assert wait_until(lambda: server.fds() <= baseline)


@pytest.mark.parametrize("fault", ["no-deadline", "none"])
def test_no_deadline_lets_silent_clients_stay(start, fault):
    server = start("--fault", fault, "--idle-timeout", "0.3")
    with server.connect() as silent:
        time.sleep(1.0)
        if fault == "none":
            assert silent.recv_frame() == (ERROR, b"idle timeout")
        else:
            assert silent.request(PING, b"still") == (PONG, b"still")


@pytest.mark.parametrize("fault", ["unbounded", "none"])
def test_unbounded_ignores_the_connection_cap(start, fault):
    server = start("--fault", fault, "--max-conns", "2")
    clients = [server.connect() for _ in range(5)]
    try:
        replies = [client.request(PING) for client in clients]
    except ConnectionError:
        replies = None
    finally:
        for client in clients:
            client.close()
    if fault == "unbounded":
        assert replies == [(PONG, b"")] * 5
    else:
        assert replies is None or (ERROR, b"server busy") in replies


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
