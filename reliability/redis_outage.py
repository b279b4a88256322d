"""Scenario redis_outage: the shared rate limit's Redis dies under load, then comes back on the same port.

Same shape as reliability/scenarios.py (``scenario(backend, options, scale) ->
Outcome``, registered in its ``SCENARIOS``), built on its helpers. The server
keeps its token buckets in a Redis the scenario starts itself
(``servers.redis_process.RedisProcess``, on a free loopback port) with
``--rate-limit-store redis://... --rate-limit-on-error allow`` and a limit so
high it never limits (every request is one round trip, no verdict is a
refusal). Then, under a closed loop of ``conns`` connections (the load
generator, ``conclab.loadgen.run_load``):

1. Redis up: wait until the server's ``rate_store_calls`` grow (the load is on);
2. Redis killed (SIGKILL, a crash) for ``outage_s``: ``rate_store_errors``
   must grow (the on-error rule answered: allow, so replies keep coming);
3. Redis restarted on the same port, with an empty script cache: wait until
   one STATS interval shows calls growing and errors not (the NOSCRIPT
   fallback loaded the script, the verdicts are Redis's again), and from then
   to the load's end errors stay where they were while calls keep growing.

Passes when, besides: the server is alive at the end, and no reply was lost:
SIGTERM comes while the load still runs (as in the ``shutdown`` scenario: a
closed loop that ends on its own leaves each connection's last request in
flight, answered but never counted by the generator), the drain answers what
was received, and the final JSON line's ``requests_total`` = the replies the
generator counted + the STATS requests the scenario itself sent (the server
counts those too). Exit status 0.

A variant whose server refuses the options (a usage error at start) fails the
scenario with the server's one line (``serves_store`` asks exactly that).
Every wait is a condition with a deadline; the only fixed span is the outage
itself, which is what is being survived.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from conclab.servers import variant_of
from conclab.servers.client import Client
from conclab.servers.launcher import ServerProcess, ServerStartError, wait_until
from conclab.servers.redis_process import RedisMissing, RedisProcess, RedisStartError

from .scenarios import Outcome, Scale, alive

NEVER_LIMITS = "1e9"           # --rate-limit and --burst: every request a round trip, no verdict a refusal
GENEROUS_S = 20.0              # a bound only a broken server (or Redis) reaches on a busy shared machine
POLL_S = 0.05
STATS_GAP_S = 0.1              # recovered: one such gap with calls growing and errors not
DRAIN_S = 10.0
USAGE_EXIT = 2


@dataclass(frozen=True)
class OutageSizes:
    """How big the scenario is, for a Scale of reliability/scenarios.py (by its name)."""
    conns: int                 # closed-loop connections
    before_s: float            # load with Redis up, after the first calls are seen
    outage_s: float            # Redis down
    after_s: float             # load with Redis back, after its verdicts are seen again


OUTAGE_CI = OutageSizes(conns=16, before_s=0.5, outage_s=1.0, after_s=0.5)
OUTAGE_FULL = OutageSizes(conns=64, before_s=2.0, outage_s=5.0, after_s=2.0)
LOAD_S = 120.0                 # the load generator's planned run: it always outlasts the phases (SIGTERM ends it)


def sizes_of(scale: Scale) -> OutageSizes:
    return OUTAGE_FULL if scale.name == "full" else OUTAGE_CI


def store_options(url: str) -> list:
    return ["--rate-limit", NEVER_LIMITS, "--burst", NEVER_LIMITS, "--rate-limit-store", url,
            "--rate-limit-on-error", "allow"]


def serves_store(backend: str, options, url: str = "redis://127.0.0.1:1") -> str | None:
    """None if the variant starts with the Redis store's options, else its one-line refusal. (No Redis needs to
    listen at ``url``: with ``allow`` a server may not need it to start.)"""
    try:
        with ServerProcess(backend, [*options, *store_options(url)]):
            return None
    except ServerStartError as exc:
        return str(exc)


class Counts:
    """STATS over one connection, each request counted (the server counts them in requests_total too)."""

    def __init__(self, server: ServerProcess) -> None:
        self.client = Client(server.address)
        self.sent = 0

    def __call__(self) -> dict:
        self.sent += 1
        return self.client.stats()

    def close(self) -> None:
        self.client.close()


def redis_outage(backend, options, scale: Scale) -> Outcome:
    """The rate limit's Redis killed under closed-loop load, then restarted on the same port: no crash, every
    request answered, store errors while it is down, Redis's verdicts again after."""
    out = Outcome("redis_outage", variant_of(backend, options).name)
    size = sizes_of(scale)
    try:
        redis = RedisProcess().start()
    except (RedisMissing, RedisStartError) as exc:
        out.check(False, str(exc))
        return out
    try:
        with ServerProcess(backend, [*options, *store_options(redis.url)]) as server:
            phases, result, status, final, sent = under_load(server, redis, size, out)
    finally:
        redis.close()
    judge(out, size, phases, result, status, final, sent)
    return out


def under_load(server: ServerProcess, redis: RedisProcess, size: OutageSizes, out: Outcome):
    """The three phases under the load generator; (STATS per phase, its result, exit status, final line, STATS sent)."""
    from conclab.loadgen import LoadParams, run_load
    params = LoadParams(target=server.target, mode="closed", conns=size.conns, duration=LOAD_S, op="echo",
                        size=64, connect_timeout=10.0)
    box: dict = {}

    def load() -> None:
        try:
            box["result"] = run_load(params)
        except Exception as exc:            # reported below, never lost in a thread
            box["error"] = exc
    counts = Counts(server)
    phases: dict = {}
    thread = threading.Thread(target=load, name="redis-outage-load", daemon=True)
    try:
        phases["start"] = counts()
        thread.start()
        out.check(wait_until(lambda: grew(counts(), phases["start"], "rate_store_calls") or not thread.is_alive(),
                             GENEROUS_S, POLL_S), "the load never made a Redis call")
        time.sleep(size.before_s)
        phases["up"] = counts()
        redis.stop()
        out.check(wait_until(lambda: grew(counts(), phases["up"], "rate_store_errors") or not thread.is_alive(),
                             GENEROUS_S, POLL_S), "no store error while Redis was down")
        time.sleep(size.outage_s)
        phases["down"] = counts()
        redis.start()
        phases["back"] = recovered(counts, thread)
        out.check(phases["back"] is not None, "Redis's verdicts never came back (calls grew with errors growing)")
        time.sleep(size.after_s)
        phases["end"] = counts()
        out.check(thread.is_alive(), "the load generator stopped before the scenario did")
        alive(server, out)
    finally:
        counts.close()
    status, final = server.stop(grace=DRAIN_S)            # under load: the drain answers what it received
    thread.join(GENEROUS_S)
    out.check("error" not in box, f"the load generator failed: {box.get('error')!r}")
    return phases, box.get("result") or {}, status, final, counts.sent


def grew(now: dict, before: dict, counter: str) -> bool:
    return now.get(counter, 0) > before.get(counter, 0)


def recovered(counts, thread) -> dict | None:
    """The first STATS after a gap in which calls grew and errors did not (None: not within GENEROUS_S)."""
    deadline = time.monotonic() + GENEROUS_S
    last = counts()
    while time.monotonic() < deadline and thread.is_alive():
        time.sleep(STATS_GAP_S)
        now = counts()
        if grew(now, last, "rate_store_calls") and not grew(now, last, "rate_store_errors"):
            return now
        last = now
    return None


def judge(out: Outcome, size: OutageSizes, phases: dict, result: dict, status, final, sent: int) -> None:
    replies = result.get("requests", 0)
    counted = (final or {}).get("requests_total")
    lost = None if counted is None else counted - sent - replies
    errors = result.get("errors")
    out.check(lost == 0, f"{lost} requests counted by the server were never answered ({counted} counted, "
                         f"{replies} replies, {sent} STATS)")
    out.check(status == 0, f"exit status {status} after SIGTERM")
    back, end = phases.get("back"), phases.get("end")
    if back and end:
        out.check(not grew(end, back, "rate_store_errors"),
                  f"store errors kept growing after Redis came back ({back['rate_store_errors']} -> "
                  f"{end['rate_store_errors']})")
        out.check(grew(end, back, "rate_store_calls"), "no Redis call after Redis came back")
    errors_down = delta(phases, "up", "down", "rate_store_errors")
    calls_after = delta(phases, "back", "end", "rate_store_calls")
    out.metrics = {"conns": size.conns, "outage_s": size.outage_s, "replies": replies, "server_requests": counted,
                   "stats_sent": sent, "lost": lost, "client_errors": errors,
                   "store_errors_during_outage": errors_down, "store_calls_after": calls_after,
                   "exit_status": status}
    out.figure = (f"{size.conns} conns, Redis down {size.outage_s:g} s: {errors_down} store errors, then "
                  f"{calls_after} Redis calls and no new error; {replies} replies, {lost} lost; exit {status}")


def delta(phases: dict, first: str, last: str, counter: str):
    a, b = phases.get(first), phases.get(last)
    return b.get(counter, 0) - a.get(counter, 0) if a and b else None


SCENARIOS = {"redis_outage": redis_outage}
