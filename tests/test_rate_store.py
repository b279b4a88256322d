"""The shared rate limit served end to end: a backend against a real redis-server.

docs/ratelimit.md: ``--rate-limit-store redis://HOST:PORT`` keeps the token
bucket in Redis, ``--rate-limit-scope client`` gives all of a client's
connections one bucket, ``--rate-limit-on-error`` decides when Redis is gone.
What is checked, over real sockets:

1. two connections of one client with scope client share one bucket: in
   reject mode with burst B they get B replies together, not 2B (with the
   memory store too: a per-process map of client buckets);
2. two server processes sharing one Redis give one client R requests/s in
   total, not 2R: N requests in delay mode take at least (N - B) / R seconds
   (a lower bound the bucket guarantees, not a speed measurement);
3. Redis killed mid-run: replies keep coming (allow) or are ERROR "rate
   limited" (deny), every such request counted in ``rate_store_errors``,
   no crash; Redis restarted on the same port (with an empty script cache):
   verdicts come from Redis again (the NOSCRIPT fallback loaded the script).

The backends are one parameter, ``BACKENDS``: the place to add a backend once
it serves the store. ``serve`` starts one the way its options reach it.
"""
from __future__ import annotations

import threading
import time

import pytest

import redis_server as redis_fixture
from conclab.servers import protocol
from conclab.servers.client import Client
from conclab.servers.golang import build
from conclab.servers.launcher import ServerProcess, wait_until
from conclab.servers.redis_bucket import BUCKET_SHA

pytestmark = pytest.mark.live

BACKENDS = ["go"]                  # the backends that serve --rate-limit-store/--rate-limit-scope/--rate-limit-on-error
redis_server = redis_fixture.redis_server      # the module fixture: a real redis-server (tests/redis_server.py)
NEVER_REFILLS = "0.001"            # tokens/s: none comes back during a test, so a count of replies is exact
GENEROUS_S = 10.0                  # a bound only a broken server or Redis reaches on a busy shared machine


def serve(backend: str, *options: str) -> ServerProcess:
    """The backend listening on a free loopback port. go is started as its own binary, which parses the
    options itself (servers/go/config.go); the other backends through the lab's CLI."""
    if backend == "go":
        return ServerProcess.command([build(), "--port", "0", *options], name="go")
    return ServerProcess(backend, options)


@pytest.fixture
def redis(redis_server):
    """The module's redis-server, running and empty: buckets of an earlier test do not leak into this one."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.call("FLUSHALL")
    return redis_server


def replies(clients: list[Client], count: int) -> tuple[int, int]:
    """Send ``count`` ECHOs, alternating over ``clients``: (echoed, rate limited)."""
    echoed = limited = 0
    for i in range(count):
        op, payload = clients[i % len(clients)].request(protocol.ECHO, b"x")
        if op == protocol.ECHO:
            echoed += 1
        else:
            assert (op, payload) == (protocol.ERROR, b"rate limited"), f"request {i}: {op:#x} {payload!r}"
            limited += 1
    return echoed, limited


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("store", ["memory", "redis"])
@pytest.mark.parametrize("scope, buckets", [("client", 1), ("connection", 2)])
def test_connections_of_one_client_share_one_bucket(backend, store, scope, buckets, redis):
    burst = 4
    url = redis.url if store == "redis" else "memory"
    with serve(backend, "--rate-limit", NEVER_REFILLS, "--burst", str(burst), "--rate-limit-mode", "reject",
               "--rate-limit-store", url, "--rate-limit-scope", scope) as server:
        with Client((server.host, server.port)) as first, Client((server.host, server.port)) as second:
            echoed, limited = replies([first, second], 3 * burst)
            stats = second.stats()
    assert (echoed, limited) == (buckets * burst, 3 * burst - buckets * burst), f"scope {scope}, store {store}"
    assert stats["rate_limited"] == limited
    assert stats["rate_store_calls"] == (3 * burst if store == "redis" else 0)     # STATS asks no one
    assert stats["rate_store_errors"] == 0
    assert stats["rate_limit_store"] == url and stats["rate_limit_scope"] == scope


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_servers_sharing_redis_give_a_client_the_rate_once(backend, redis):
    rate, burst, count = 20, 2, 24            # shared: >= (24 - 2) / 20 = 1.1 s; a bucket each: about half that
    options = ("--rate-limit", str(rate), "--burst", str(burst), "--rate-limit-store", redis.url,
               "--rate-limit-scope", "client")
    with serve(backend, *options) as one, serve(backend, *options) as two:
        errors: list[BaseException] = []

        def send_half(server: ServerProcess) -> None:
            try:
                with Client((server.host, server.port)) as client:
                    for _ in range(count // 2):
                        assert client.request(protocol.ECHO, b"x")[0] == protocol.ECHO
            except BaseException as exc:     # reported by the test's thread
                errors.append(exc)

        senders = [threading.Thread(target=send_half, args=(server,)) for server in (one, two)]
        began = time.monotonic()
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(GENEROUS_S)
        took = time.monotonic() - began
        stats = [one.stats(), two.stats()]
    assert not errors and not any(sender.is_alive() for sender in senders), errors
    assert sum(s["rate_store_errors"] for s in stats) == 0, "Redis answered too late (50 ms): the run proves nothing"
    assert sum(s["rate_store_calls"] for s in stats) == count
    bound = (count - burst) / rate
    assert took >= bound, f"{count} requests in {took:.3f} s, under the {bound:.2f} s one shared bucket allows"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("on_error, while_down", [("allow", protocol.ECHO), ("deny", protocol.ERROR)])
def test_redis_gone_then_back(backend, on_error, while_down, redis):
    with serve(backend, "--rate-limit", "1000", "--rate-limit-store", redis.url,
               "--rate-limit-on-error", on_error) as server, Client((server.host, server.port)) as client:
        assert client.request(protocol.ECHO, b"x")[0] == protocol.ECHO
        redis.stop()
        down = 5
        for _ in range(down):
            op, payload = client.request(protocol.ECHO, b"x")
            assert op == while_down and (op == protocol.ECHO or payload == b"rate limited")
        stats = client.stats()                                        # the same connection: it stayed open
        assert stats["rate_store_errors"] == down
        assert stats["rate_limited"] == (down if on_error == "deny" else 0)

        redis.start()                                                 # same port, empty script cache

        def redis_answers() -> bool:
            before = client.stats()["rate_store_errors"]
            op, _ = client.request(protocol.ECHO, b"x")
            return op == protocol.ECHO and client.stats()["rate_store_errors"] == before

        assert wait_until(redis_answers, GENEROUS_S, 0.05), "a restarted Redis is not used again"
        assert redis.call("SCRIPT", "EXISTS", BUCKET_SHA) == [1]     # loaded again after NOSCRIPT
        assert server.alive()
        status, final = server.stop()
    assert status == 0 and final["rate_store_errors"] >= down
