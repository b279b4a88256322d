"""The buffer budget (--max-buffered, docs/protocol.md section 3).

Unit tests drive the sans-I/O ``Session`` and ``FrameDecoder`` with made-up times and check the
accounting exactly: what is reserved when, what goes back when, and never twice. Live tests, over
every backend variant, check that the budget is back to 0 after every way a connection can end
(EOF, reset, timeout, protocol error, drain, abort), through STATS' ``buffered_bytes``.
"""
from __future__ import annotations

import gc
import socket
from types import SimpleNamespace

import pytest

from conclab.servers.config import ServerConfig
from conclab.servers.launcher import wait_until
from conclab.servers.protocol import (ECHO, ERROR, PING, PONG, STATS, WORK, FrameDecoder, OverBudget, encode,
                                      encode_work)
from conclab.servers.session import Held, Session
from conclab.servers.stats import Stats

MAX_FRAME = 1000
BUDGET = 2500                  # two maximal frames fit, not three


def sessions(count: int, **settings) -> tuple[Stats, list[Session]]:
    """``count`` sessions sharing one Stats (one server), budget BUDGET unless said otherwise."""
    config = ServerConfig(**{"max_frame": MAX_FRAME, "max_buffered": BUDGET, **settings})
    stats = Stats("threads", config.max_conns)
    return stats, [Session(config, stats, 0.0) for _ in range(count)]


def replies(requests, now: float = 1.0) -> bytes:
    return b"".join(request.run(now) for request in requests)


def test_frames_whole_in_one_read_reserve_nothing():
    stats, [session] = sessions(1)
    reads = [encode(ECHO, b"a" * 900), encode(PING, b"1") + encode(ECHO, b"b" * 10) + encode(WORK, bytes(8))]
    for data in reads:
        requests = session.feed(data, 0.5)
        assert stats.buffered_bytes == 0 and session.reservations.held == 0
        assert not any(isinstance(request, Held) for request in requests)
        replies(requests)
    assert stats.buffered_bytes == 0


def test_a_split_frame_reserves_its_length_when_its_header_is_in_and_gives_it_back_when_answered():
    stats, [session] = sessions(1)
    frame = encode(ECHO, b"x" * 599)                   # length 600
    assert session.feed(frame[:3], 0.1) == [] and stats.buffered_bytes == 0     # no length yet: nothing known
    assert session.feed(frame[3:50], 0.2) == [] and stats.buffered_bytes == 600
    assert session.feed(frame[50:-1], 0.3) == [] and stats.buffered_bytes == 600   # reserved once, not per read
    [request] = session.feed(frame[-1:], 0.4)
    assert isinstance(request, Held) and stats.buffered_bytes == 600            # complete, not yet answered
    assert request.run(0.5) == frame and stats.buffered_bytes == 0 and session.reservations.held == 0


def test_a_waiting_request_holds_its_frames_bytes_until_it_runs():
    stats, [session] = sessions(1)
    frame = encode_work(1000, 0, b"w" * 100)
    session.feed(frame[:20], 0.1)
    [request] = session.feed(frame[20:], 0.2)
    assert request.io_s == pytest.approx(0.001) and stats.buffered_bytes == len(frame) - 4
    assert request.run(0.3) == frame and stats.buffered_bytes == 0


def test_a_read_that_completes_one_reserved_frame_and_starts_another_moves_the_reservation():
    stats, [session] = sessions(1)
    first, second = encode(ECHO, b"1" * 299), encode(ECHO, b"2" * 499)
    session.feed(first[:100], 0.1)
    assert stats.buffered_bytes == 300
    [request] = session.feed(first[100:] + encode(PING, b"p") + second[:10], 0.2)
    assert stats.buffered_bytes == 300 + 500 and session.reservations.held == 800
    assert request.run(0.3) == first + encode(PONG, b"p") and stats.buffered_bytes == 500
    [request] = session.feed(second[10:], 0.4)
    assert request.run(0.5) == second and stats.buffered_bytes == 0


def test_past_the_budget_earlier_frames_are_answered_then_server_busy_and_nothing_is_kept():
    stats, [a, b, c] = sessions(3)
    for session in (a, b):
        session.feed(encode(ECHO, b"x" * 999)[:500], 0.1)
    assert stats.buffered_bytes == 2000
    requests = c.feed(encode(PING, b"7") + encode(ECHO, b"y" * 600)[:300], 0.2)
    assert replies(requests) == encode(PONG, b"7") + encode(ERROR, b"server busy")
    assert c.closing and c.reservations.held == 0 and not c.decoder.mid_frame
    assert stats.buffered_bytes == 2000 and stats.buffer_rejections == 1 and stats.protocol_errors == 0
    small = c.reservations.reserve(500)                     # what is left still fits a frame that small
    assert small and stats.buffered_bytes == 2500
    c.close()
    assert stats.buffered_bytes == 2000


def test_close_gives_back_what_a_connection_holds_exactly_once():
    stats, [session] = sessions(1)
    frame = encode(ECHO, b"z" * 799)
    session.feed(frame[:10], 0.1)
    [request] = session.feed(frame[10:] + frame[:10], 0.2)      # one answered-to-be, one more started
    assert stats.buffered_bytes == 1600
    session.close()
    assert stats.buffered_bytes == 0 and session.reservations.held == 0
    request.run(0.3)                                   # the reply goes out after the close: nothing twice
    session.close()
    assert stats.buffered_bytes == 0


def test_a_rate_limited_session_gives_back_the_same():
    stats, [session] = sessions(1, rate_limit=1000.0, rate_limit_mode="reject")
    frame = encode(ECHO, b"r" * 400)
    session.feed(frame[:200], 0.1)
    [request] = session.feed(frame[200:], 0.2)
    assert stats.buffered_bytes == 401
    assert request.run(0.3) == frame and stats.buffered_bytes == 0


def test_fault_unbounded_counts_but_never_refuses():
    stats, sessions_ = sessions(4, fault="unbounded")
    for session in sessions_:
        assert session.feed(encode(ECHO, b"u" * 999)[:100], 0.1) == []
    assert stats.buffered_bytes == 4000 and stats.buffer_rejections == 0
    for session in sessions_:
        session.close()
    assert stats.buffered_bytes == 0


def test_the_decoder_asks_before_it_keeps_a_frame():
    asked = []
    decoder = FrameDecoder(MAX_FRAME, SimpleNamespace(reserve=lambda size: asked.append(size) or size < 100))
    assert decoder.feed(encode(ECHO, b"s" * 49)[:20]) == [] and asked == [50] and decoder.reserved == 50
    with pytest.raises(OverBudget) as refused:
        decoder.feed(encode(ECHO, b"s" * 49)[20:] + encode(ECHO, b"t" * 200)[:30])
    assert refused.value.frames == [(ECHO, b"s" * 49)] and str(refused.value) == "server busy"
    assert asked == [50, 201] and decoder.reserved == 0 and not decoder.mid_frame


def test_a_session_is_freed_at_once_not_by_the_garbage_collector():
    """No reference cycle (a session reached again through its decoder's budget): closed connections
    must not wait for a collection to give their memory back."""
    gc.collect()
    gc.disable()
    try:
        stats, [session] = sessions(1)
        session.feed(encode(ECHO, b"c" * 500)[:100], 0.1)
        session.close()
        del session
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_max_buffered_must_hold_one_maximal_frame():
    with pytest.raises(ValueError, match="--max-buffered must be at least --max-frame"):
        ServerConfig(max_frame=1 << 20, max_buffered=(1 << 20) - 1)
    assert ServerConfig().max_buffered == 256 << 20
    assert ServerConfig(max_frame=1000, max_buffered=5000, fault="unbounded").buffer_budget == float("inf")


# -- live: the budget is back to 0 after every way a connection ends ---------------------------------
LIVE_BUDGET = 4 << 20
PARTIAL = encode(ECHO, b"p" * ((1 << 20) - 1))[:300_000]        # most of nothing: a third of a 1 MiB frame


def buffered(server) -> int:
    return server.stats()["buffered_bytes"]


def hold_partial(server):
    """A client that sent part of a 1 MiB frame, once the server has reserved it."""
    before = buffered(server)
    client = server.connect(5.0)
    client.send(PARTIAL)
    assert wait_until(lambda: buffered(server) == before + (1 << 20), 5.0, 0.02), "the partial frame was not reserved"
    return client


def back_to_zero(server) -> bool:
    return wait_until(lambda: buffered(server) == 0 and server.stats()["connections_active"] == 1, 10.0, 0.02)


@pytest.mark.parametrize("ending", ["eof", "reset", "frame timeout", "protocol error"])
def test_the_budget_is_back_after_a_connection_ends(start, ending):
    server = start("--max-buffered", str(LIVE_BUDGET), "--frame-timeout", "1")
    client = hold_partial(server)
    if ending == "eof":
        client.sock.shutdown(socket.SHUT_WR)
    elif ending == "reset":
        client.reset()
    elif ending == "protocol error":
        client.send(b"p" * (len(encode(ECHO, b"p" * ((1 << 20) - 1))) - len(PARTIAL)) + encode(0x42))
        assert client.recv_frame() == (ECHO, b"p" * ((1 << 20) - 1))
        assert client.recv_frame() == (ERROR, b"unknown op 0x42")
    assert back_to_zero(server), f"buffered_bytes {buffered(server)} after {ending}"
    if ending == "frame timeout":
        assert client.recv_frame() == (ERROR, b"frame timeout")
    client.close()


def test_the_budget_is_back_after_server_busy(start):
    server = start("--max-buffered", str(LIVE_BUDGET))
    held = [hold_partial(server) for _ in range(LIVE_BUDGET >> 20)]
    refused = server.connect(5.0)
    refused.send(encode(PING, b"1") + PARTIAL[:100])
    assert refused.recv_frame() == (PONG, b"1")
    assert refused.recv_frame() == (ERROR, b"server busy")
    for client in held:
        client.close()
    assert back_to_zero(server)
    counters = server.stats()
    assert counters["buffer_rejections"] == 1 and counters["protocol_errors"] == 0
    with server.connect(5.0) as client:
        assert client.request(ECHO, b"q" * ((1 << 20) - 1)) == (ECHO, b"q" * ((1 << 20) - 1))
        assert client.request(STATS)[0] == STATS


def work_counted(server, work_before: int):
    """A condition: the WORK sent after the STATS that read ``work_before`` (requests_total) was counted,
    i.e. its wait has begun. Each STATS counts itself, so the n-th probe after it reads one more each."""
    probes = iter(range(1, 1000))
    return lambda: server.stats()["requests_total"] - work_before - next(probes) == 1


@pytest.mark.parametrize("ending", ["drain", "abort"])
def test_the_final_line_shows_the_budget_back_after_a_drain(start, ending):
    """SIGTERM with a partial frame held (the drain closes it), and a reserved WORK whose wait outlasts
    --drain-timeout (aborted at the deadline): the final line says buffered_bytes 0."""
    server = start("--max-buffered", str(LIVE_BUDGET), "--drain-timeout", "0.5")
    client = hold_partial(server)
    if ending == "abort":
        work = encode_work(30_000_000, 0, b"w" * 300_000)
        waiting = server.connect(5.0)
        waiting.send(work[:1000])
        assert wait_until(lambda: buffered(server) >= (1 << 20) + len(work) - 4, 5.0, 0.02)
        before = server.stats()["requests_total"]
        waiting.send(work[1000:])
        assert wait_until(work_counted(server, before), 5.0, 0.02), "the WORK did not start"
    code, final = server.stop()
    assert code == 0 and final is not None
    assert final["buffered_bytes"] == 0 and final["connections_active"] == 0
    assert final["connections_aborted"] == (1 if ending == "abort" else 0)
    client.close()
