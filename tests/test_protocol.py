"""Unit and property tests of the sans-I/O codec and the Session (no sockets)."""
from __future__ import annotations

import json
import struct
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st

from conclab.servers import protocol
from conclab.servers.config import ServerConfig
from conclab.servers import session as session_module
from conclab.servers.protocol import (AFTER_WORK, AT_ONCE, COUNTERS, ECHO, ERROR, PING, PONG, REQUESTS, STATS, WORK,
                                      BadLength, FrameDecoder, OpRule, PingTooLong, ProtocolError, ShortWork,
                                      UnknownOp)
from conclab.servers.session import RawSession, Request, Session, open_session
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


def test_check_request_returns_the_rule_of_the_table():
    for op, rule in REQUESTS.items():
        valid = protocol.encode_work(0, 0)[5:] if rule.check is protocol.parse_work else b""
        assert protocol.check_request(op, valid) is rule


def test_the_op_table():
    assert REQUESTS == {
        ECHO: OpRule(ECHO, None, AT_ONCE),
        PING: OpRule(PONG, protocol.check_ping, AT_ONCE),
        WORK: OpRule(WORK, protocol.parse_work, AFTER_WORK),
        STATS: OpRule(STATS, None, COUNTERS),
    }
    assert [rule.reply_byte for rule in REQUESTS.values()] == [b"\x01", b"\x03", b"\x04", b"\x05"]
    assert protocol.REQUEST_OPS == set(REQUESTS)
    # echo_frames answers ECHO reads with their own bytes: valid only while the table says so
    assert REQUESTS[ECHO] == OpRule(ECHO, check=None, answer=AT_ONCE)


def test_work_round_trip():
    frame = protocol.encode_work(1500, 20, b"data")
    [(op, payload)] = FrameDecoder().feed(frame)
    assert op == WORK and protocol.parse_work(payload) == (1500, 20) and payload.endswith(b"data")


def new_session(now=0.0, **options):
    config = ServerConfig(**options)
    stats = Stats("unit", config.max_conns)
    return open_session(config, stats, now), stats


def replies(session, data: bytes, now=0.0) -> list[tuple[int, bytes]]:
    out = b"".join(request.run(now) for request in session.feed(data, now))
    return FrameDecoder().feed(out)


def table_verdict(op: int, payload: bytes):
    """(rule, None) if the table accepts this request, else (None, the ProtocolError it earns), from REQUESTS alone."""
    rule = REQUESTS.get(op)
    if rule is None:
        return None, UnknownOp(f"unknown op 0x{op:02x}")
    try:
        if rule.check is not None:
            rule.check(payload)
    except ProtocolError as exc:
        return None, exc
    return rule, None


@settings(max_examples=500)
@given(st.integers(min_value=0, max_value=255), st.binary(max_size=100))
def test_the_op_table_decides_check_request_and_the_session_reply(op, payload):
    rule, problem = table_verdict(op, payload)
    if problem is None:
        assert protocol.check_request(op, payload) is rule
    else:
        with pytest.raises(type(problem)) as raised:
            protocol.check_request(op, payload)
        assert str(raised.value) == str(problem)

    session, stats = new_session(now=5.0)
    requests = session.feed(protocol.encode(op, payload), 5.0)
    got = FrameDecoder().feed(b"".join(request.reply for request in requests))   # not run: WORK may ask for hours
    if problem is not None:
        assert got == [(ERROR, str(problem).encode())] and session.closing and stats.protocol_errors == 1
    elif rule.answer == COUNTERS:
        [(reply_op, counters)] = got
        assert reply_op == rule.reply and json.loads(counters)["requests_total"] == 1
    else:
        assert got == [(rule.reply, payload)] and not session.closing and stats.requests_total == 1
        [request] = requests
        io_us, cpu_us = protocol.parse_work(payload) if rule.answer == AFTER_WORK else (0, 0)
        assert (request.io_s, request.cpu_us) == (io_us / 1e6, cpu_us)


@given(st.lists(st.tuples(st.sampled_from(sorted(REQUESTS)), st.binary(max_size=64)), max_size=20))
def test_session_replies_to_a_pipeline_as_the_table_says_in_order(frames):
    frames = [(op, protocol.encode_work(0, 0, payload)[5:] if op == WORK else payload) for op, payload in frames]
    session, _ = new_session()
    got = replies(session, b"".join(protocol.encode(op, payload) for op, payload in frames))
    assert len(got) == len(frames)
    for (reply_op, reply_payload), (op, payload) in zip(got, frames):
        rule = REQUESTS[op]
        assert reply_op == rule.reply and (rule.answer == COUNTERS or reply_payload == payload)


def test_a_new_row_in_the_table_is_a_new_request_for_check_request_and_the_session(monkeypatch):
    def check_even(payload):
        if len(payload) % 2:
            raise ProtocolError(f"odd payload of {len(payload)} bytes")
    monkeypatch.setitem(REQUESTS, 0x06, OpRule(0x07, check_even))
    assert protocol.check_request(0x06, b"ab") is REQUESTS[0x06]
    session, _ = new_session()
    assert replies(session, protocol.encode(0x06, b"ab")) == [(0x07, b"ab")]
    assert replies(session, protocol.encode(0x06, b"abc")) == [(ERROR, b"odd payload of 3 bytes")]
    monkeypatch.setitem(REQUESTS, PING, OpRule(ECHO))           # and a changed row changes the answer
    assert replies(new_session()[0], protocol.encode(PING, b"x" * 100)) == [(ECHO, b"x" * 100)]


def test_the_session_reads_no_clock():
    names = set()
    for cls in (Session, RawSession, Request, session_module.TokenBucket):
        for member in vars(cls).values():
            code = getattr(getattr(member, "fget", member), "__code__", None)
            if code is not None:
                names |= set(code.co_names)
    assert "monotonic" not in names and "time" not in names     # time comes in as `now`; only burn() reads one


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
    answered = b"".join(r.run(1.0) for chunk in chunked(stream, cuts) for r in session.feed(chunk, 1.0))
    assert answered == stream             # an ECHO reply is its request
    assert stats.requests_total == len(payloads) and stats.bytes_in == stats.bytes_out == len(stream)
    assert session.frame_started is None and not session.decoder.mid_frame


def test_session_coalesces_immediate_replies_and_splits_at_work():
    session, _ = new_session()
    stream = protocol.encode(ECHO, b"1") * 3 + protocol.encode_work(5000, 7) + protocol.encode(ECHO, b"2")
    requests = session.feed(stream, 0.0)
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


def test_deadline_is_frame_timeout_while_mid_frame():
    session, stats = new_session(now=100.0, idle_timeout=60, frame_timeout=10)
    assert session.deadline == 160.0
    session.feed(protocol.encode(ECHO, b"abc")[:3], 100.0)
    assert session.deadline == 110.0
    assert session.timeout(104.0) == 6.0 and not session.expired(109.9) and session.expired(110.0)
    assert session.expire(110.5) == protocol.encode(ERROR, b"frame timeout")
    assert stats.frame_timeouts == 1 and session.closing


def test_deadlines_follow_the_times_passed_in():
    session, stats = new_session(now=1000.0, idle_timeout=60, frame_timeout=10)
    replies(session, protocol.encode(ECHO, b"a"), now=1010.0)       # a whole frame: idle from then
    assert session.deadline == 1070.0
    frame = protocol.encode(ECHO, b"abc")
    session.feed(frame[:5], 1020.0)                                 # a frame starts: 10 s to finish it
    assert session.deadline == 1030.0
    session.feed(frame[5:], 1025.0)                                 # finished: idle again
    assert session.deadline == 1085.0 and session.frame_started is None
    assert session.timeout(1084.9999) == 0.001                      # never 0 (non-blocking to a socket)
    assert session.expire(1085.0) == protocol.encode(ERROR, b"idle timeout") and stats.idle_timeouts == 1


def test_a_reply_that_waited_restarts_the_idle_timeout_when_it_goes_out():
    session, _ = new_session(now=0.0, idle_timeout=1.0)
    [work] = session.feed(protocol.encode_work(5_000_000, 2000), 0.5)   # waits 5 s, computes 2 ms
    assert session.deadline == 1.5                                  # backends never expire a busy connection
    work.run(5.5)                                                   # its wait ended at 5.5
    assert session.deadline == pytest.approx(6.502)                 # out after its 2 ms of computing
    session.replied(3.0)
    assert session.deadline == pytest.approx(6.502)                 # a late word of an earlier reply moves nothing


def test_raw_session_echoes_bytes():
    session, stats = new_session(protocol="raw")
    assert isinstance(session, RawSession)
    assert [r.run(3.0) for r in session.feed(b"\x00\x00garbage", 3.0)] == [b"\x00\x00garbage"]
    assert session.deadline == 63.0
    assert session.expire(63.0) == b"" and stats.idle_timeouts == 1


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
    requests = session.feed(protocol.encode(ECHO, b"a") * 3, 0.0)
    assert [r.io_s for r in requests] == pytest.approx([0, 0.01, 0.01])
    later = session.feed(protocol.encode(ECHO, b"b"), 1.0)         # a second on: the bucket refilled
    assert [r.io_s for r in later] == [0]


@pytest.mark.parametrize("limits", [{}, {"rate_limit": 100, "burst": 1}])
def test_bytes_in_counts_reads_that_complete_no_frame(limits):
    """A frame split over reads: every byte counts when it arrives, with a rate limit or without."""
    session, stats = new_session(**limits)
    frame = protocol.encode(ECHO, b"x" * 100)
    assert session.feed(frame[:50], 0.0) == []
    assert stats.bytes_in == 50
    session.feed(frame[50:], 0.0)
    assert stats.bytes_in == len(frame) and stats.requests_total == 1


def test_rate_limit_never_delays_a_counters_request():
    session, _ = new_session(rate_limit=1, burst=1)
    requests = session.feed(protocol.encode(PING) * 2 + protocol.encode(STATS), 0.0)
    assert [r.io_s for r in requests] == pytest.approx([0, 1.0, 0])


@given(st.lists(st.tuples(st.sampled_from([ECHO, PING, STATS, WORK]), st.binary(max_size=40)), max_size=12),
       st.lists(st.integers(min_value=0), max_size=8), st.booleans())
def test_any_chunking_of_a_pipeline_gets_the_replies_of_the_whole_stream(frames, cuts, echo_first):
    """The echo hot path (in feed, or Session.echo offered each read first) and the decoder agree on every
    read: whole, split mid-frame, or mixed with other ops."""
    frames = [(op, protocol.encode_work(0, 0, payload)[5:] if op == WORK else payload) for op, payload in frames]
    stream = b"".join(protocol.encode(op, payload) for op, payload in frames)
    session, stats = new_session()
    out = []
    for chunk in chunked(stream, cuts):
        reply = session.echo(chunk, 0.0) if echo_first else None
        if reply is not None:
            assert reply is chunk and protocol.echo_frames(chunk) > 0
            out.append(reply)
        else:
            out += [request.run(0.0) for request in session.feed(chunk, 0.0)]
        assert (session.frame_started is None) == (not session.decoder.mid_frame)   # what the hot path reads
    got = FrameDecoder().feed(b"".join(out))
    assert [(op, payload) for op, payload in got if op != STATS] == [
        (REQUESTS[op].reply, payload) for op, payload in frames if op != STATS]
    assert stats.requests_total == len(frames) and stats.bytes_in == len(stream)


def test_the_decoder_keeps_a_copy_of_a_started_frame_not_the_callers_buffer():
    decoder = FrameDecoder()
    frame = protocol.encode(ECHO, b"payload")
    chunk = bytearray(frame[:6])
    assert decoder.feed(chunk) == [] and decoder.mid_frame
    chunk[:] = b"\xff" * 6                              # a caller reusing its receive buffer
    assert decoder.feed(memoryview(frame)[6:]) == [(ECHO, b"payload")]
    assert not decoder.mid_frame and decoder._pending == b""   # nothing held between frames


def test_an_immediate_reply_is_a_request_with_no_wait():
    reply = session_module.Reply(b"bytes")
    assert isinstance(reply, Request) and (reply.io_s, reply.cpu_us, reply.session) == (0.0, 0, None)
    assert reply.run(1.0) == b"bytes"


@pytest.mark.parametrize("backend", ["threads", "threadpool", "epoll", "asyncio", "uvloop", "gevent"])
def test_stats_count_a_read_the_same_in_every_backend(backend):
    stats = Stats(backend, 10)
    stats.record(2, 10, 12)
    stats.record(1, 5, 5)
    counters = stats.snapshot()
    assert (counters["requests_total"], counters["bytes_in"], counters["bytes_out"]) == (3, 15, 17)


def test_threaded_backends_count_under_the_lock():
    import threading
    stats = Stats("threads", 10)
    with stats.lock:
        writer = threading.Thread(target=stats.record, args=(1, 1, 1))
        writer.start()
        writer.join(0.05)
        assert writer.is_alive() and stats.requests_total == 0    # waits for the lock
    writer.join(5)
    assert stats.requests_total == 1


def test_echo_answers_only_whole_echo_frames_and_leaves_the_rest_to_feed():
    session, stats = new_session(now=0.0)
    two = protocol.encode(ECHO, b"a") + protocol.encode(ECHO, b"bc")
    assert session.echo(two, 5.0) is two and stats.requests_total == 2 and session.deadline == 65.0
    for other in (protocol.encode(PING, b"a"), two[:-1], protocol.encode(ECHO, b"a") + protocol.encode(PING)):
        assert session.echo(other, 9.0) is None
    assert stats.requests_total == 2 and stats.bytes_in == len(two) and session.deadline == 65.0   # nothing done
    limited, _ = new_session(rate_limit=10)
    assert limited.echo(two, 0.0) is None                    # every request takes a token: feed
    raw, raw_stats = new_session(protocol="raw")
    assert raw.echo(b"\x00any", 1.0) == b"\x00any" and raw_stats.requests_total == 1
