"""The shared token bucket in Redis (servers/redis_bucket.py).

Unit: the sans-I/O RESP2 codec (any replies, cut anywhere, decode as they were
encoded), the URL, the keys, the verdicts and the on-error rule. Live, against a
real redis-server (tests/redis_server.py): the Lua script is ``TokenBucket``
for any sequence of times (the script driven by ``now``, its stored state
compared to the last bit), concurrent callers never take more than one bucket
holds, the NOSCRIPT fallback, idle buckets expire, and Redis gone, stalled and
back: the on-error verdict within the timeout, counted, then tokens again; and
the same waits for Redis on gevent's hub, not blocking it.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import signal
import socket
import re
import threading
import time
from pathlib import Path

import gevent
import gevent.lock
import gevent.socket
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import redis_server as redis_fixture
from conclab.servers import redis_bucket as rb
from conclab.servers import protocol
from conclab.servers.launcher import ServerProcess, free_port, wait_until
from conclab.servers import golang
from conclab.servers.redis_bucket import (BUCKET_SCRIPT, BUCKET_SHA, AsyncBucketClient, BlockingBucketClient,
                                          BucketCall, Gate, RedisAddress, RespError, RespProtocolError,
                                          RespReader, StoreError, Verdict, command, parse_url, reply)
from conclab.servers.session import TokenBucket

redis_server = redis_fixture.redis_server      # the module fixture: a real redis-server (tests/redis_server.py)
GENEROUS_S = 5.0           # a timeout that only a broken Redis or client reaches, on a busy shared machine
_keys = itertools.count()


def fresh_key(name: str) -> str:
    return f"{rb.KEY_PREFIX}test:{name}:{next(_keys)}"


# ---------------------------------------------------------------- unit: the RESP2 codec

line_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20)
scalars = st.one_of(line_text, line_text.map(RespError), st.integers(-2**63, 2**63 - 1),
                    st.binary(max_size=40), st.none())
replies = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5), max_leaves=20)


@given(values=st.lists(replies, min_size=1, max_size=6), data=st.data())
@settings(max_examples=300, deadline=None)
def test_any_replies_cut_anywhere_decode_as_encoded(values, data):
    stream = b"".join(reply(value) for value in values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader, decoded = RespReader(), []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        decoded += reader.feed(stream[start:end])
    assert decoded == values
    assert not reader.buffer


def test_a_reply_arrives_byte_by_byte():
    reader, decoded = RespReader(), []
    for byte in reply([b"ab", 7, None, [RespError("ERR x")], "OK"]):
        decoded += reader.feed(bytes([byte]))
    assert decoded == [[b"ab", 7, None, [RespError("ERR x")], "OK"]]


def test_nil_array_and_empty_values():
    assert RespReader().feed(b"*-1\r\n$0\r\n\r\n*0\r\n+\r\n") == [None, b"", [], ""]


def test_error_replies_are_values_not_raised():
    [error] = RespReader().feed(b"-NOSCRIPT No matching script.\r\n")
    assert isinstance(error, RespError) and error.kind == "NOSCRIPT"


@pytest.mark.parametrize("garbage", [b"?what\r\n", b":12x\r\n", b"$3\r\nabcXY"])
def test_bytes_that_are_not_resp_raise(garbage):
    with pytest.raises(RespProtocolError):
        RespReader().feed(garbage)


def test_command_is_an_array_of_bulk_strings():
    assert command("PING") == b"*1\r\n$4\r\nPING\r\n"
    assert command("EVALSHA", b"\x00\r\n", 1, 0.1) == b"*4\r\n$7\r\nEVALSHA\r\n$3\r\n\x00\r\n\r\n$1\r\n1\r\n$3\r\n0.1\r\n"
    assert RespReader().feed(command("SET", "k", 2.5)) == [[b"SET", b"k", b"2.5"]]   # Redis reads what we write


def test_command_refuses_what_redis_cannot_take():
    with pytest.raises(TypeError):
        command("SET", "k", True)
    with pytest.raises(TypeError):
        command("SET", "k", None)


# ---------------------------------------------------------------- unit: settings, keys, verdicts

@pytest.mark.parametrize("url, address", [
    ("redis://127.0.0.1:6379", RedisAddress("127.0.0.1", 6379, 0)),
    ("redis://cache.example:7000/3", RedisAddress("cache.example", 7000, 3)),
    ("redis://[::1]:6380/0", RedisAddress("::1", 6380, 0)),
    ("redis://localhost:1/", RedisAddress("localhost", 1, 0)),
])
def test_redis_urls(url, address):
    assert parse_url(url) == address


@pytest.mark.parametrize("url, says", [
    ("http://127.0.0.1:6379", "expected redis://HOST:PORT[/DB]"),
    ("127.0.0.1:6379", "expected redis://HOST:PORT[/DB]"),
    ("redis://127.0.0.1", "a host and a port are needed"),
    ("redis://:6379", "a host and a port are needed"),
    ("redis://127.0.0.1:http", "the port is not a number"),
    ("redis://127.0.0.1:70000", "the port is not a number"),
    ("redis://127.0.0.1:0", "port 0"),
    ("redis://127.0.0.1:6379/one", "the database is a number"),
    ("redis://user:secret@127.0.0.1:6379", "no user, password"),
    ("redis://127.0.0.1:6379/0?timeout=1", "no user, password"),
])
def test_bad_redis_urls_say_what_is_wrong_in_one_line(url, says):
    with pytest.raises(ValueError) as error:
        parse_url(url)
    message = str(error.value)
    assert says in message and "\n" not in message and message.startswith("--rate-limit-store")


def test_keys_per_connection_and_per_client():
    first, second = rb.new_connection_id(), rb.new_connection_id()
    assert first != second and f":{os.getpid()}:" in first
    assert rb.bucket_key("connection", "10.0.0.7", first) == "conclab:bucket:" + first
    assert rb.bucket_key("client", "10.0.0.7", first) == "conclab:bucket:10.0.0.7"
    with pytest.raises(ValueError, match="choose connection or client"):
        rb.bucket_key("host", "10.0.0.7", first)


def test_script_replies_become_verdicts():
    assert rb.verdict(1, "reject") == Verdict(True) and rb.verdict(0, "reject") == Verdict(False)
    assert rb.verdict(0, "delay") == Verdict(True, 0.0)
    assert rb.verdict(2500, "delay") == Verdict(True, 0.0025)


def test_the_on_error_rule():
    assert rb.on_error("allow") == Verdict(True, 0.0, True)
    assert rb.on_error("deny") == Verdict(False, 0.0, True)
    assert rb.DEFAULT_ON_ERROR == "allow"
    with pytest.raises(ValueError, match="choose allow or deny"):
        rb.on_error("maybe")


def test_a_call_asks_evalsha_and_reads_its_answer():
    call = BucketCall(10.0, 5.0, "delay")
    assert RespReader().feed(call.request("k", now=1.5)) == [
        [b"EVALSHA", BUCKET_SHA.encode(), b"1", b"k", b"10.0", b"5.0", b"delay", b"1.5"]]
    assert call.answer(RespError("NOSCRIPT No matching script. Please use EVAL.")) is None
    assert call.answer(100_000) == Verdict(True, 0.1)
    with pytest.raises(StoreError, match="WRONGTYPE"):
        call.answer(RespError("WRONGTYPE Operation against a key holding the wrong kind of value"))
    with pytest.raises(StoreError):
        call.answer(b"1")
    assert RespReader().feed(BucketCall.LOAD) == [[b"SCRIPT", b"LOAD", BUCKET_SCRIPT.encode()]]


@pytest.mark.parametrize("rate, burst, mode", [(0, 1, "delay"), (1, 0.5, "delay"), (1, 1, "drop")])
def test_a_call_refuses_a_bucket_that_cannot_work(rate, burst, mode):
    with pytest.raises(ValueError):
        BucketCall(rate, burst, mode)


def test_the_go_server_runs_the_same_script():
    """One script for both: the go server embeds servers/go/bucket.lua, the file BUCKET_SCRIPT is read from,
    and the go build's source hash covers it (editing the script rebuilds the server)."""
    go_dir = Path(rb.__file__).with_name("go")
    source = (go_dir / "redis.go").read_text()
    assert "//go:embed bucket.lua\nvar bucketScript string" in source
    assert (go_dir / "bucket.lua").read_text() == BUCKET_SCRIPT
    assert go_dir / "bucket.lua" in golang.source_files()


def test_the_gate_allows_one_try_per_interval():
    clock = [100.0]
    gate = Gate(0.1, clock=lambda: clock[0])
    assert gate.may_try()
    gate.failed()
    assert not gate.may_try()
    clock[0] += 0.099
    assert not gate.may_try()
    clock[0] += 0.002
    assert gate.may_try()


def test_nobody_listening_gives_the_on_error_verdict_counted():
    """A refused connection (a port nobody listens on) is a failure like any other; no process needed."""
    client = BlockingBucketClient(f"redis://127.0.0.1:{free_port()}", 10, 1, "reject", on_error_policy="deny")
    assert client.take("k") == Verdict(False, 0.0, True)
    assert client.take("k") == Verdict(False, 0.0, True)          # within the interval: no new connect
    assert (client.failures, client.connects) == (2, 1)


def test_one_stalled_call_holds_up_only_itself():
    """The blocking client's pool: while one thread's call hangs on a Redis connection that never answers,
    another thread's call goes out on a second connection and gets its verdict. (A fake Redis in a thread:
    its first connection swallows what it reads, the others answer every call with 1.)"""
    listener = socket.create_server(("127.0.0.1", 0))
    stalled, stop = threading.Event(), threading.Event()

    def fake_redis():
        first = True
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:                 # closed: the test is over
                return
            threading.Thread(target=serve_one, args=(conn, first), daemon=True).start()
            first = False

    def serve_one(conn, swallow):
        with conn, contextlib.suppress(OSError):
            while conn.recv(65536):
                if swallow:
                    stalled.set()
                else:
                    conn.sendall(reply(1))

    threading.Thread(target=fake_redis, daemon=True).start()
    client = BlockingBucketClient(f"redis://127.0.0.1:{listener.getsockname()[1]}", 10, 1, "reject",
                                  timeout=GENEROUS_S)
    slow = threading.Thread(target=client.take, args=("slow",), daemon=True)
    slow.start()
    assert stalled.wait(GENEROUS_S)
    assert client.take("fast") == Verdict(True)
    assert slow.is_alive(), "the stalled call ended first: the test proves nothing"
    stop.set()
    listener.close()
    assert (client.calls, client.connects) == (2, 2)


# ---------------------------------------------------------------- live: the script is TokenBucket

steps = st.lists(st.one_of(st.just(0.0), st.floats(0.0, 0.05), st.floats(0.0, 3.0)), min_size=1, max_size=25)


@pytest.mark.live
@given(rate=st.floats(0.5, 2000.0), burst=st.floats(1.0, 40.0), mode=st.sampled_from(rb.MODES),
       start=st.floats(0.0, 1e6), gaps=steps)
@settings(max_examples=100, deadline=None)
def test_the_lua_bucket_is_the_token_bucket(redis_server, rate, burst, mode, start, gaps):
    client = BlockingBucketClient(redis_server.url, rate, burst, mode, timeout=GENEROUS_S)
    key, now, bucket = fresh_key("model"), start, None
    for gap in gaps:
        now += gap
        bucket = bucket or TokenBucket(rate, burst, now)     # Redis makes a bucket at its first request
        got = client.take(key, now=now)
        if mode == "reject":
            assert got == Verdict(bucket.available(now))
        else:
            assert got == rb.verdict(math.floor(bucket.take(now) * 1e6 + 0.5), "delay")
        state = dict(zip(*[iter(redis_server.call("HGETALL", key))] * 2))
        assert set(state) == {b"tokens", b"stamp"}
        assert (float(state[b"tokens"]), float(state[b"stamp"])) == (bucket.tokens, bucket.stamp)
    assert client.failures == 0
    client.close()


@pytest.mark.live
def test_a_clock_stepped_back_counts_as_no_time(redis_server):
    """Redis's TIME is a wall clock: after a step back the bucket neither drains nor waits for the old clock."""
    rejecting = BlockingBucketClient(redis_server.url, 10.0, 2.0, "reject", timeout=GENEROUS_S)
    key = fresh_key("step-back")
    assert [rejecting.take(key, now=100.0).admitted for _ in range(3)] == [True, True, False]
    assert rejecting.take(key, now=40.0) == Verdict(False)       # sixty seconds back: no time passed
    assert rejecting.take(key, now=40.5) == Verdict(True)        # half a second on the new clock: refilled

    delaying = BlockingBucketClient(redis_server.url, 10.0, 2.0, "delay", timeout=GENEROUS_S)
    key = fresh_key("step-back-delay")
    assert [delaying.take(key, now=100.0).wait_s for _ in range(3)] == [0.0, 0.0, 0.1]
    assert delaying.take(key, now=40.0).wait_s == 0.2              # the debt is two tokens: 0.2 s from now


# ---------------------------------------------------------------- live: concurrent callers

THREADS, PER_THREAD = 8, 60


def hammer(url, key, rate, burst, mode, now=None) -> list[Verdict]:
    """THREADS threads, each with its own connection, take PER_THREAD tokens from one key at once."""
    verdicts: list[Verdict] = []
    lock, go = threading.Lock(), threading.Barrier(THREADS)

    def worker():
        client = BlockingBucketClient(url, rate, burst, mode, timeout=GENEROUS_S)
        go.wait()
        mine = [client.take(key, now=now) for _ in range(PER_THREAD)]
        client.close()
        with lock:
            verdicts.extend(mine)
    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not any(v.store_failed for v in verdicts), "a call failed: the counts below would mean nothing"
    return verdicts


@pytest.mark.live
def test_concurrent_callers_take_exactly_one_buckets_tokens(redis_server):
    """At one instant (a driven clock), 8 x 60 calls: reject admits exactly the burst; delay
    admits the burst at once and queues every other request exactly 1/rate after the one before."""
    rate, burst, now, total = 50.0, 25.0, 1000.0, THREADS * PER_THREAD
    rejected = hammer(redis_server.url, fresh_key("atomic-reject"), rate, burst, "reject", now)
    one = TokenBucket(rate, burst, now)
    assert sum(v.admitted for v in rejected) == sum(one.available(now) for _ in range(total)) == burst

    delayed = hammer(redis_server.url, fresh_key("atomic-delay"), rate, burst, "delay", now)
    one = TokenBucket(rate, burst, now)
    expected = sorted(rb.verdict(math.floor(one.take(now) * 1e6 + 0.5), "delay").wait_s for _ in range(total))
    assert sorted(v.wait_s for v in delayed) == expected
    # from now: the burst at once, then each request one token's time after the one before it
    assert expected.count(0.0) == burst
    assert all(math.isclose(later - earlier, 1 / rate, abs_tol=2e-6)
               for earlier, later in zip(expected[int(burst) - 1:], expected[int(burst):]))


def redis_time(server) -> float:
    seconds, micros = server.call("TIME")
    return int(seconds) + int(micros) / 1e6


@pytest.mark.live
def test_concurrent_callers_on_redis_time_never_over_admit(redis_server):
    """On Redis's clock: no more than the burst plus what the rate refilled between the first and last call."""
    rate, burst = 200.0, 20.0
    before = redis_time(redis_server)
    verdicts = hammer(redis_server.url, fresh_key("atomic-time"), rate, burst, "reject")
    after = redis_time(redis_server)
    admitted = sum(v.admitted for v in verdicts)
    assert burst <= admitted <= burst + rate * (after - before)


# ---------------------------------------------------------------- live: script cache, expiry, database

@pytest.mark.live
def test_noscript_loads_the_script_and_retries(redis_server):
    client = BlockingBucketClient(redis_server.url, 10, 5, "reject", timeout=GENEROUS_S)
    key = fresh_key("noscript")
    assert client.take(key) == Verdict(True)
    loads = client.script_loads
    assert redis_server.call("SCRIPT", "FLUSH") == "OK"
    assert redis_server.call("SCRIPT", "EXISTS", BUCKET_SHA) == [0]
    assert client.take(key) == Verdict(True)
    assert client.script_loads == loads + 1 and client.failures == 0
    assert redis_server.call("SCRIPT", "EXISTS", BUCKET_SHA) == [1]


@pytest.mark.live
def test_an_idle_bucket_expires_when_it_would_be_full_again(redis_server):
    client = BlockingBucketClient(redis_server.url, 20.0, 4.0, "reject", timeout=GENEROUS_S)
    key = fresh_key("expiry")
    client.take(key)                                  # 3 tokens left: full again in 1 token / 20 per s = 50 ms
    assert 0 < redis_server.call("PTTL", key) <= 50
    assert wait_until(lambda: redis_server.call("EXISTS", key) == 0, GENEROUS_S, 0.01)


@pytest.mark.live
def test_the_url_database_holds_the_buckets(redis_server):
    client = BlockingBucketClient(redis_server.url + "/3", 10, 5, "delay", timeout=GENEROUS_S)
    key = fresh_key("db")
    assert client.take(key) == Verdict(True)
    assert redis_server.call("EXISTS", key, db=3) == 1 and redis_server.call("EXISTS", key) == 0


# ---------------------------------------------------------------- live: Redis gone, stalled, back

@pytest.mark.live
def test_redis_stopped_then_restarted(redis_server):
    """Gone: the on-error verdict at once, counted, one connect per interval; back: tokens again."""
    client = BlockingBucketClient(redis_server.url, 1000, 1000, "reject", on_error_policy="deny",
                                  reconnect_interval=GENEROUS_S * 10)
    key = fresh_key("restart")
    assert client.take(key) == Verdict(True)
    loads = client.script_loads
    redis_server.stop()
    try:
        assert client.take(key) == Verdict(False, 0.0, True)            # the dead connection fails the call
        connects = client.connects
        assert [client.take(key) for _ in range(5)] == [Verdict(False, 0.0, True)] * 5
        assert client.failures == 6 and client.connects == connects    # in the interval: not even a connect
    finally:
        redis_server.start()
    client.gate.interval = 0.1
    client.gate.not_before = 0.0                                       # the long interval has served its purpose
    assert wait_until(lambda: client.take(key) == Verdict(True), GENEROUS_S, 0.02)
    assert client.script_loads == loads + 1                            # a restarted Redis had no script


@pytest.mark.live
def test_redis_stalled_answers_within_the_timeout(redis_server):
    """A Redis that accepts but does not answer (SIGSTOP): the call ends at the timeout with the default, allow."""
    client = BlockingBucketClient(redis_server.url, 10, 1, "reject")
    key = fresh_key("stall")
    assert client.take(key) == Verdict(True)
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        got = client.take(key)
        took = time.monotonic() - started
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert got == Verdict(True, 0.0, True) and client.failures == 1
    assert rb.CALL_TIMEOUT_S * 0.9 <= took < 1.0                       # the timeout, not a hang (generous bound)
    assert wait_until(lambda: client.take(key).store_failed is False, GENEROUS_S, 0.02)


@pytest.mark.live
def test_the_async_client_keeps_the_same_contract(redis_server):
    async def scenario():
        client = AsyncBucketClient(redis_server.url, 1000.0, 10.0, "reject", timeout=GENEROUS_S)
        key = fresh_key("async")
        verdicts = await asyncio.gather(*(client.take(key, now=50.0) for _ in range(30)))
        assert sum(v.admitted for v in verdicts) == 10 and client.connects == 1   # pipelined on one connection
        loads = client.script_loads
        assert redis_server.call("SCRIPT", "FLUSH") == "OK"
        assert await client.take(fresh_key("async")) == Verdict(True) and client.script_loads == loads + 1
        redis_server.stop()
        try:
            client.timeout, client.gate.interval = rb.CALL_TIMEOUT_S, GENEROUS_S * 10
            assert await client.take(key) == Verdict(True, 0.0, True)
            assert await client.take(key) == Verdict(True, 0.0, True)
            assert client.failures == 2
        finally:
            redis_server.start()
        client.gate.not_before = 0.0
        for _ in range(250):                                  # up to 5 s: the connection comes back
            if (await client.take(key)).store_failed is False:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the async client did not reconnect to the restarted Redis")
        assert client.script_loads == loads + 2                # a restarted Redis had no script
        client.close()
    asyncio.run(scenario())


@pytest.mark.live
def test_the_async_client_answers_within_the_timeout_when_redis_stalls(redis_server):
    async def scenario():
        client = AsyncBucketClient(redis_server.url, 10.0, 1.0, "reject", on_error_policy="deny")
        key = fresh_key("async-stall")
        assert await client.take(key) == Verdict(True)
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            got = await client.take(key)
            took = time.monotonic() - started
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        client.timeout = GENEROUS_S
        after = await client.take(fresh_key("async-after-stall"))   # the late reply to the stalled call is not this one's
        return got, took, client.failures, after, client.connects
    got, took, failures, after, connects = asyncio.run(scenario())
    assert got == Verdict(False, 0.0, True) and failures == 1
    assert rb.CALL_TIMEOUT_S * 0.9 <= took < 1.0
    assert after == Verdict(True) and connects == 1                     # the same connection, still in step


@pytest.mark.live
def test_gevent_waits_for_redis_on_the_hub(redis_server):
    """Given gevent's sockets and lock, a stalled Redis parks the greenlet: the others run meanwhile."""
    client = BlockingBucketClient(redis_server.url, 10.0, 1.0, "reject", sockets=gevent.socket,
                                  semaphore=gevent.lock.BoundedSemaphore, timeout=GENEROUS_S)
    key = fresh_key("gevent")
    assert client.take(key) == Verdict(True)        # connected (gevent's resolver starts: not timed)
    client.timeout = rb.CALL_TIMEOUT_S
    ticks = []

    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.001)
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        other = gevent.spawn(ticker)
        got = client.take(key)
        other.kill()
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert got == Verdict(True, 0.0, True)
    assert len(ticks) > 2, "the hub was blocked while the call waited for Redis"


def test_the_blocking_client_and_the_go_server_bound_their_redis_connections_alike():
    """One bound for every model that blocks on Redis (threads, pools, gevent, go): a smaller pool in one of them
    would queue its calls behind each other and the redis_call comparison would measure the pool, not the model."""
    source = (Path(rb.__file__).with_name("go") / "redis.go").read_text()
    bound = re.search(r"redisMaxConns\s*=\s*(\d+)", source)
    assert bound is not None and int(bound.group(1)) == rb.POOL_SIZE


@pytest.mark.live
def test_a_gevent_server_calls_redis_from_its_one_os_thread(redis_server):
    """The store's address is resolved once without gevent's resolver, whose lookups run in a pool of OS
    threads that then stay: the gevent backend keeps the one thread it has without Redis."""
    if redis_server.process is None:
        redis_server.start()
    with ServerProcess("gevent", ["--rate-limit", "1000", "--rate-limit-store", redis_server.url]) as server:
        with server.connect() as client:
            for _ in range(3):
                assert client.request(protocol.ECHO, b"x")[0] == protocol.ECHO
        assert server.stats()["rate_store_calls"] == 3
        assert server.process.num_threads() == 1
