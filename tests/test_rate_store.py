"""The shared rate limit served end to end: every backend against a real redis-server.

docs/ratelimit.md: ``--rate-limit-store redis://HOST:PORT`` keeps the token
bucket in Redis, ``--rate-limit-scope client`` gives all of a client's
connections one bucket, ``--rate-limit-on-error`` decides when Redis is gone.
The same tests run over every variant (the conftest ``variant`` parameter),
over real sockets:

1. two connections of one client with scope client share one bucket: in
   reject mode with burst B they get B replies together, not 2B (with the
   memory store too: a per-process map of client buckets);
2. two server processes sharing one Redis give one client R requests/s in
   total, not 2R: N requests in delay mode take at least (N - B) / R seconds
   (a lower bound the bucket guarantees, not a speed measurement). The Python
   backends run ``--procs 2`` (two connections, each landing on another worker,
   as their STATS pids say); go, which has no --procs, runs as two servers;
3. Redis killed mid-run: replies keep coming (allow) or are ERROR "rate
   limited" (deny), every such request counted in ``rate_store_errors``,
   no crash, no reply lost; Redis restarted on the same port (with an empty
   script cache): verdicts come from Redis again (the NOSCRIPT fallback loaded
   the script).

4. Redis stalled (stopped, its connections open): the on-error verdict after
   the 50 ms deadline, counted, every reply in order; Redis answering again is
   used again.

And a misused control is refused by the Python backends in go's own words.
"""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
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

redis_server = redis_fixture.redis_server      # the module fixture: a real redis-server (tests/redis_server.py)
NEVER_REFILLS = "0.001"            # tokens/s: none comes back during a test, so a count of replies is exact
GENEROUS_S = 10.0                  # a bound only a broken server or Redis reaches on a busy shared machine
WORKER_TRIES = 40                  # connections opened at most to find one on the other --procs worker
ATTEMPTS = 3                       # runs of a timing test at most, until one has no call past the store's deadline


@pytest.fixture
def redis(redis_server):
    """The module's redis-server, running and empty: buckets of an earlier test do not leak into this one."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.call("FLUSHALL")
    return redis_server


def serve(variant, *options: str) -> ServerProcess:
    backend, base = variant
    return ServerProcess(backend, [*base, *options])


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


@pytest.mark.parametrize("store", ["memory", "redis"])
@pytest.mark.parametrize("scope, buckets", [("client", 1), ("connection", 2)])
def test_connections_of_one_client_share_one_bucket(variant, store, scope, buckets, redis):
    burst = 4
    url = redis.url if store == "redis" else "memory"
    with serve(variant, "--rate-limit", NEVER_REFILLS, "--burst", str(burst), "--rate-limit-mode", "reject",
               "--rate-limit-store", url, "--rate-limit-scope", scope) as server:
        with Client((server.host, server.port)) as first, Client((server.host, server.port)) as second:
            echoed, limited = replies([first, second], 3 * burst)
            stats = second.stats()
    assert (echoed, limited) == (buckets * burst, 3 * burst - buckets * burst), f"scope {scope}, store {store}"
    assert stats["rate_limited"] == limited
    assert stats["rate_store_calls"] == (3 * burst if store == "redis" else 0)     # STATS asks no one
    assert stats["rate_store_errors"] == 0
    assert stats["rate_limit_store"] == url and stats["rate_limit_scope"] == scope


@contextlib.contextmanager
def two_processes(variant, *options):
    """Two server processes sharing the options: (address, address) to connect to, and a way to read each
    one's counters. Python backends: one server with --procs 2; go: two servers."""
    backend, _ = variant
    if backend == "go":
        with serve(variant, *options) as one, serve(variant, *options) as two:
            yield [(one.host, one.port), (two.host, two.port)]
    else:
        with serve(variant, *options, "--procs", "2") as server:
            yield [(server.host, server.port)] * 2


def clients_on_two_processes(addresses) -> list[Client]:
    """One connection to each process: the second address is reconnected to until another pid answers."""
    first = Client(addresses[0])
    pid = first.stats()["pid"]
    for _ in range(WORKER_TRIES):
        second = Client(addresses[1])
        if second.stats()["pid"] != pid:
            return [first, second]
        second.close()
    first.close()
    pytest.fail(f"{WORKER_TRIES} connections all reached worker {pid}: the kernel never balanced to the other")


def paced_run(addresses, count: int) -> tuple[float, list[dict]]:
    """``count`` ECHOs, half over a connection to each process at once: (seconds taken, each one's STATS)."""
    clients = clients_on_two_processes(addresses)
    errors: list[BaseException] = []

    def send_half(client: Client) -> None:
        try:
            for _ in range(count // 2):
                assert client.request(protocol.ECHO, b"x")[0] == protocol.ECHO
        except BaseException as exc:     # reported by the test's thread
            errors.append(exc)

    senders = [threading.Thread(target=send_half, args=(client,)) for client in clients]
    began = time.monotonic()
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(GENEROUS_S)
    took = time.monotonic() - began
    assert not errors and not any(sender.is_alive() for sender in senders), errors
    stats = [client.stats() for client in clients]
    for client in clients:
        client.close()
    assert len({s["pid"] for s in stats}) == 2
    return took, stats


def test_two_processes_sharing_redis_give_a_client_the_rate_once(variant, redis):
    rate, burst, count = 20, 2, 24            # shared: >= (24 - 2) / 20 = 1.1 s; a bucket each: about half that
    options = ("--rate-limit", str(rate), "--burst", str(burst), "--rate-limit-store", redis.url,
               "--rate-limit-scope", "client")
    with two_processes(variant, *options) as addresses:
        before = {"rate_store_calls": 0, "rate_store_errors": 0}        # the counters are the processes' totals
        for _ in range(ATTEMPTS):             # a run where a call missed the 50 ms proves nothing: run again
            redis.call("FLUSHALL")
            took, stats = paced_run(addresses, count)
            totals = {name: sum(s[name] for s in stats) for name in before}
            calls, failed = (totals[name] - before[name] for name in ("rate_store_calls", "rate_store_errors"))
            if not failed:
                break
            before = totals
    assert failed == 0, f"Redis answered too late (50 ms) in all {ATTEMPTS} runs: the machine is too busy"
    assert calls == count
    bound = (count - burst) / rate
    assert took >= bound, f"{count} requests in {took:.3f} s, under the {bound:.2f} s one shared bucket allows"


@pytest.mark.parametrize("on_error, while_down", [("allow", protocol.ECHO), ("deny", protocol.ERROR)])
def test_redis_gone_then_back(variant, on_error, while_down, redis):
    with serve(variant, "--rate-limit", "1000", "--rate-limit-store", redis.url,
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
    assert status == 0 and final["rate_store_errors"] >= down and final["rate_store_calls"] >= 2


USAGE_ERRORS = [
    ["--rate-limit-store", "redis://127.0.0.1:6379"],
    ["--rate-limit-scope", "client"],
    ["--rate-limit", "5", "--rate-limit-on-error", "deny"],
    ["--rate-limit", "5", "--rate-limit-store", "redis://h"],
    ["--rate-limit", "5", "--rate-limit-store", "http://h:1"],
    ["--rate-limit", "5", "--rate-limit-store", "redis://h:1/x"],
]


@pytest.mark.parametrize("options", USAGE_ERRORS, ids=[" ".join(o) for o in USAGE_ERRORS])
def test_usage_errors_are_the_go_backends_words(options):
    """The Python backends refuse a misused control with go's one line (after each program's own prefix)."""
    said = []
    for argv in ([build(), "--port", "0", *options],
                 [sys.executable, "-m", "conclab.servers", "threads", "--port", "0", *options]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=GENEROUS_S, stdin=subprocess.DEVNULL)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        said.append(done.stderr.split("error: ", 1)[1])
    assert said[0] == said[1]


def test_redis_stalled_then_answering_again(variant, redis):
    """A Redis that stops answering (SIGSTOP: connections stay open, nothing comes back) is a gone one after
    the 50 ms deadline: each request is answered anyway (allow), in order and once, counted; once Redis
    runs again (its late replies on the way), verdicts come from Redis again."""
    with serve(variant, "--rate-limit", "1000", "--rate-limit-store", redis.url) as server, \
            Client((server.host, server.port)) as client:
        assert client.request(protocol.ECHO, b"x")[0] == protocol.ECHO
        stalled = 3
        redis.process.send_signal(signal.SIGSTOP)
        try:
            answers = [client.request(protocol.ECHO, b"%d" % i) for i in range(stalled)]
        finally:
            redis.process.send_signal(signal.SIGCONT)
        assert answers == [(protocol.ECHO, b"%d" % i) for i in range(stalled)]
        assert client.stats()["rate_store_errors"] == stalled

        def redis_answers() -> bool:
            before = client.stats()["rate_store_errors"]
            return client.request(protocol.ECHO, b"y") == (protocol.ECHO, b"y") and \
                client.stats()["rate_store_errors"] == before

        assert wait_until(redis_answers, GENEROUS_S, 0.05), "Redis answering again is not used again"
        assert server.alive()
