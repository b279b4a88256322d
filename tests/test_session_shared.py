"""The session's side of a shared rate limit (servers/session.py), without a process or a socket.

A bucket that is not the connection's own (docs/ratelimit.md): with a redis
store the session cannot decide, so each rate-limited frame comes out as a
``Gated`` request naming its bucket key, and ``Session.admit`` turns the store's
verdict into the answer; with the memory store and scope client the process's
``ClientBuckets`` decides at once. Either way a delay counts from now (the
bucket is shared), and the connection sequences its own delayed requests.
"""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conclab.servers import protocol
from conclab.servers.config import ServerConfig
from conclab.servers.redis_bucket import KEY_PREFIX, Verdict
from conclab.servers.session import ClientBuckets, Gated, SharedLimit, TokenBucket, open_session, shared_limit
from conclab.servers.stats import Stats

pytestmark = pytest.mark.unit
REDIS = "redis://127.0.0.1:6379"


class FakeStore:
    """Stands for a redis client: counts nothing, is never asked here (the test plays the backend)."""

    calls = failures = 0


def redis_session(stats, peer="10.0.0.7", scope="client", mode="delay", now=0.0):
    config = ServerConfig(rate_limit=10.0, burst=2.0, rate_limit_mode=mode, rate_limit_store=REDIS,
                          rate_limit_scope=scope)
    shared = SharedLimit(config, stats, store=FakeStore())
    return open_session(config, stats, now, peer, shared)


def frames(*ops_payloads) -> bytes:
    return b"".join(protocol.encode(op, payload) for op, payload in ops_payloads)


def limited_session(bucket, stats, rate=10.0, burst=2.0, mode="delay", now=0.0):
    """A rate-limited session whose ``bucket`` is its own, the process's for its client, or in a redis store."""
    if bucket == "own":
        return open_session(ServerConfig(rate_limit=rate, burst=burst, rate_limit_mode=mode), stats, now)
    if bucket == "client":
        config = ServerConfig(rate_limit=rate, burst=burst, rate_limit_mode=mode, rate_limit_scope="client")
        return open_session(config, stats, now, "10.0.0.1", shared_limit(config, stats))
    config = ServerConfig(rate_limit=rate, burst=burst, rate_limit_mode=mode, rate_limit_store=REDIS)
    return open_session(config, stats, now, "10.0.0.1", SharedLimit(config, stats, store=FakeStore()))


def answered(session, request, store_bucket, now):
    """The request the backend sends: a Gated one admitted by the verdict of ``store_bucket`` (the redis
    store's bucket, played here by a TokenBucket) at ``now``, as the store's script would give it."""
    if not request.gated:
        return request
    if session.reject_over_rate:
        return session.admit(request, Verdict(store_bucket.available(now)), now)
    return session.admit(request, Verdict(True, store_bucket.take(now)), now)


def test_with_a_redis_store_each_frame_is_gated_on_its_bucket_key_and_stats_is_not():
    stats = Stats("threads", 10)
    session = redis_session(stats)
    requests = session.feed(frames((protocol.ECHO, b"a"), (protocol.STATS, b""), (protocol.ECHO, b"b")), 0.0)
    assert [request.gated for request in requests] == [True, False, True]
    assert {request.key for request in requests if request.gated} == {KEY_PREFIX + "10.0.0.7"}
    assert stats.requests_total == 1                               # STATS, answered at once; the gated wait


def test_scope_connection_keys_differ_per_connection():
    stats = Stats("threads", 10)
    first, second = (redis_session(stats, scope="connection").feed(frames((protocol.ECHO, b"x")), 0.0)[0]
                     for _ in range(2))
    assert first.key != second.key and first.key.startswith(KEY_PREFIX)


def test_admit_answers_refuses_or_delays_by_the_verdict():
    stats = Stats("threads", 10)
    session = redis_session(stats)
    echo, refused, delayed = session.feed(frames(*[(protocol.ECHO, b"x")] * 3), 5.0)
    assert session.admit(echo, Verdict(True), 5.0).run(5.0) == protocol.encode(protocol.ECHO, b"x")
    assert session.admit(refused, Verdict(False), 5.0).run(5.0) == protocol.encode(protocol.ERROR, b"rate limited")
    assert session.admit(delayed, Verdict(True, 0.25), 5.0).io_s == 0.25
    assert (stats.requests_total, stats.rate_limited) == (2, 1)


def test_a_connections_delays_from_now_are_waited_one_after_another():
    """The store says 0.1 and 0.2 s from now for two frames of one read: the second runs after the first,
    so it waits 0.1 more, not 0.2; a later read waits only what is past the release before it."""
    session = redis_session(Stats("threads", 10))
    first, second = session.feed(frames((protocol.ECHO, b"1"), (protocol.ECHO, b"2")), 1.0)
    assert math.isclose(session.admit(first, Verdict(True, 0.1), 1.0).io_s, 0.1)
    assert math.isclose(session.admit(second, Verdict(True, 0.2), 1.0).io_s, 0.1)
    [third] = session.feed(frames((protocol.ECHO, b"3")), 1.15)
    assert math.isclose(session.admit(third, Verdict(True, 0.15), 1.15).io_s, 0.1)     # 1.30 - 1.20


def test_a_frame_that_breaks_the_protocol_asks_no_store():
    stats = Stats("threads", 10)
    session = redis_session(stats)
    requests = session.feed(frames((protocol.ECHO, b"ok"), (0x7E, b"?")), 0.0)
    assert requests[0].gated and not requests[1].gated
    assert requests[1].run(0.0) == protocol.encode(protocol.ERROR, b"unknown op 0x7e") and session.closing
    assert stats.protocol_errors == 1


def test_a_gated_request_cannot_run_before_its_verdict():
    [request] = redis_session(Stats("threads", 10)).feed(frames((protocol.ECHO, b"x")), 0.0)
    assert isinstance(request, Gated)
    with pytest.raises(RuntimeError):
        request.run(0.0)


def test_memory_scope_client_shares_one_bucket_per_peer_ip():
    config = ServerConfig(rate_limit=0.001, burst=3.0, rate_limit_mode="reject", rate_limit_scope="client")
    stats = Stats("threads", 10)
    shared = shared_limit(config, stats)
    one, two = (open_session(config, stats, 0.0, "10.0.0.1", shared) for _ in range(2))
    other = open_session(config, stats, 0.0, "10.0.0.2", shared)
    echo = frames((protocol.ECHO, b"x"))
    answers = [session.feed(echo, 0.0)[0].run(0.0) for session in (one, two, one, two, other)]
    assert answers.count(echo) == 4 and answers[3] == protocol.encode(protocol.ERROR, b"rate limited")
    assert stats.rate_limited == 1 and stats.snapshot()["rate_store_calls"] == 0


def test_client_buckets_full_again_are_swept():
    clients = ClientBuckets(10.0, 2.0, reject=False, locked=True, now=0.0)
    clients.take("a", 0.0)
    clients.take("b", 0.95)
    assert set(clients.buckets) == {"a", "b"}
    clients.take("c", 1.0)                     # the sweep is due: a refilled by 1.0, b not yet
    assert set(clients.buckets) == {"b", "c"}


def test_a_shared_limit_needs_the_process_side():
    config = ServerConfig(rate_limit=5.0, rate_limit_scope="client")
    with pytest.raises(ValueError, match="SharedLimit"):
        open_session(config, Stats("threads", 10), 0.0, "10.0.0.1")


@given(rate=st.floats(0.5, 2000.0), burst=st.floats(1.0, 40.0),
       gaps=st.lists(st.one_of(st.just(0.0), st.floats(0.0, 0.05), st.floats(0.0, 3.0)), min_size=1, max_size=30))
@settings(max_examples=200, deadline=None)
def test_waits_from_now_sequenced_by_the_session_are_the_own_buckets_delays(rate, burst, gaps):
    """One connection: a shared bucket's wait from now, sequenced by the Session, is what the connection's
    own bucket (delay_for) says; the shared path changes nothing for a client with one connection."""
    own, shared = TokenBucket(rate, burst, 0.0), TokenBucket(rate, burst, 0.0)
    session = redis_session(Stats("threads", 10), now=0.0)
    now = 0.0
    for gap in gaps:
        now += gap
        assert math.isclose(session.delayed(shared.take(now), now), own.delay_for(now), abs_tol=1e-9)


@pytest.mark.parametrize("bucket", ["own", "client", "redis"])
def test_a_decoder_error_after_answered_frames_still_closes_the_connection(bucket):
    """docs/protocol.md section 1, with any bucket: the frames before a bad length are answered (STATS too),
    then ERROR and close; the loop answering frame by frame must not lose the decoder's error."""
    stats = Stats("threads", 10)
    session = limited_session(bucket, stats)
    requests = session.feed(frames((protocol.ECHO, b"a"), (protocol.STATS, b"")) + b"\0\0\0\0", 0.0)
    replies = [answered(session, request, TokenBucket(10.0, 2.0, 0.0), 0.0).run(0.0) for request in requests]
    assert len(replies) == 3 and replies[0] == protocol.encode(protocol.ECHO, b"a")
    assert replies[2] == protocol.encode(protocol.ERROR, f"frame length 0 outside 1..{session.decoder.max_frame}".encode())
    assert session.closing and stats.protocol_errors == 1


SOME_FRAME = st.one_of(
    st.tuples(st.sampled_from([protocol.ECHO, protocol.PING, protocol.STATS, 0x7E]), st.binary(max_size=80)),
    st.tuples(st.just(protocol.WORK), st.integers(0, 50_000).map(lambda io_us: protocol.encode_work(io_us, 0)[5:])))


STATS_REPLY = protocol.REQUESTS[protocol.STATS].reply


def stats_blanked(reply: bytes) -> list:
    """The frames of a reply, a STATS answer's counters left out (a gated request counts when it is admitted)."""
    return [(op, None if op == STATS_REPLY else payload) for op, payload in protocol.FrameDecoder().feed(reply)]


def stats_bytes(reply: bytes) -> int:
    """How many bytes of a reply answer STATS."""
    return sum(len(payload) + 5 for op, payload in protocol.FrameDecoder().feed(reply) if op == STATS_REPLY)


@given(bucket=st.sampled_from(["client", "redis"]), mode=st.sampled_from(["delay", "reject"]),
       rate=st.floats(0.5, 2000.0), burst=st.floats(1.0, 8.0), stream=st.lists(SOME_FRAME, max_size=14),
       bad_length=st.booleans(), cuts=st.lists(st.integers(0, 2_000), max_size=8),
       gaps=st.lists(st.floats(0.0, 1.0), min_size=9, max_size=9))
@settings(max_examples=200, deadline=None)
def test_a_shared_bucket_answers_one_connection_as_its_own_bucket_would(bucket, mode, rate, burst, stream,
                                                                        bad_length, cuts, gaps):
    """Any reads (split anywhere, breaking the protocol or not), one connection: a bucket not its own gives
    the replies, waits and counters its own bucket gives; the two classes share one loop and settle step.
    A frame that breaks the protocol asks no bucket in any of them (ERROR naming the problem, closed)."""
    data = frames(*stream) + (b"\0\0\0\0" if bad_length else b"")
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    reads = [data[start:end] for start, end in zip(points, points[1:])]
    outcomes = []
    for kind in ("own", bucket):
        stats, now, got = Stats("threads", 10), 0.0, []
        session, store_bucket = limited_session(kind, stats, rate, burst, mode), TokenBucket(rate, burst, 0.0)
        for read, gap in zip(reads, gaps):
            now += gap
            for request in session.feed(read, now):
                request = answered(session, request, store_bucket, now)
                got.append((request.io_s, request.run(now)))
            if session.closing:
                break
        session.close()
        stats_out = sum(stats_bytes(reply) for _, reply in got)
        outcomes.append((got, session.closing, stats.requests_total, stats.bytes_in, stats.bytes_out - stats_out,
                         stats.rate_limited, stats.protocol_errors, stats.buffered_bytes))
    (own, *own_counters), (other, *other_counters) = outcomes
    assert other_counters == own_counters
    assert [stats_blanked(reply) for _, reply in other] == [stats_blanked(reply) for _, reply in own]
    assert all(math.isclose(mine, theirs, abs_tol=1e-9) for (mine, _), (theirs, _) in zip(other, own))


def test_the_controls_are_refused_in_go_words():
    for options, message in [
        ({"rate_limit_store": REDIS}, "--rate-limit-store needs --rate-limit"),
        ({"rate_limit_scope": "client"}, "--rate-limit-scope needs --rate-limit"),
        ({"rate_limit": 5.0, "rate_limit_on_error": "deny"},
         "--rate-limit-on-error needs --rate-limit-store redis://HOST:PORT (memory never fails)"),
        ({"rate_limit": 5.0, "rate_limit_store": "redis://h"}, "a host and a port are needed"),
        ({"rate_limit": 5.0, "rate_limit_store": "mem"}, "--rate-limit-store must be memory or redis://"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ServerConfig(**options)


def test_argv_passes_the_controls_on():
    config = ServerConfig(rate_limit=5.0, rate_limit_store=REDIS, rate_limit_scope="client",
                          rate_limit_on_error="deny")
    argv = config.argv()
    for option, value in [("--rate-limit-store", REDIS), ("--rate-limit-scope", "client"),
                          ("--rate-limit-on-error", "deny")]:
        assert argv[argv.index(option) + 1] == value
    assert config.rate_store_label == "redis://127.0.0.1:6379"
