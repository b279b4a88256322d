"""The lazy deadlines of the blocking models: set once, set again only when the deadline comes sooner (no sockets)."""
from __future__ import annotations

import socket
import struct

import pytest

from conclab.servers import protocol
from conclab.servers.base import KernelDeadlines
from conclab.servers.config import ServerConfig
from conclab.servers.protocol import ECHO
from conclab.servers.session import open_session
from conclab.servers.stats import Stats

FRAME = protocol.encode(ECHO, b"x" * 64)


class RecordingSocket:
    """Stands in for a socket: recv returns what is queued, setsockopt is recorded."""

    def __init__(self, chunks):
        self.chunks, self.options = list(chunks), []

    def setsockopt(self, level, name, value):
        self.options.append((name, struct.unpack("ll", value)))

    def recv(self, size):
        return self.chunks.pop(0)

    def send(self, data):
        return len(data)

    sendall = send

    def receive_timeouts(self):
        return [sec + usec / 1e6 for name, (sec, usec) in self.options if name == socket.SO_RCVTIMEO]


def new_session(idle=60.0, frame=10.0):
    return open_session(ServerConfig(idle_timeout=idle, frame_timeout=frame), Stats("unit", 10))


def test_kernel_read_timeout_is_set_once_while_requests_keep_coming():
    session = new_session()
    sock = RecordingSocket([FRAME] * 100)
    peer = KernelDeadlines(sock, session)
    for _ in range(100):
        session.feed(peer.recv(65536))
    assert len(sock.receive_timeouts()) == 1
    assert sock.receive_timeouts()[0] == pytest.approx(60.0, abs=0.05)
    assert (socket.SO_SNDTIMEO, (60, 0)) in sock.options          # sends: the idle timeout, once


def test_kernel_read_timeout_follows_a_started_frame_and_back():
    session = new_session()
    sock = RecordingSocket([FRAME[:10], FRAME[10:], FRAME])
    peer = KernelDeadlines(sock, session)
    for _ in range(3):
        session.feed(peer.recv(65536))
    idle, frame, idle_again = sock.receive_timeouts()
    assert idle == pytest.approx(60.0, abs=0.05)
    assert frame == pytest.approx(10.0, abs=0.05)                  # mid-frame: the frame timeout is sooner
    assert idle_again == pytest.approx(60.0, abs=0.05)


def test_hub_timer_is_kept_while_the_deadline_moves_later():
    import gevent
    from conclab.servers.green import HubDeadlines
    session = new_session()
    peer = HubDeadlines(RecordingSocket([FRAME] * 50), session)
    peer.recv(65536)
    first = peer.timer
    for _ in range(49):
        for request in session.feed(FRAME):
            peer.sendall(request.run())
        peer.recv(65536)
    assert peer.timer is first and first.active                    # one timer for all 50 requests
    session.feed(FRAME[:10])                                       # a frame began: its deadline is sooner
    peer.sock.chunks.append(FRAME[10:])
    peer.recv(65536)
    assert peer.timer is not first and not first.active           # so the timer is set again
    peer.close()
    assert not peer.timer.active
    gevent.get_hub().destroy(destroy_loop=True)
