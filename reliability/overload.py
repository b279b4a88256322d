"""Overload: offer a server 2x and 5x its capacity, then see whether it comes back.

    from conclab.reliability.overload import overload
    rows = overload("asyncio", [], seconds=5)      # one row per factor: offered, served, p99, errors, RSS, recovery

Per backend variant, on one server:

1. **Capacity**: the soak's short closed loop (``soak.capacity``: 3 s after 0.5 s of warm-up; the
   CI suite's ``capacity_s``: 1 s).
2. **Normal p99**: the open loop (``soak.SteadyLoad``, no faults, no turnover) at the soak's rate
   (70 % of capacity, capped at ``max_rate``: the soak's 100,000 req/s, the CI suite's 5,000) for as
   long as one factor's overload, within ``BASELINE_MIN_S``..``BASELINE_MAX_S`` (``baseline_seconds``);
   the median of those seconds' p99s (``robust_p99``), and the worst of them.
3. For each factor in ``FACTORS`` (2, 5): the load generator's compiled open loop (``run_load``, ``CONNS``
   connections, pipeline ``PIPELINE``) offers factor x capacity for ``seconds`` (``CI_SECONDS`` in the
   test suite, ``FULL_SECONDS`` with ``conclab check --overload``), while ``PeakRss`` reads the
   server's RSS every ``SAMPLE_S``. The row: offered and sent rate (sent: of the window's requests,
   late ones included, per second of the window), served rate (the server's own ``requests_total``
   over the whole run, connecting and the drain included: what it really got through), p99 during (from the
   *scheduled* send, so it includes the wait in the generator's queue), errors by kind (the load
   generator's: ``server_busy``, ``timeout``, ``reset``, ``closed``, ...), requests never sent
   (``unsent``: the open loop keeps at most ``CONNS`` x ``PIPELINE`` in flight, so the excess queues
   on the client's side) and never answered, RSS before and at its peak.
4. **Recovery**: at once the normal rate again for ``RECOVERY_WINDOW_S`` (the ``RECOVERY_LIMIT_S``
   judged), p99 per second. Judged on robust statistics: the median of those per-second p99s
   against the normal p99 (itself the median of the baseline's per-second p99s), within the soak's
   tolerance (``soak.p99_tolerance``: 2x, or plus the latency floor's p99 when that is larger): pass
   when the median is within it, FAIL when every second is over it and over the baseline's worst
   second (not back, demonstrated), unresolved in between. The worst second matters for the thread
   models: at 70 % of capacity their per-second p99 swings between calm and slow stretches of
   several seconds with no overload at all (the soak's time series shows it), so the 5 s after the
   drop can land in a slow stretch; that is not told from a slow recovery, and the row says so.
   Seconds where the load generator saturated are left out; with fewer than
   ``soak.MIN_QUARTER_SECONDS`` left, the recovery is unresolved. The recovery time (the end of
   the first second from which every second's p99 is within that tolerance) is recorded, not judged.

Before the first factor the soak's latency-floor probe (``soak.latency_floor``) runs against the
server; each row records other processes' CPU (``soak.others_cpu_pct``) from the end of the
previous row (the first row: from before the normal p99's baseline) to the end of its recovery
window, so the baseline the recovery is compared with is covered too. A row on a busy machine (``soak.machine_busy``) has its
recovery unresolved, never passed or failed: the timing measured the machine.

The server runs with ``soak.server_options`` (a worker per connection for the connection-dispatch
pool, whose queue would otherwise hold connections, not requests). A row's status: ``FAIL`` when
the server died or its RSS peak went over ``RSS_BOUND_MIB`` above its RSS before the factor
(docs/reliability.md says why that bounds every model here) or its p99 did not come back (exact
or demonstrated: these are the failures), ``unresolved`` when the recovery could not be judged,
``pass`` otherwise. The generator's saturation (its own self-check) is recorded per row: at 5x
the offered rate is often past what one generator process can send, and the row says so instead
of blaming the server. Sizes: ``CI_SECONDS`` and ``FULL_SECONDS`` come from the soak's
``SUITE_CI`` / ``SUITE_FULL`` (the test suite's sizes, in one place).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Self

import psutil
from conclab.loadgen import LoadParams, run_load
from conclab.servers import variant_of
from conclab.servers.launcher import ServerProcess

from . import soak as soakmod

FACTORS = (2, 5)
CI_SECONDS = soakmod.SUITE_CI.overload_s
FULL_SECONDS = soakmod.SUITE_FULL.overload_s
CONNS = 100
PIPELINE = 16
BASELINE_MIN_S = 4.0                       # the normal p99: enough seconds for a median of 3 or more...
BASELINE_MAX_S = 20.0                      # ...and, at full size, for a model's slower swings at that rate
RECOVERY_LIMIT_S = 5.0
RECOVERY_WINDOW_S = RECOVERY_LIMIT_S       # measured after the drop: exactly the seconds judged
SAMPLE_S = 0.2
RSS_BOUND_MIB = 64.0
CSV_COLUMNS = ("variant", "factor", "capacity_rps", "offered_rps", "sent_rps", "served_rps", "p99_us",
               "normal_p99_us", "normal_worst_p99_us", "floor_p99_us", "recovery_p99_us", "recovery_best_p99_us", "errors", "unsent", "unanswered", "rss_before_mib",
               "rss_peak_mib", "rss_bound_mib", "recovery_s", "loadgen_saturated", "others_cpu_pct", "machine_busy",
               "alive", "status", "failures", "unresolved")


@dataclass
class OverloadRow:
    variant: str
    factor: int
    capacity_rps: float
    offered_rps: float = 0.0
    sent_rps: float = 0.0
    served_rps: float = 0.0
    p99_us: int | None = None
    normal_p99_us: float | None = None       # median of the baseline's per-second p99s
    normal_worst_p99_us: int | None = None   # the worst of them
    floor_p99_us: int | None = None          # the latency floor's probe
    recovery_p99_us: float | None = None     # median of the per-second p99s over the RECOVERY_LIMIT_S after the drop
    recovery_best_p99_us: int | None = None  # the best of those seconds
    errors: dict = field(default_factory=dict)
    unsent: int = 0
    unanswered: int = 0
    rss_before_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_bound_mib: float = RSS_BOUND_MIB
    recovery_s: float | None = None
    loadgen_saturated: bool = False
    others_cpu_pct: float | None = None
    alive: bool = True
    failures: list = field(default_factory=list)
    unresolved: list = field(default_factory=list)      # one line each: what the run could not decide, and why

    @property
    def machine_busy(self) -> bool:
        return soakmod.machine_busy(self.others_cpu_pct)

    @property
    def status(self) -> str:
        return soakmod.FAIL if self.failures else soakmod.UNRESOLVED if self.unresolved else soakmod.PASS

    def as_csv(self) -> dict:
        lists = ("errors", "status", "failures", "unresolved", "machine_busy")
        row = {name: getattr(self, name) for name in CSV_COLUMNS if name not in lists}
        return {**row, "errors": json.dumps(self.errors, sort_keys=True), "status": self.status,
                "machine_busy": self.machine_busy, "failures": "; ".join(self.failures),
                "unresolved": "; ".join(self.unresolved)}


def normal_p99(target: str, rate: float, seconds: float, cpu: int | None) -> list:
    """The open loop at ``rate`` with no faults or turnover: each second's p99, None for a second without
    replies or one where the load generator saturated (left out)."""
    size = soakmod.SoakSize(seconds=seconds, replace_fraction=0.0, fault_rate=0.0)
    load = soakmod.SteadyLoad(target, rate, seconds, size, cpu).start()
    load.join(seconds + 30)
    return [None if soakmod.loadgen_flagged(piece) else soakmod.percentile(piece["latencies"], 99.0)
            for piece in load.slices]


def baseline_seconds(seconds: float) -> float:
    """How long the normal p99 is measured: as long as one factor's overload, within BASELINE_MIN_S..BASELINE_MAX_S."""
    return max(BASELINE_MIN_S, min(seconds, BASELINE_MAX_S))


def robust_p99(per_second: list) -> float | None:
    """The median of the usable per-second p99s; None when fewer than soak.MIN_QUARTER_SECONDS are usable."""
    usable = [p for p in per_second if p is not None]
    return soakmod.median(usable) if len(usable) >= soakmod.MIN_QUARTER_SECONDS else None


def recovery_time(per_second: list, normal: float | None, floor_us: int | None = None) -> float | None:
    """The end of the first second from which every usable second's p99 is within tolerance of normal; None: never."""
    if not normal:
        return None
    bound = soakmod.p99_tolerance(normal, floor_us)
    for i in range(len(per_second)):
        rest = [p for p in per_second[i:] if p is not None]
        if rest and all(p <= bound for p in rest):
            return float(i + 1) if i else 0.0
    return None


def overload(backend: str, options=(), seconds: float = CI_SECONDS, factors=FACTORS, *, server_cpus=None,
             loadgen_cpu: int | None = None, capacity_s: float = soakmod.CAPACITY_S, max_rate: float = soakmod.MAX_RATE,
             progress=None) -> list[OverloadRow]:
    """Offer each factor x capacity for ``seconds`` to one server of the variant; one row per factor. The normal
    rate (the baseline's and the recovery's) is the soak's fraction of capacity, capped at ``max_rate``."""
    say = progress or (lambda text: None)
    name = variant_of(backend, options).name
    cpus = None if loadgen_cpu is None else str(loadgen_cpu)
    rows = []
    with ServerProcess(backend, [*options, *soakmod.server_options(CONNS)], cpus=server_cpus) as server:
        capacity, _ = soakmod.capacity(server, cpus, capacity_s)
        rate = min(capacity * soakmod.LOAD_FRACTION, max_rate)
        floor = soakmod.latency_floor(server.target, loadgen_cpu)
        since = soakmod.cpu_mark(server)             # each row's window: the baseline or the previous row's end on
        baseline = normal_p99(server.target, rate, baseline_seconds(seconds), loadgen_cpu)
        normal, worst = robust_p99(baseline), max((p for p in baseline if p is not None), default=None)
        say(f"capacity {capacity:,.0f} req/s; latency floor p99 {floor} us; normal p99 {normal} us at {rate:,.0f} req/s")
        for factor in factors:
            row = OverloadRow(name, factor, capacity, offered_rps=round(factor * capacity, 1), normal_p99_us=normal,
                              normal_worst_p99_us=worst, floor_p99_us=floor)
            overload_once(server, row, seconds, cpus)
            if row.alive:
                per_second = normal_p99(server.target, rate, RECOVERY_WINDOW_S, loadgen_cpu)
                row.recovery_p99_us = robust_p99(per_second)
                row.recovery_best_p99_us = min((p for p in per_second if p is not None), default=None)
                row.recovery_s = recovery_time(per_second, normal, floor)
                row.others_cpu_pct = soakmod.others_cpu_pct(since, server)
                since = soakmod.cpu_mark(server)
            judge(row)
            say(f"{factor}x: offered {row.offered_rps:,.0f}, served {row.served_rps:,.0f} req/s, p99 {row.p99_us} us, "
                f"errors {row.errors or 0}, RSS peak {row.rss_peak_mib:.1f} MiB, p99 after {row.recovery_p99_us} us, "
                f"recovered in {row.recovery_s} s{'  (load generator saturated)' if row.loadgen_saturated else ''}")
            rows.append(row)
    return rows


def overload_once(server: ServerProcess, row: OverloadRow, seconds: float, cpus: str | None) -> None:
    row.rss_before_mib = round(server.rss() / (1 << 20), 1)
    counted, began = server.stats()["requests_total"], time.monotonic()
    with PeakRss(server) as peak:
        result = run_load(LoadParams(target=server.target, mode="open", rate=row.offered_rps, conns=CONNS,
                                     pipeline=PIPELINE, duration=seconds, op="echo", size=64, cpus=cpus,
                                     engine="c"))
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
    """The row's failures and unresolved criteria, one line each: died, RSS over its bound, p99 not back."""
    if not row.alive:
        row.failures.append(f"the server died under {row.factor}x capacity")
        return
    if row.rss_peak_mib > row.rss_before_mib + row.rss_bound_mib:
        row.failures.append(f"RSS peaked at {row.rss_peak_mib:.1f} MiB, over {row.rss_before_mib:.1f} + "
                            f"{row.rss_bound_mib:g} MiB")
    if row.normal_p99_us is None or row.recovery_p99_us is None:
        row.unresolved.append(f"recovery: too few seconds with replies and an unsaturated load generator "
                              f"(need {soakmod.MIN_QUARTER_SECONDS} before the overload and after it)")
        return
    if row.machine_busy:
        row.unresolved.append(f"recovery: {soakmod.busy_reason(row.others_cpu_pct)}")
        return
    limit = soakmod.p99_tolerance(row.normal_p99_us, row.floor_p99_us)
    if row.recovery_p99_us <= limit:
        return
    over = (f"median per-second p99 {row.recovery_p99_us:.0f} us over the {RECOVERY_LIMIT_S:g} s after the load "
            f"dropped, over {limit:.0f} us ({soakmod.P99_FACTOR:g}x normal {row.normal_p99_us:.0f} us, or + the "
            f"floor's {row.floor_p99_us} us)")
    best, worst = row.recovery_best_p99_us, row.normal_worst_p99_us
    if best is not None and best <= limit:
        row.unresolved.append(f"recovery: {over}, but its best second ({best} us) within it: "
                              f"slow recovery not told from noise")
    elif best is not None and worst is not None and best <= worst:
        row.unresolved.append(f"recovery: {over}, every second, but none over the baseline's worst second ({worst} us): "
                              f"at this rate the model's p99 swung that far before the overload too; slow recovery "
                              f"not told from that")
    else:
        row.failures.append(f"p99 not back: {over}, every second" + (f", and over the baseline's worst second "
                                                                      f"({worst} us)" if worst is not None else ""))
