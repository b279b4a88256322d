"""Experiment redis_call: what one Redis round trip per request costs each model.

The shared rate limit (docs/ratelimit.md) puts one ``EVALSHA`` to Redis on
every request's path. How a model waits for that reply is where the models
differ (a blocked thread, a parked greenlet, an awaited future, a socket in the
loop's own epoll set, a goroutine on the netpoller), and this measures it:

* every variant, a closed loop of ``profile.reference_conns`` connections sending
  64 B ECHO, twice per round on fresh servers of the same model: with the Redis
  store (``--rate-limit 1e9 --burst 1e9 --rate-limit-store redis://...``: a
  limit so high it never limits, so every request makes exactly one round trip
  and nothing else changes) and with the same limit in memory (the default
  store: the same token-bucket arithmetic, no round trip). The two are paired
  within the round, their order alternating by round (odd rounds Redis first),
  and rounds are interleaved like every experiment's;
* the thread pools twice more: at their default size (``profile.pool_workers``)
  and at the size Little's law asks for (``little_workers``, below).

One ``redis-server`` serves the whole experiment (``servers.redis_process``),
pinned to the load generator's CPUs: it shares them with the generator (the
rows say so, ``redis_cpus`` and ``redis_shares_loadgen_cpu``) while the server
keeps its own CPU, so the server's CPU per request is the server's alone.

Little's law. A pool sustains a rate X only with X x T workers busy at once,
T a request's time in a worker: its service time plus the Redis round trip it
now blocks on. Per variant and round: X = the pool's memory-store throughput
at its default size (``little_rate_rps``: the rate to keep), service time = the
server CPU µs per request of that point (``little_service_us``), and the round
trip = ``redis_rtt_us``: the median of ``profile.redis_rtt_calls`` EVALSHA round
trips (the store's own ``BlockingBucketClient``, the script and the bucket the
servers use), timed just before the variant's round from a thread pinned to the
server's CPUs, so it takes the server's path to Redis (another CPU, loopback).
``little_workers`` = ceil(X x (service + round trip)), at least 1 and at most the
connections (a closed loop never has more requests in flight). Connection
dispatch keeps a worker per connection for the connection's life, so its pool
needs one per connection whatever Little says: it runs with max(Little,
connections + 2), the two for the harness's STATS connection and the load
generator's start-up probe (``pool_note`` says so), even when its default-size
point is invalid (fewer workers than connections: head-of-line blocking).

Per row: throughput, p50/p99, the server's threads, CPU µs and context switches
per request (the harness's window), ``rate_store_calls`` and ``rate_store_errors``
(STATS deltas over the point), and Redis's own CPU (``/proc/PID/stat``) per
request (``redis_cpu_us_per_req``: its CPU over the point / the requests the
server counted over the same span). A point with store errors is flagged
(``store_flag``) and invalid: some verdicts were the on-error rule's, not
Redis's, and those requests skipped the round trip being measured.

A variant that does not take the options yet fails to start (a usage error,
one line): the harness's normal skip, in skipped.csv with the server's words.
No redis-server on this machine: every variant is skipped with the one line
that says how to install it.
"""
from __future__ import annotations

import math
import os
import statistics
import threading
import time
import uuid
from dataclasses import replace

from conclab.servers.redis_bucket import KEY_PREFIX, BlockingBucketClient
from conclab.servers.redis_process import RedisMissing, RedisProcess, RedisStartError

from .harness.run import describe, key

NAME = "redis_call"
NEVER_LIMITS = 1e9                  # --rate-limit and --burst: no request ever waits or is refused
STORES = ("redis", "memory")
DEFAULT, LITTLE = "default", "little"
CONN_MARGIN = 20
RTT_TIMEOUT_S = 1.0                 # one timed call's deadline (a slower one is counted as failed, not timed)
CONTROL_CONNS = 2                   # connections besides the load's that need a worker: STATS, the generator's probe
CONNECTION_DISPATCH_NOTE = ("connection dispatch holds a worker per connection: max(Little, connections + 2 for "
                            "STATS and the generator's probe)")


def run(run) -> None:
    try:
        redis = RedisProcess(cpus=run.loadgen_cpus)
        redis.start()
    except (RedisMissing, RedisStartError) as exc:
        for variant in run.variants:
            run.skip(NAME, variant, str(exc))
        return
    try:
        run.each_variant(NAME, lambda variant, repeat: measure_variant(run, redis, variant, repeat))
    finally:
        redis.close()


def limit_options(store_url: str | None) -> list:
    """The server options of one store: the never-limiting bucket, in Redis or (None) in memory."""
    options = ["--rate-limit", f"{NEVER_LIMITS:g}", "--burst", f"{NEVER_LIMITS:g}"]
    return options + (["--rate-limit-store", store_url] if store_url else [])


def store_order(repeat: int) -> tuple:
    """Odd rounds Redis first (a variant that refuses the options is skipped before it writes a row), even
    rounds memory first: neither store always meets the warmer machine."""
    return STORES if repeat % 2 else STORES[::-1]


def little_workers(rate_rps, service_us, rtt_us, conns: int) -> int | None:
    """Little's law: workers = rate x (service time + Redis round trip), rounded up, in 1..conns; None when a
    measurement is missing."""
    if None in (rate_rps, service_us, rtt_us) or rate_rps <= 0:
        return None
    needed = math.ceil(rate_rps * (service_us + rtt_us) * 1e-6)
    return max(1, min(conns, needed))


def dispatches_requests(variant) -> bool:
    """The pool hands out a worker per request (``--dispatch request``), not per connection."""
    return "request" in variant.options


def pool_workers(variant, little: int | None, conns: int) -> int | None:
    """The Little's-law size a pool runs with (None: no size). Connection dispatch needs a worker per connection
    whatever the rate (each holds its worker for life), so it has a size even without a measurement."""
    if dispatches_requests(variant):
        return little
    return max(little or 0, conns + CONTROL_CONNS)


def measure_variant(run, redis: RedisProcess, variant, repeat: int) -> None:
    """Both stores, paired in this round; a pool at its default size, then at Little's law's."""
    conns = run.profile.reference_conns
    rtt_us = redis_rtt_us(redis.url, run.profile.redis_rtt_calls, run.server_cpus)
    if not variant.is_pool:
        for store in store_order(repeat):
            measure_point(run, redis, variant, repeat, store, rtt_us=rtt_us, conns=conns)
        return
    default = run.profile.pool_workers
    memory = {store: measure_point(run, redis, variant, repeat, store, rtt_us=rtt_us, conns=conns,
                                   pool_size=DEFAULT, workers=default)
              for store in store_order(repeat)}["memory"]
    measure_little(run, redis, variant, repeat, memory, rtt_us, conns)


def measure_little(run, redis: RedisProcess, variant, repeat: int, memory: dict, rtt_us, conns: int) -> None:
    """The pool at Little's law's size, from this round's memory-store point at its default size and round trip."""
    valid = bool(memory.get("valid"))
    rate = memory.get("throughput_rps") if valid else None
    service = memory.get("cpu_us_per_req") if valid else None
    little = little_workers(rate, service, rtt_us, conns)
    workers = pool_workers(variant, little, conns)
    if workers is None:
        run.skip(NAME, variant, "no Little's-law size: the memory-store point is invalid or measured no "
                                "throughput, CPU or round trip", point=f"pool_size={LITTLE} repeat={repeat}")
        return
    note = None if dispatches_requests(variant) else CONNECTION_DISPATCH_NOTE
    for store in store_order(repeat):
        measure_point(run, redis, variant, repeat, store, rtt_us=rtt_us, conns=conns, pool_size=LITTLE,
                      workers=workers, little=little, rate=rate, service=service, note=note)


def measure_point(run, redis: RedisProcess, variant, repeat: int, store: str, *, rtt_us, conns: int,
                  pool_size: str | None = None, workers: int | None = None, little: int | None = None,
                  rate=None, service=None, note: str | None = None) -> dict:
    """One server of ``variant`` with one store, one closed-loop point; the row written and returned."""
    started = time.monotonic()
    url = redis.url if store == "redis" else None
    variant_served = with_options(variant, limit_options(url))
    label = f"store={store}" + (f" workers={workers}" if workers else "")
    with run.serve(NAME, variant_served, repeat, max_conns=conns + CONN_MARGIN, workers=workers) as server:
        before = server.try_stats() or {}
        redis_before = redis.cpu_seconds()
        row = run.measure(server, label, "closed", conns, size=run.profile.size, op="echo")
        redis_after = redis.cpu_seconds()
        after = server.try_stats() or {}
    row.update(key(NAME, variant, repeat), store=store, pool_size=pool_size, workers=workers,
               little_workers=little, little_rate_rps=rate, little_service_us=service, redis_rtt_us=rtt_us,
               pool_note=note, conns=conns, size=run.profile.size, rate_limit=NEVER_LIMITS, burst=NEVER_LIMITS,
               server_cpus=run.server_cpus, **redis_columns(run, redis))
    row.update(store_counts(before, after))
    row.update(redis_cost(redis_before, redis_after, row.get("server_requests")))
    flag_store_errors(row)
    run.write(NAME, row)
    run.progress(f"[{NAME}] {variant.name} {label} r{repeat}: {describe(row)}, store calls "
                 f"{row.get('rate_store_calls')}, errors {row.get('rate_store_errors')} "
                 f"({time.monotonic() - started:.1f} s)")
    return row


def with_options(variant, options: list):
    """The variant with the store's options after its own (rows keep the variant's name)."""
    return replace(variant, options=tuple(variant.options) + tuple(options))


def redis_columns(run, redis: RedisProcess) -> dict:
    cpus = redis.cpus or []
    return {"redis_cpus": cpus, "redis_shares_loadgen_cpu": bool(set(cpus) & set(run.loadgen_cpus))}


def store_counts(before: dict, after: dict) -> dict:
    """rate_store_calls and rate_store_errors over the point (STATS after - before; None when either is missing:
    a server that does not count them, or STATS unanswered)."""
    out = {}
    for name in ("rate_store_calls", "rate_store_errors"):
        first, last = before.get(name), after.get(name)
        out[name] = last - first if isinstance(first, int) and isinstance(last, int) else None
    return out


def redis_cost(cpu_before, cpu_after, server_requests) -> dict:
    """Redis's CPU over the point, and per request the server counted over the same span."""
    if cpu_before is None or cpu_after is None:
        return {"redis_cpu_s": None, "redis_cpu_us_per_req": None}
    spent = cpu_after - cpu_before
    per_req = spent * 1e6 / server_requests if server_requests else None
    return {"redis_cpu_s": spent, "redis_cpu_us_per_req": per_req}


def flag_store_errors(row: dict) -> None:
    """A point with store errors: some verdicts were the on-error rule's, not Redis's. Flagged and invalid."""
    errors = row.get("rate_store_errors")
    if not errors:
        return
    flag = f"{errors} store errors: those verdicts were not Redis's"
    reasons = [r for r in (row.get("invalid_reason") or "").split("; ") if r]
    row.update(store_flag=flag, valid=False, invalid_reason="; ".join([*reasons, flag]))


def redis_rtt_us(url: str, calls: int, cpus) -> float | None:
    """The median EVALSHA round trip (µs) of ``calls`` timed calls, from a thread pinned to ``cpus`` (the
    server's: the path its calls take); None when none succeeded."""
    box: dict = {}
    thread = threading.Thread(target=_time_calls, args=(url, calls, cpus, box), name="redis-rtt", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("median_us")


def _time_calls(url: str, calls: int, cpus, box: dict) -> None:
    try:
        if cpus:
            os.sched_setaffinity(threading.get_native_id(), set(cpus))
        client = BlockingBucketClient(url, NEVER_LIMITS, NEVER_LIMITS, "reject", timeout=RTT_TIMEOUT_S)
        bucket = f"{KEY_PREFIX}rtt-{uuid.uuid4().hex}"
        client.take(bucket)                                  # connect, load the script: not timed
        timings = []
        for _ in range(calls):
            began = time.perf_counter()
            failures = client.failures
            client.take(bucket)
            if client.failures == failures:
                timings.append((time.perf_counter() - began) * 1e6)
        client.close()
        box["median_us"] = statistics.median(timings) if timings else None
    except OSError as exc:                                   # pinning refused, or a socket error: the round's skip
        box["error"] = exc
