"""Overload: offer a server 2x and 5x its capacity, then see whether it comes back.

    from conclab.reliability.overload import overload
    rows = overload("asyncio", [], seconds=5)      # one row per factor: offered, served, p99, errors, RSS, recovery

Per backend variant, on one server:

1. **Capacity**: the soak's short closed loop (``soak.capacity``: 3 s after 0.5 s of warm-up).
2. **Normal p99**: the open loop (``soak.SteadyLoad``, no faults, no turnover) at the soak's rate
   (70 % of capacity, capped like the soak's) for ``BASELINE_S``; the p99 of those seconds.
3. For each factor in ``FACTORS`` (2, 5): the load generator's open loop (``run_load``, ``CONNS``
   connections, pipeline ``PIPELINE``) offers factor x capacity for ``seconds`` (``CI_SECONDS`` in the
   test suite, ``FULL_SECONDS`` with ``conclab check --overload``), while ``PeakRss`` reads the
   server's RSS every ``SAMPLE_S``. The row: offered and sent rate (sent: of the window's requests,
   late ones included, per second of the window), served rate (the server's own ``requests_total``
   over the whole run, connecting and the drain included: what it really got through), p99 during (from the
   *scheduled* send, so it includes the wait in the generator's queue), errors by kind (the load
   generator's: ``server_busy``, ``timeout``, ``reset``, ``closed``, ...), requests never sent
   (``unsent``: the open loop keeps at most ``CONNS`` x ``PIPELINE`` in flight, so the excess queues
   on the client's side) and never answered, RSS before and at its peak.
4. **Recovery**: at once the normal rate again for ``RECOVERY_WINDOW_S``, p99 per second; the
   recovery time is the end of the first second from which every second's p99 is within
   ``soak.P99_FACTOR`` (2x) of the normal p99.

The server runs with ``soak.server_options`` (a worker per connection for the connection-dispatch
pool, whose queue would otherwise hold connections, not requests). Passes when the server is alive, its RSS peak is within ``RSS_BOUND`` of its RSS before the factor
(docs/reliability.md says why that bounds every model here), and recovery took at most
``RECOVERY_LIMIT_S``. The generator's saturation (its own self-check) is recorded per row: at 5x
the offered rate is often past what one generator process can send, and the row says so instead of
blaming the server. Sizes: ``CI_SECONDS`` (tests/test_soak.py), ``FULL_SECONDS``: set here only.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Self

import psutil
from conclab.loadgen import LoadParams, run_load
from conclab.servers import variant_of
from conclab.servers.launcher import ServerProcess

from . import soak as soakmod

FACTORS = (2, 5)
CI_SECONDS = 5.0
FULL_SECONDS = 30.0
CONNS = 100
PIPELINE = 16
BASELINE_S = 3.0
RECOVERY_WINDOW_S = 10.0
RECOVERY_LIMIT_S = 5.0
SAMPLE_S = 0.2
RSS_BOUND_MIB = 64.0
CSV_COLUMNS = ("variant", "factor", "capacity_rps", "offered_rps", "sent_rps", "served_rps", "p99_us",
               "normal_p99_us", "errors", "unsent", "unanswered", "rss_before_mib", "rss_peak_mib",
               "rss_bound_mib", "recovery_s", "loadgen_saturated", "alive", "status", "failures")


@dataclass
class OverloadRow:
    variant: str
    factor: int
    capacity_rps: float
    offered_rps: float = 0.0
    sent_rps: float = 0.0
    served_rps: float = 0.0
    p99_us: int | None = None
    normal_p99_us: int | None = None
    errors: dict = field(default_factory=dict)
    unsent: int = 0
    unanswered: int = 0
    rss_before_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_bound_mib: float = RSS_BOUND_MIB
    recovery_s: float | None = None
    loadgen_saturated: bool = False
    alive: bool = True
    failures: list = field(default_factory=list)

    @property
    def status(self) -> str:
        return "pass" if not self.failures else "FAIL"

    def as_csv(self) -> dict:
        row = {name: getattr(self, name) for name in CSV_COLUMNS if name not in ("errors", "status", "failures")}
        return {**row, "errors": json.dumps(self.errors, sort_keys=True), "status": self.status,
                "failures": "; ".join(self.failures)}


def normal_p99(target: str, rate: float, seconds: float, cpu: int | None) -> tuple[int | None, list]:
    """The open loop at ``rate`` with no faults or turnover: (p99 over all its seconds, p99 per second)."""
    size = soakmod.SoakSize(seconds=seconds, replace_fraction=0.0, fault_rate=0.0)
    load = soakmod.SteadyLoad(target, rate, seconds, size, cpu).start()
    load.join(seconds + 30)
    merged, per_second = Counter(), []
    for piece in load.slices:
        merged.update(piece["latencies"])
        per_second.append(soakmod.percentile(piece["latencies"], 99.0))
    return soakmod.percentile(merged, 99.0), per_second


def recovery_time(per_second: list, normal: int | None) -> float | None:
    """The end of the first second from which every second's p99 is within P99_FACTOR x normal; None: never."""
    if not normal:
        return None
    bound = soakmod.P99_FACTOR * normal
    for i in range(len(per_second)):
        if all(p is not None and p <= bound for p in per_second[i:]):
            return float(i + 1) if i else 0.0
    return None


def overload(backend: str, options=(), seconds: float = CI_SECONDS, factors=FACTORS, *, server_cpus=None,
             loadgen_cpu: int | None = None, progress=None) -> list[OverloadRow]:
    """Offer each factor x capacity for ``seconds`` to one server of the variant; one row per factor."""
    say = progress or (lambda text: None)
    name = variant_of(backend, options).name
    cpus = None if loadgen_cpu is None else str(loadgen_cpu)
    rows = []
    with ServerProcess(backend, [*options, *soakmod.server_options(CONNS)], cpus=server_cpus) as server:
        capacity, _ = soakmod.capacity(server, cpus)
        rate = min(capacity * soakmod.LOAD_FRACTION, soakmod.MAX_RATE)
        normal, _ = normal_p99(server.target, rate, BASELINE_S, loadgen_cpu)
        say(f"capacity {capacity:,.0f} req/s; normal p99 {normal} us at {rate:,.0f} req/s")
        for factor in factors:
            row = OverloadRow(name, factor, capacity, offered_rps=round(factor * capacity, 1), normal_p99_us=normal)
            overload_once(server, row, seconds, cpus)
            if row.alive:
                _, per_second = normal_p99(server.target, rate, RECOVERY_WINDOW_S, loadgen_cpu)
                row.recovery_s = recovery_time(per_second, normal)
            judge(row)
            say(f"{factor}x: offered {row.offered_rps:,.0f}, served {row.served_rps:,.0f} req/s, p99 {row.p99_us} us, "
                f"errors {row.errors or 0}, RSS peak {row.rss_peak_mib:.1f} MiB, recovered in {row.recovery_s} s"
                f"{'  (load generator saturated)' if row.loadgen_saturated else ''}")
            rows.append(row)
    return rows


def overload_once(server: ServerProcess, row: OverloadRow, seconds: float, cpus: str | None) -> None:
    row.rss_before_mib = round(server.rss() / (1 << 20), 1)
    counted, began = server.stats()["requests_total"], time.monotonic()
    with PeakRss(server) as peak:
        result = run_load(LoadParams(target=server.target, mode="open", rate=row.offered_rps, conns=CONNS,
                                     pipeline=PIPELINE, duration=seconds, op="echo", size=64, cpus=cpus))
    row.rss_peak_mib = round(peak.bytes / (1 << 20), 1)
    elapsed = time.monotonic() - began
    open_loop = result.get("open_loop", {})
    row.sent_rps = open_loop.get("achieved_send_rps", 0.0)
    if server.alive():       # the server's own count over the whole run (connecting and the drain included)
        row.served_rps = round((server.stats()["requests_total"] - counted - 1) / elapsed, 1)
    row.p99_us = result["latency_us"]["p99"]
    row.errors = dict(result["errors"])
    row.unsent = open_loop.get("unsent", 0)
    row.unanswered = result.get("unanswered", 0)
    row.loadgen_saturated = bool(result.get("loadgen_saturated"))
    row.alive = server.alive()


class PeakRss:
    """The server's highest RSS, read every SAMPLE_S in a thread while the block runs."""

    def __init__(self, server: ServerProcess) -> None:
        self.server, self.bytes = server, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="overload-rss", daemon=True)

    def _run(self) -> None:
        while True:
            try:
                self.bytes = max(self.bytes, self.server.rss())
            except (OSError, psutil.Error):         # the server died: the row says so
                return
            if self.stop.wait(SAMPLE_S):
                return

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def judge(row: OverloadRow) -> None:
    """The row's failures, one line each: died, RSS over its bound, not recovered in time."""
    if not row.alive:
        row.failures.append(f"the server died under {row.factor}x capacity")
        return
    if row.rss_peak_mib > row.rss_before_mib + row.rss_bound_mib:
        row.failures.append(f"RSS peaked at {row.rss_peak_mib:.1f} MiB, over {row.rss_before_mib:.1f} + "
                            f"{row.rss_bound_mib:g} MiB")
    if row.recovery_s is None or row.recovery_s > RECOVERY_LIMIT_S:
        row.failures.append(f"p99 not back within {soakmod.P99_FACTOR:g}x of normal ({row.normal_p99_us} us) "
                            f"{RECOVERY_LIMIT_S:g} s after the load dropped"
                            + ("" if row.recovery_s is None else f" (took {row.recovery_s:g} s)"))
