"""Unit and property tests of the sans-I/O codec and the Session (no sockets)."""
from __future__ import annotations

import json
import struct
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st

from conclab.servers import protocol
from conclab.servers.config import ServerConfig
from conclab.servers.protocol import (ECHO, ERROR, PING, PONG, STATS, WORK, BadLength, FrameDecoder, PingTooLong,
                              ProtocolError, ShortWork, UnknownOp)
from conclab.servers.session import RawSession, open_session
from conclab.servers.stats import Stats

frames_strategy = st.lists(st.tuples(st.sampled_from([ECHO, PING, WORK, STATS]), st.binary(max_size=300)),
                           max_size=30)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@given(frames_strategy, st.lists(st.integers(min_value=0), max_size=40))
def test_any_chunking_decodes_to_the_same_frames(frames, cuts):
    stream = b"".join(protocol.encode(op, payload) for op, payload in frames)
    decoder = FrameDecoder()
    decoded = [frame for chunk in chunked(stream, cuts) for frame in decoder.feed(chunk)]
    assert decoded == frames
    assert not decoder.mid_frame


@settings(max_examples=300)
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0), max_size=10))
def test_random_bytes_give_frames_or_a_clear_error(data, cuts):
    decoder = FrameDecoder(max_frame=4096)
    tracemalloc.start()
    try:
        for chunk in chunked(data, cuts):
            for op, payload in decoder.feed(chunk):
                assert 0 <= op <= 255 and len(payload) < 4096
    except ProtocolError as exc:
        assert isinstance(exc, BadLength) and "length" in str(exc)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 64 * 1024, "decoding a small input must not allocate what a length field claims"


@settings(max_examples=300)
@given(st.one_of(frames_strategy.map(lambda frames: b"".join(protocol.encode(op, p) for op, p in frames)),
                 st.binary(max_size=200)))
def test_echo_frames_counts_only_reads_of_whole_echo_frames(data):
    try:
        decoder = FrameDecoder(max_frame=4096)
        frames = decoder.feed(data)
        whole_echoes = not decoder.mid_frame and all(op == ECHO for op, _ in frames)
    except ProtocolError:
        whole_echoes = False
    expected = len(frames) if whole_echoes else 0
    assert protocol.echo_frames(data, max_frame=4096) == expected


def test_hostile_length_fails_at_the_header_without_waiting_for_the_payload():
    decoder = FrameDecoder(max_frame=1024)
    with pytest.raises(BadLength, match="4294967295"):
        decoder.feed(struct.pack(">I", 2**32 - 1))


def test_zero_length_is_an_error_and_earlier_frames_survive():
    decoder = FrameDecoder()
    with pytest.raises(BadLength) as info:
        decoder.feed(protocol.encode(ECHO, b"ok") + struct.pack(">I", 0))
    assert info.value.frames == [(ECHO, b"ok")]


@pytest.mark.parametrize("op,payload,error", [
    (0x42, b"", UnknownOp), (PONG, b"", UnknownOp), (ERROR, b"x", UnknownOp),
    (WORK, b"1234567", ShortWork), (PING, b"x" * 65, PingTooLong),
])
def test_request_checks_name_the_violation(op, payload, error):
    with pytest.raises(error):
        protocol.check_request(op, payload)


def test_work_round_trip():
    frame = protocol.encode_work(1500, 20, b"data")
    [(op, payload)] = FrameDecoder().feed(frame)
    assert op == WORK and protocol.parse_work(payload) == (1500, 20) and payload.endswith(b"data")


def new_session(**options):
    config = ServerConfig(**options)
    stats = Stats("unit", config.max_conns)
    return open_session(config, stats), stats


def replies(session, data: bytes) -> list[tuple[int, bytes]]:
    out = b"".join(request.run() for request in session.feed(data))
    return FrameDecoder().feed(out)


def test_session_answers_in_order_and_counts():
    session, stats = new_session()
    stream = (protocol.encode(ECHO, b"a") + protocol.encode(PING, b"id") + protocol.encode_work(0, 0, b"w")
              + protocol.encode(ECHO, b"b"))
    assert replies(session, stream) == [(ECHO, b"a"), (PONG, b"id"), (WORK, struct.pack(">II", 0, 0) + b"w"),
                                        (ECHO, b"b")]
    assert stats.requests_total == 4 and stats.bytes_in == len(stream)


@given(st.lists(st.binary(max_size=100), min_size=1, max_size=20), st.lists(st.integers(min_value=0), max_size=5))
def test_echo_hot_path_answers_and_counts_like_the_decoder(payloads, cuts):
    stream = b"".join(protocol.encode(ECHO, p) for p in payloads)
    session, stats = new_session()
    answered = b"".join(r.run() for chunk in chunked(stream, cuts) for r in session.feed(chunk))
    assert answered == stream             # an ECHO reply is its request
    assert stats.requests_total == len(payloads) and stats.bytes_in == stats.bytes_out == len(stream)
    assert session.frame_started is None and not session.decoder.mid_frame


def test_session_coalesces_immediate_replies_and_splits_at_work():
    session, _ = new_session()
    stream = protocol.encode(ECHO, b"1") * 3 + protocol.encode_work(5000, 7) + protocol.encode(ECHO, b"2")
    requests = session.feed(stream)
    assert [(r.io_s, r.cpu_us) for r in requests] == [(0, 0), (0.005, 7), (0, 0)]


def test_stats_reply_counts_itself_and_the_requests_before_it():
    session, _ = new_session()
    [(_, _), (op, payload)] = replies(session, protocol.encode(ECHO, b"x") + protocol.encode(STATS))
    counters = json.loads(payload)
    assert op == STATS and counters["requests_total"] == 2 and counters["backend"] == "unit"


def test_protocol_error_answers_earlier_frames_then_error_and_closes():
    session, stats = new_session()
    got = replies(session, protocol.encode(ECHO, b"x") + protocol.encode(0x42))
    assert got == [(ECHO, b"x"), (ERROR, b"unknown op 0x42")]
    assert session.closing and stats.protocol_errors == 1


def test_deadline_is_frame_timeout_while_mid_frame(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("servers.session.time.monotonic", lambda: now[0])
    session, stats = new_session(idle_timeout=60, frame_timeout=10)
    assert session.deadline == 160.0
    session.feed(protocol.encode(ECHO, b"abc")[:3])
    assert session.deadline == 110.0
    now[0] = 110.5
    assert session.expire() == protocol.encode(ERROR, b"frame timeout")
    assert stats.frame_timeouts == 1 and session.closing


def test_raw_session_echoes_bytes():
    session, stats = new_session(protocol="raw")
    assert isinstance(session, RawSession)
    assert [r.run() for r in session.feed(b"\x00\x00garbage")] == [b"\x00\x00garbage"]
    assert session.expire() == b"" and stats.idle_timeouts == 1


def test_stats_cap_rejects_over_max_conns():
    stats = Stats("unit", max_conns=1)
    assert stats.try_open() and not stats.try_open()
    stats.closed()
    assert stats.try_open()
    assert stats.connections_rejected == 1 and stats.connections_total == 2


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="max-conns"):
        ServerConfig(max_conns=0)
    assert ServerConfig(max_conns=5, idle_timeout=1.5).argv() == ["--max-conns", "5", "--idle-timeout", "1.5"]


def test_token_bucket_delay_spaces_requests_at_the_rate():
    from conclab.servers.session import TokenBucket
    bucket = TokenBucket(rate=10, burst=2, now=0.0)
    waits = [bucket.delay_for(0.0) for _ in range(5)]
    assert waits == pytest.approx([0, 0, 0.1, 0.1, 0.1])
    assert bucket.delay_for(10.0) == 0          # a long pause refills the bucket


def test_rate_limit_reject_mode_answers_rate_limited_and_stays_open():
    session, stats = new_session(rate_limit=1000, burst=2, rate_limit_mode="reject")
    got = replies(session, protocol.encode(PING) * 4)
    assert got == [(PONG, b""), (PONG, b""), (ERROR, b"rate limited"), (ERROR, b"rate limited")]
    assert not session.closing and stats.rate_limited == 2 and stats.requests_total == 2


def test_rate_limit_delay_mode_adds_waits_in_order():
    session, _ = new_session(rate_limit=100, burst=1)
    requests = session.feed(protocol.encode(ECHO, b"a") * 3)
    assert [r.io_s for r in requests] == pytest.approx([0, 0.01, 0.01])
