"""The lazy deadlines of the blocking models: set once, set again only when the deadline comes sooner (no sockets).

The backends' deadline code reads ``time.monotonic()`` and hands it to the session; these tests do the same
where they stand in for the backend's loop, and pass made-up times where only the session is asked.
"""
from __future__ import annotations

import socket
import struct
import time

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


def new_session(idle=60.0, frame=10.0, now=None):
    now = time.monotonic() if now is None else now
    return open_session(ServerConfig(idle_timeout=idle, frame_timeout=frame), Stats("unit", 10), now)


def test_kernel_read_timeout_is_set_once_while_requests_keep_coming():
    session = new_session()
    sock = RecordingSocket([FRAME] * 100)
    peer = KernelDeadlines(sock, session)
    for _ in range(100):
        session.feed(peer.recv(65536), time.monotonic())
    assert len(sock.receive_timeouts()) == 1
    assert sock.receive_timeouts()[0] == pytest.approx(60.0, abs=0.05)
    assert (socket.SO_SNDTIMEO, (60, 0)) in sock.options          # sends: the idle timeout, once


def test_kernel_read_timeout_follows_a_started_frame_and_back():
    session = new_session()
    sock = RecordingSocket([FRAME[:10], FRAME[10:], FRAME])
    peer = KernelDeadlines(sock, session)
    for _ in range(3):
        session.feed(peer.recv(65536), time.monotonic())
    idle, frame, idle_again = sock.receive_timeouts()
    assert idle == pytest.approx(60.0, abs=0.05)
    assert frame == pytest.approx(10.0, abs=0.05)                  # mid-frame: the frame timeout is sooner
    assert idle_again == pytest.approx(60.0, abs=0.05)


def test_kernel_read_timeout_is_what_is_left_of_the_sessions_deadline():
    session = new_session(idle=60.0, now=time.monotonic() - 59.5)   # opened 59.5 s ago, silent since
    sock = RecordingSocket([b""])
    KernelDeadlines(sock, session).recv(65536)
    assert sock.receive_timeouts() == [pytest.approx(0.5, abs=0.05)]


def test_session_deadlines_take_the_time_they_are_given():
    session = new_session(idle=60.0, frame=10.0, now=500.0)
    assert session.timeout(530.0) == 30.0 and not session.expired(559.0) and session.expired(560.0)
    session.feed(FRAME[:10], 520.0)                                # a frame began at 520: due by 530
    assert session.timeout(525.0) == 5.0 and session.expired(530.0)
    assert session.expire(530.0).endswith(b"frame timeout")


def test_hub_timer_is_kept_while_the_deadline_moves_later():
    import gevent
    from conclab.servers.green import HubDeadlines
    session = new_session()
    peer = HubDeadlines(RecordingSocket([FRAME] * 50), session)
    peer.recv(65536)
    first = peer.timer
    for _ in range(49):
        for request in session.feed(FRAME, time.monotonic()):
            peer.sendall(request.run(time.monotonic()))
        peer.recv(65536)
    assert peer.timer is first and first.active                    # one timer for all 50 requests
    session.feed(FRAME[:10], time.monotonic())                     # a frame began: its deadline is sooner
    peer.sock.chunks.append(FRAME[10:])
    peer.recv(65536)
    assert peer.timer is not first and not first.active           # so the timer is set again
    peer.close()
    assert not peer.timer.active
    gevent.get_hub().destroy(destroy_loop=True)
