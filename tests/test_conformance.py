"""One conformance suite, run against every backend over real loopback sockets."""
from __future__ import annotations

import signal
import socket
import struct
import time

import pytest

from conclab.servers.launcher import wait_until
from conclab.servers import protocol
from conclab.servers.protocol import ECHO, ERROR, PING, PONG, WORK

pytestmark = pytest.mark.live

STATS_KEYS = {"backend", "pid", "connections_active", "connections_total", "connections_rejected",
              "requests_total", "bytes_in", "bytes_out", "idle_timeouts", "protocol_errors"}


@pytest.mark.parametrize("size", [0, 1, 64, 4096, 65536, 1_048_575])
def test_echo_payload_sizes(shared_server, size):
    payload = bytes(i % 251 for i in range(size))
    with shared_server.connect() as client:
        assert client.request(ECHO, payload) == (ECHO, payload)


def test_pipelined_frames_come_back_in_order(shared_server):
    frames = [(ECHO, b"%d" % i * (i % 7)) if i % 3 else (PING, b"id%d" % i) for i in range(500)]
    with shared_server.connect() as client:
        client.send(b"".join(protocol.encode(op, payload) for op, payload in frames))
        replies = [client.recv_frame() for _ in frames]
    expected = [(PONG if op == PING else op, payload) for op, payload in frames]
    assert replies == expected


def test_frame_split_into_single_bytes(shared_server):
    frame = protocol.encode(ECHO, b"dribbled but whole")
    with shared_server.connect() as client:
        for i in range(len(frame)):
            client.send(frame[i:i + 1])
            time.sleep(0.002)
        assert client.recv_frame() == (ECHO, b"dribbled but whole")


def test_ping_answers_pong_with_the_same_id(shared_server):
    with shared_server.connect() as client:
        assert client.request(PING, b"x" * 64) == (PONG, b"x" * 64)
        assert client.request(PING) == (PONG, b"")


def test_work_waits_then_echoes(shared_server):
    payload = struct.pack(">II", 200_000, 1_000) + b"tail"
    with shared_server.connect() as client:
        began = time.monotonic()
        assert client.request(WORK, payload) == (WORK, payload)
        assert time.monotonic() - began >= 0.2


def test_work_waits_overlap_across_connections(shared_server):
    """30 clients each wait 300 ms: served one after another that is 9 s; overlapped, well under 3 s."""
    frame = protocol.encode_work(300_000, 0, b"w")
    clients = [shared_server.connect() for _ in range(30)]
    try:
        began = time.monotonic()
        for client in clients:
            client.send(frame)
        replies = [client.recv_frame() for client in clients]
        elapsed = time.monotonic() - began
    finally:
        for client in clients:
            client.close()
    assert all(reply[0] == WORK for reply in replies)
    assert elapsed < 3.0, f"30 WORK waits took {elapsed:.2f}s: they did not overlap"


def test_stats_keys_and_counts(start):
    server = start()
    with server.connect() as client:
        for i in range(10):
            client.request(ECHO, b"abcd")
        stats = client.stats()
    assert STATS_KEYS <= stats.keys()
    assert stats["pid"] == server.pid
    assert stats["backend"] == server.backend
    assert stats["connections_active"] == 1
    assert stats["connections_total"] == 1
    assert stats["requests_total"] == 11          # ten ECHOs and this STATS
    assert stats["bytes_in"] == 10 * 9 + 5
    assert stats["bytes_out"] >= 10 * 9
    assert stats["protocol_errors"] == stats["idle_timeouts"] == stats["connections_rejected"] == 0


BAD_FRAMES = {
    "zero length": (struct.pack(">I", 0), "length"),
    "length over max-frame": (struct.pack(">IB", 2**32 - 1, ECHO), "length"),
    "unknown op": (protocol.encode(0x42, b"?"), "unknown op"),
    "client sends ERROR": (protocol.encode(ERROR, b"?"), "unknown op"),
    "short WORK": (protocol.encode(WORK, b"1234567"), "WORK"),
    "PING over 64 bytes": (protocol.encode(PING, b"p" * 65), "PING"),
}


@pytest.mark.parametrize("case", BAD_FRAMES, ids=list(BAD_FRAMES))
def test_protocol_error_answers_error_and_closes(shared_server, case):
    data, reason = BAD_FRAMES[case]
    with shared_server.connect() as bystander, shared_server.connect() as offender:
        bystander.request(PING)
        before = bystander.stats()["protocol_errors"]
        offender.send(protocol.encode(ECHO, b"before") + data)
        assert offender.recv_frame() == (ECHO, b"before")
        op, message = offender.recv_frame()
        assert op == ERROR and reason in message.decode()
        assert offender.closed_by_server()
        assert bystander.request(ECHO, b"still here") == (ECHO, b"still here")
        assert bystander.stats()["protocol_errors"] == before + 1


def test_max_conns_rejects_with_server_busy(start):
    server = start("--max-conns", "2")
    first, second = server.connect(), server.connect()
    first.request(PING), second.request(PING)
    with server.connect() as third:
        assert third.recv_frame() == (ERROR, b"server busy")
        assert third.closed_by_server()
    first.close()
    assert wait_until(lambda: second.stats()["connections_active"] == 1)
    with server.connect() as fourth:
        assert fourth.request(PING, b"in") == (PONG, b"in")
    stats = second.stats()
    assert stats["connections_rejected"] == 1
    second.close()


def test_idle_timeout_closes_silent_clients_only(start):
    server = start("--idle-timeout", "0.5")
    with server.connect() as silent, server.connect() as chatty:
        for _ in range(5):                       # 0.75 s of activity, past the timeout, each gap well under it
            chatty.request(PING)
            time.sleep(0.15)
        assert silent.recv_frame() == (ERROR, b"idle timeout")
        assert silent.closed_by_server()
        assert chatty.request(PING, b"alive") == (PONG, b"alive")
        assert chatty.stats()["idle_timeouts"] == 1


def test_a_request_in_progress_outlives_the_idle_deadline(start):
    server = start("--idle-timeout", "0.3")
    with server.connect() as client:
        client.send(protocol.encode_work(800_000, 0, b"slow"))     # waits 0.8 s: past the idle deadline
        assert client.recv_frame() == (WORK, struct.pack(">II", 800_000, 0) + b"slow")
        began = time.monotonic()
        assert client.recv_frame() == (ERROR, b"idle timeout")     # then idle: the deadline runs from the reply
        assert 0.2 < time.monotonic() - began < 2.0


def test_frame_timeout_defeats_byte_dribbling(start):
    server = start("--frame-timeout", "0.5", "--idle-timeout", "30")
    frame = protocol.encode(ECHO, b"x" * 100)
    with server.connect() as dribbler:
        began = time.monotonic()
        for byte in frame[:-1]:                  # one byte each 100 ms: 10 s for the frame
            dribbler.send(bytes([byte]))
            time.sleep(0.1)
            if _readable(dribbler.sock):
                break
        assert dribbler.recv_frame() == (ERROR, b"frame timeout")
        assert time.monotonic() - began < 3.0
    with server.connect() as client:
        assert client.stats()["frame_timeouts"] == 1


def test_raw_mode_echoes_any_bytes(start):
    server = start("--protocol", "raw")
    with socket.create_connection(server.address, timeout=5) as sock:
        blob = bytes(range(256)) * 64             # not frames: raw mode must not care
        sock.sendall(blob)
        received = b""
        while len(received) < len(blob):
            received += sock.recv(65536)
        assert received == blob


def test_raw_mode_idle_timeout_just_closes(start):
    server = start("--protocol", "raw", "--idle-timeout", "0.3")
    with socket.create_connection(server.address, timeout=5) as sock:
        assert sock.recv(100) == b""


def test_sigterm_drains_in_flight_request(start):
    server = start("--drain-timeout", "5")
    busy, idle = server.connect(), server.connect()
    idle.request(PING)
    busy.send(protocol.encode_work(800_000, 0, b"finish me"))
    time.sleep(0.2)
    server.proc.send_signal(signal.SIGTERM)
    assert idle.closed_by_server()               # idle connections close at once
    assert wait_until(lambda: _refused(server.address), timeout=2)
    assert busy.recv_frame() == (WORK, struct.pack(">II", 800_000, 0) + b"finish me")
    assert busy.closed_by_server()
    status, final = server.stop()
    assert status == 0
    assert final is not None and final["requests_total"] >= 2 and "connections_active" in final


def test_drain_deadline_aborts_what_is_left(start):
    server = start("--drain-timeout", "0.5")
    with server.connect() as busy:
        busy.send(protocol.encode_work(10_000_000, 0))    # 10 s: longer than the drain allows
        time.sleep(0.2)
        began = time.monotonic()
        status, final = server.stop()
        assert status == 0 and final is not None
        assert time.monotonic() - began < 4.0
        assert busy.closed_by_server()


def _readable(sock) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


def _refused(address) -> bool:
    try:
        socket.create_connection(address, timeout=1).close()
    except OSError:
        return True
    return False


def test_no_fd_growth_after_many_connections(start):
    server = start()
    with server.connect() as client:
        client.request(PING)                     # warm up: lazily created fds (epoll, pipes) exist now
    with server.connect() as client:
        assert wait_until(lambda: client.stats()["connections_active"] == 1)
        baseline = server.fds() - 1              # the fds with no client connected
    for _ in range(1000):
        with socket.create_connection(server.address) as sock:
            sock.sendall(protocol.encode(PING))
            sock.recv(16)
    with server.connect() as client:
        assert wait_until(lambda: client.stats()["connections_active"] == 1)
        assert client.stats()["connections_total"] >= 1001
    assert wait_until(lambda: server.fds() <= baseline + 1), f"fds grew from {baseline} to {server.fds()}"
