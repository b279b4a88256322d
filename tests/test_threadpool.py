"""The thread pool's lesson: with connection dispatch, idle clients can starve everyone."""
from __future__ import annotations

import socket

import pytest

from conclab.servers.launcher import ServerProcess
from conclab.servers.protocol import PING, PONG

pytestmark = pytest.mark.live


@pytest.fixture
def pool_server(request):
    with ServerProcess("threadpool", ["--workers", "2", *request.param]) as server:
        yield server


@pytest.mark.parametrize("pool_server", [["--dispatch", "connection"]], indirect=True)
def test_connection_dispatch_starves_the_client_beyond_workers(pool_server):
    idle = [pool_server.connect() for _ in range(2)]       # each occupies a worker, doing nothing
    with pool_server.connect() as third:
        third.sock.settimeout(1.0)
        third.send_frame(PING, b"anyone?")
        with pytest.raises(socket.timeout):
            third.recv_frame()                             # queued behind the idle two
        idle[0].close()                                    # a worker frees up...
        third.sock.settimeout(5.0)
        assert third.recv_frame() == (PONG, b"anyone?")    # ...and only now is it served
    idle[1].close()


@pytest.mark.parametrize("pool_server", [["--dispatch", "request"]], indirect=True)
def test_request_dispatch_serves_everyone_with_two_workers(pool_server):
    idle = [pool_server.connect() for _ in range(5)]
    with pool_server.connect() as sixth:
        sixth.sock.settimeout(5.0)
        assert sixth.request(PING, b"hi") == (PONG, b"hi")
    for client in idle:
        client.close()
