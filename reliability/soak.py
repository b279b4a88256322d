"""Soak: a server under steady open-loop load, connection turnover and a mix of faults, sampled every second.

    from conclab.reliability.soak import soak, SoakSize
    result = soak("epoll", [], SoakSize.for_seconds(30))
    result.verdicts, result.samples, result.passed

One run, per backend variant:

1. **Capacity**: a closed loop (the load generator's ``run_load`` on its compiled engine,
   ``CAPACITY_CONNS`` connections, 64 B ECHO) for ``SoakSize.capacity_s`` seconds (``CAPACITY_S``: 3 s
   after 0.5 s of warm-up, long enough for a stable rate on loopback, short next to the soak; the CI
   suite's: 1 s). Its rate is the variant's *capacity* here; if the generator saturated while
   measuring it, the capacity is the generator's ceiling and the result says so
   (``capacity_loadgen_saturated``).
2. **Steady load**: the compiled open loop (``loadgen/c/openloop.c``: latency from the *scheduled*
   send, no coordinated omission) at ``SoakSize.load_fraction`` (``LOAD_FRACTION``, 70 %; the CI
   suite's: 50 %) of that capacity, capped at ``SoakSize.max_rate`` (``MAX_RATE``; the CI suite's:
   5,000 req/s), over ``conns`` connections, a process of its own pinned to the load generator's
   CPU (``SteadyLoad``). Compiled because the rate is a share of each variant's capacity, and
   against the fastest servers a Python generator saturates first. Once a second (``--slice-s``)
   it prints a slice: what it sent, the replies that came in that second with their latencies, and
   its CPU; and (``--replace``) ``REPLACE_FRACTION`` (5 %) of its connections are replaced, between
   two turns of its loop: closed and reconnected, each one only while it has nothing in flight, so
   turnover loses nothing; the new connection takes over the old one's place in the schedule. A
   second is flagged ``loadgen_saturated`` when the generator used >= 90 % of its CPU in it (its
   self-check; polls that found nothing to do are waiting, not load) or when more than
   ``BEHIND_MAX`` of its sends were its own late ones (over 1 ms behind schedule with room on their
   connection): the generator, not the server, may have been behind. Sends that waited for a reply
   (a full pipeline of ``PIPELINE``: the server was slow) are the server's lateness, not the
   generator's, and their latency counts from the schedule.
3. **Faults**, ``FAULT_RATE`` a second in turn (``reliability.scenarios``' clients): a reset mid-frame,
   a clogged reader (pushes ECHOs without reading until the kernel stops taking them or
   ``CLOG_BYTES`` went, then resets),
   a half-close (pipelined ECHOs, SHUT_WR, every reply then EOF), an oversized frame (a header over
   ``--max-frame``: ERROR, then close). Each is a failure if the server does not answer as the
   protocol says.
4. **Samples**, every second (``gauges``): RSS, fds, threads (the launcher's view of the process:
   psutil and /proc), CLOSE_WAIT (``servers.tcpdiag``: sock_diag, filtered in the kernel), that
   second's p99 and replies, and the generator's flag.

Before the steady load, two measures of the machine itself (the lab's first rule: never claim what
the run cannot resolve), recorded with the result:

* **the latency floor**: a short low-rate ECHO probe (``FLOOR_RATE`` req/s over ``FLOOR_CONNS``
  connections for ``FLOOR_S``, the same open loop) against the server under test: its p99 is what a
  request that does nothing costs here now;
* **other processes' CPU** (``conclab.servers.cpustat``, the account the experiments' calibration
  uses): /proc/stat over the probe and the soak, minus this process's and the server's CPU time. Over
  ``BUSY_OTHERS_PCT`` % of one CPU the run is flagged ``machine_busy``.

The verdict (``judge``, a pure function of the samples and totals, so tests feed it synthetic ones).
Each criterion has a state, ``pass``, ``FAIL`` or ``unresolved`` (the data cannot tell, with the
reason in one line); a run has ``passed`` when no criterion FAILed:

* **RSS slope** after the warm-up (the first minute; the first quarter for runs under 2 minutes):
  least squares with its 95 % interval, against ``RSS_SLOPE_BOUND`` (1 KiB per minute per 1,000
  connections held). The interval is made honest for what RSS is (``rss_slope``): the noise is the
  residuals' or a page's quantisation (a uniform error over ``PAGE_BYTES``: sd = page / sqrt(12)),
  whichever is larger, so a flat short run is not mistaken for proof; it is widened for serial
  correlation (an allocator grows in steps, not in independent noise: the residuals' lag-1
  autocorrelation shrinks the effective number of samples); and one page over the measured span is
  added, the slope a single page fault makes. PASS: the interval's upper end under the bound; FAIL:
  its lower end over it, in each half of the measured part too, after a full minute's warm-up
  (growth demonstrated and sustained: an allocator's step or a heap still finding its level grows
  in one half only; and in the server's first minute heaps, pools and arenas still grow to their
  working set, so growth there is unresolved, saying so, never a pass); otherwise unresolved,
  saying the slope this run resolves and about how long a run would resolve the bound;
* **fds and threads flat**: the fitted change over the measured part under ``FLAT_TOLERANCE`` (the
  turnover and the faults keep a few connections in flight at any instant); fds also back to the
  baseline once the load has stopped (threads need not be: Go's runtime and a thread pool keep
  the threads they started). Exact: pass or FAIL;
* **no CLOSE_WAIT**: none left after the load stops, and no socket in CLOSE_WAIT in two samples in
  a row (a half-close holds one for the moment the server takes to answer and close; sockets are
  told apart by the kernel's socket cookie, so two passing through in two samples are not one
  that stays). Exact;
* **0 lost replies**: every request the generator sent was answered, no connection was lost. Exact;
* **p99 drift**: the median of the per-second p99s of the last quarter of the samples against the first quarter's,
  seconds where the load generator saturated left out. FAIL when the last is over the first plus
  the larger of (``P99_FACTOR`` - 1) x the first and the latency floor's p99 (on a quiet machine
  the floor is small and 2x decides; a jittery machine widens the tolerance by what it jitters
  anyway) *and* every usable second of the last quarter, at least ``MIN_DRIFT_SECONDS`` of them,
  is over it (drift demonstrated; a 12 s run's 3 seconds a quarter cannot); pass when
  the median is within it. Unresolved in between (the median over, some seconds within: drift not
  told from noise), when the machine was busy, or when fewer than ``MIN_QUARTER_SECONDS`` usable
  seconds remain in a quarter.

Sizes are set in one place: ``SoakSize`` for one run (``conclab check --soak SECONDS`` builds one
with ``for_seconds``) and ``SuiteSize`` for the test suite (tests/test_soak.py): ``SUITE_CI``, or
``SUITE_FULL`` with ``CONCLAB_FULL=1``, for the soak and the overload both.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise

import psutil
from conclab.loadgen import LoadParams, cengine, run_load
from conclab.loadgen.engine import OPEN_DRAIN_S
from conclab.loadgen.params import LoadError
from conclab.loadgen.report import SATURATION_PERCENT, MachineWatch
from conclab.servers import VARIANTS, cpustat, processes, tcpdiag, variant_of
from conclab.servers.launcher import ServerProcess, ServerStartError, wait_until
from conclab.servers.protocol import ECHO, ERROR, ProtocolError, encode

from .scenarios import push

CAPACITY_S, CAPACITY_WARMUP_S, CAPACITY_CONNS = 3.0, 0.5, 50
LOAD_FRACTION = 0.70
MAX_RATE = 100_000.0           # the steady rate's cap: about what the compiled open loop keeps on schedule on one CPU
                               # here (benchmarks/loadgen_ceiling.py); past it the seconds are flagged, not trusted
REPLACE_FRACTION = 0.05
SOAK_CONNS = 100
PIPELINE = 4                   # per connection in flight at most: room for a slow reply without going off schedule
FAULT_RATE = 2.0               # faults a second
CLOG_BYTES = 256 << 10         # a clogged reader pushes at most this: more than the socket buffers take at once
MAX_FRAME = 65_536             # the server's --max-frame during the soak: the oversized fault sends one over it
SAMPLE_S = 1.0
FULL_WARMUP_S = 60.0           # the warm-up of runs of 2 minutes or more; growth before it cannot FAIL the RSS slope
SPARE_WORKERS = 16             # workers beyond one per connection: the faults' connections, the capacity run's 50
RSS_SLOPE_BOUND = 1024 / 60 / 1000     # bytes per second per connection: 1 KiB per minute per 1,000 connections
PAGE_BYTES = mmap.PAGESIZE     # RSS moves in pages
MAX_AUTOCORRELATION = 0.9      # the RSS residuals' lag-1 autocorrelation counted at most: widens the interval <= 4.4x
FLAT_TOLERANCE = 8             # fds or threads: the fitted change allowed over the measured part
P99_FACTOR = 2.0
MIN_QUARTER_SECONDS = 3        # usable seconds (generator not saturated) each quarter needs for the p99 verdict
MIN_DRIFT_SECONDS = 5          # usable seconds of the last quarter, every one over the tolerance, that FAIL it
FLOOR_RATE, FLOOR_CONNS, FLOOR_S = 1_000.0, 10, 1.5    # the latency floor's probe: an idle server's ECHO
BUSY_OTHERS_PCT = 10.0         # other processes' CPU (% of one CPU) over which the machine is busy: the experiments' limit
SATURATED_CPU = SATURATION_PERCENT   # the load generator's own self-check, applied to each second
BEHIND_MAX = 0.01              # a second whose own late sends (over 1 ms) pass this share of its sends: the generator
                               # was behind (the experiments' schedule rule, per second)
SETTLE_S = 10.0
RESULT_SLACK_S = 120.0         # past the schedule and its drain: the open loop sorts every latency of the run for its result
T_975 = 1.959964               # the normal quantile; Student's t adds a correction for few samples
PASS, FAIL, UNRESOLVED = "pass", "FAIL", "unresolved"


@dataclass(frozen=True)
class SuiteSize:
    """The test suite's sizes for the soak and the overload (tests/test_soak.py), in one place.

    CI: every variant soaks ``soak_s`` at a lower fixed fraction and rate cap (less CPU taken from a
    shared machine, and a generator thread far from its own limit, so a second's p99 is the server's;
    leaks and CLOSE_WAIT do not need a high rate to show), and only ``overload_variants``
    are overloaded: two models that degrade differently (``threads``: a thread per connection,
    the overload waits in the kernel's socket buffers and the OS scheduler shares the CPU among 100 threads;
    ``threadpool-request``: the overload waits as work items in the executor's queue, the one
    model whose memory grows with the backlog). The CI sizes keep the suite within its time
    budget: they check what is exact (no crash, no lost reply, no CLOSE_WAIT, fds and threads
    back) and leave the timing and slope verdicts unresolved, as such short runs must. Full
    (``CONCLAB_FULL=1``): every variant for both, at the soak's and overload's own sizes.
    """
    soak_s: float
    load_fraction: float
    max_rate: float               # req/s: the steady load's cap (soak) and the normal rate's (overload)
    capacity_s: float
    overload_s: float
    overload_variants: tuple


SUITE_CI = SuiteSize(soak_s=5.0, load_fraction=0.5, max_rate=5_000.0, capacity_s=1.0, overload_s=2.0,
                     overload_variants=("threads", "threadpool-request"))
SUITE_FULL = SuiteSize(soak_s=30.0, load_fraction=LOAD_FRACTION, max_rate=MAX_RATE, capacity_s=CAPACITY_S,
                       overload_s=30.0, overload_variants=tuple(VARIANTS))
CI_SECONDS, FULL_SECONDS = SUITE_CI.soak_s, SUITE_FULL.soak_s


def suite() -> SuiteSize:
    """SUITE_CI, or SUITE_FULL when CONCLAB_FULL=1."""
    return SUITE_FULL if os.environ.get("CONCLAB_FULL") == "1" else SUITE_CI


@dataclass(frozen=True)
class SoakSize:
    seconds: float
    conns: int = SOAK_CONNS
    load_fraction: float = LOAD_FRACTION
    replace_fraction: float = REPLACE_FRACTION
    fault_rate: float = FAULT_RATE
    capacity_s: float = CAPACITY_S
    max_rate: float = MAX_RATE

    @staticmethod
    def for_seconds(seconds: float) -> SoakSize:
        return SoakSize(seconds=float(seconds))

    @staticmethod
    def default() -> SoakSize:
        """The test suite's (``suite()``): its seconds, load fraction and capacity run."""
        sizes = suite()
        return SoakSize(seconds=sizes.soak_s, load_fraction=sizes.load_fraction, capacity_s=sizes.capacity_s,
                        max_rate=sizes.max_rate)

    @property
    def warmup(self) -> float:
        """The first minute, or the first quarter of a run under 2 minutes."""
        return FULL_WARMUP_S if self.seconds >= 2 * FULL_WARMUP_S else self.seconds / 4


@dataclass
class Verdict:
    criterion: str
    value: str
    bound: str
    state: str                 # PASS, FAIL or UNRESOLVED
    reason: str = ""           # one line, when it failed or could not be decided

    @property
    def passed(self) -> bool:
        """Not FAILed: an unresolved criterion is no failure (and no pass either: ``state`` says which)."""
        return self.state != FAIL


def exact(criterion: str, value: str, bound: str, ok: bool, reason: str) -> Verdict:
    """A criterion the run measures exactly (a count): pass or FAIL, never unresolved."""
    return Verdict(criterion, value, bound, PASS if ok else FAIL, "" if ok else reason)


@dataclass
class SoakResult:
    variant: str
    size: SoakSize
    capacity_rps: float = 0.0
    capacity_loadgen_saturated: bool = False
    rate: float = 0.0
    floor_p99_us: int | None = None          # the latency floor's probe, before the load
    others_cpu_pct: float | None = None      # other processes' CPU during the probe and the soak, % of one CPU
    samples: list = field(default_factory=list)
    verdicts: list = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(v.passed for v in self.verdicts)

    @property
    def failures(self) -> list[str]:
        return ([self.error] if self.error else []) + [v.reason for v in self.verdicts if not v.passed]

    @property
    def unresolved(self) -> list[str]:
        """``criterion: reason`` of each criterion the run could not decide."""
        return [f"{v.criterion}: {v.reason}" for v in self.verdicts if v.state == UNRESOLVED]

    @property
    def machine_busy(self) -> bool:
        return machine_busy(self.others_cpu_pct)


def machine_busy(others_cpu_pct: float | None) -> bool:
    """Other processes took over BUSY_OTHERS_PCT % of a CPU (unknown: not busy, nothing to go on)."""
    return others_cpu_pct is not None and others_cpu_pct > BUSY_OTHERS_PCT


# -- arithmetic ------------------------------------------------------------------------------------
def t_quantile(df: int) -> float:
    """Student's t 0.975 quantile (Cornish-Fisher expansion; within 1 % for df >= 3)."""
    z = T_975
    df = max(df, 1)
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def slope_interval(ts, ys, noise_floor: float = 0.0) -> tuple[float, float, float]:
    """Least-squares slope of ys over ts with its 95 % interval: (slope, low, high). Needs 3 points.

    ``noise_floor``: the least standard deviation the ys' noise is taken to have (a measurement's own
    resolution: the residuals of a gauge that did not move are 0, its uncertainty is not)."""
    n = len(ts)
    if n < 3:
        raise ValueError("a slope with an interval needs at least 3 samples")
    mt, my = sum(ts) / n, sum(ys) / n
    stt = sum((t - mt) ** 2 for t in ts)
    if stt == 0:
        raise ValueError("the samples have one time only")
    slope = sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / stt
    residual = sum((y - my - slope * (t - mt)) ** 2 for t, y in zip(ts, ys))
    variance = max(residual / (n - 2), noise_floor ** 2)
    half = t_quantile(n - 2) * math.sqrt(variance / stt)
    return slope, slope - half, slope + half


def percentile(counts: Counter, p: float) -> int | None:
    """The p-th percentile of a Counter of values (the smallest value with p % at or below it)."""
    total = sum(counts.values())
    if not total:
        return None
    target, seen = math.ceil(p / 100 * total), 0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= target:
            return value
    return None


def second_p99(sample: dict) -> int | None:
    """A sample's p99: from its latencies when it has them, else its recorded ``p99_us``."""
    if sample.get("latencies"):
        return percentile(sample["latencies"], 99.0)
    return sample.get("p99_us")


def median(values: list) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def p99_tolerance(baseline: float, floor_us: float | None) -> float:
    """The highest p99 still "the same" as ``baseline``: it plus the larger of (P99_FACTOR - 1) x it and the floor."""
    return baseline + max((P99_FACTOR - 1) * baseline, floor_us or 0)


def busy_reason(others_cpu_pct: float) -> str:
    return (f"machine busy: other processes used {others_cpu_pct:.0f} % of a CPU during the run "
            f"(limit {BUSY_OTHERS_PCT:g} %), so its timing is not judged")


# -- the verdict -----------------------------------------------------------------------------------
def judge(samples: list, size: SoakSize, totals: dict) -> list[Verdict]:
    """The criteria over the samples (dicts with t_s, rss_kib, fds, threads, close_wait and ``latencies``,
    a Counter of µs, or ``p99_us``; ``loadgen_saturated`` optional) and the run's totals (lost, settled
    fds/threads/CLOSE_WAIT, baselines, ``floor_p99_us`` and ``others_cpu_pct`` when measured)."""
    measured = [s for s in samples if s["t_s"] >= size.warmup]
    verdicts = [rss_verdict(measured, size)]
    verdicts.append(flat_verdict(measured, "fds", totals.get("fds_baseline"), totals.get("fds_after")))
    verdicts.append(flat_verdict(measured, "threads", None, None))
    verdicts.append(close_wait_verdict(samples, totals.get("close_wait_after", 0)))
    lost = totals.get("lost", 0)
    verdicts.append(exact("lost replies", str(lost), "0", lost == 0,
                          f"{lost} requests sent were never answered ({totals.get('lost_detail', '')})"))
    verdicts.append(p99_verdict(samples, totals.get("floor_p99_us"), totals.get("others_cpu_pct")))
    return verdicts


def rss_verdict(measured: list, size: SoakSize) -> Verdict:
    bound = RSS_SLOPE_BOUND * size.conns * 60             # bytes per minute for this many connections
    label = f"< {bound:.0f} B/min"
    if len(measured) < 3:
        return Verdict("RSS slope", "too few samples", label, UNRESOLVED, f"only {len(measured)} samples after warm-up")
    ts, ys = [s["t_s"] for s in measured], [s["rss_kib"] * 1024 for s in measured]
    slope, statistical, quantum = rss_slope(ts, ys)
    slope, half = slope * 60, (statistical + quantum) * 60
    low, high = slope - half, slope + half
    value = f"{slope:+.0f} B/min [{low:+.0f}, {high:+.0f}]"
    span = ts[-1] - ts[0]
    if high < bound:
        return Verdict("RSS slope", value, label, PASS)
    if low > bound and ts[0] < FULL_WARMUP_S:
        return Verdict("RSS slope", value, label, UNRESOLVED,
                       f"RSS grew {slope:+.0f} B/min (95 % from {low:+.0f}) from {ts[0]:.0f} s on, inside the server's "
                       f"first minute, where heaps, pools and arenas still grow to their working set: a run of 120 s "
                       f"or more (a minute's warm-up) would tell a leak from that")
    if low > bound:
        halves = half_slopes(ts, ys)
        if halves and all(h_low > bound for _, h_low in halves):
            return Verdict("RSS slope", value, label, FAIL,
                           f"RSS grows: {slope:+.0f} B/min (95 % from {low:+.0f}) over {span:.0f} s after the warm-up, "
                           f"in both halves, bound {bound:.0f} B/min for {size.conns} connections")
        seen = " then ".join(f"{h:+.0f}" for h, _ in halves) + " B/min" if halves else "too few samples for halves"
        return Verdict("RSS slope", value, label, UNRESOLVED,
                       f"RSS grew {slope:+.0f} B/min over {span:.0f} s after the warm-up but not throughout ({seen}): a "
                       f"step or a level still settling, not yet a steady leak; a longer run would tell")
    need = seconds_to_resolve(span, statistical * 60, quantum * 60, bound)
    return Verdict("RSS slope", value, label, UNRESOLVED,
                   f"a {size.seconds:g} s run resolves RSS slopes down to +-{half:.0f} B/min (its noise and "
                   f"{PAGE_BYTES} B pages); the bound is {bound:.0f} B/min: about {need:.0f} s (--soak) would resolve it")


def rss_slope(ts: list, ys: list) -> tuple[float, float, float]:
    """(slope, statistical half-width, quantum half-width), bytes per second, of RSS samples one a second.

    Statistical: the least-squares 95 % interval with a page's quantisation as the least noise, widened
    for serial correlation (lag-1 autocorrelation r of the residuals, taken in [0, MAX_AUTOCORRELATION]:
    the effective number of samples is n (1 - r) / (1 + r)): an allocator's steps are not independent
    noise. Quantum: one page over the measured span, the slope a single page fault makes whatever the
    statistics say."""
    slope, low, _ = slope_interval(ts, ys, noise_floor=PAGE_BYTES / math.sqrt(12))
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    r = min(max(lag1_autocorrelation([y - my - slope * (t - mt) for t, y in zip(ts, ys)]), 0.0), MAX_AUTOCORRELATION)
    statistical = (slope - low) * math.sqrt((1 + r) / (1 - r))
    return slope, statistical, PAGE_BYTES / max(ts[-1] - ts[0], 1e-9)


def half_slopes(ts: list, ys: list) -> list[tuple[float, float]]:
    """(slope, interval's lower end) in B/min of each half of the samples (by time); [] with under 3 a half.
    A leak grows in both halves; an allocator's step or a heap finding its level does not."""
    mid = (ts[0] + ts[-1]) / 2
    halves = [[(t, y) for t, y in zip(ts, ys) if (t < mid) == first] for first in (True, False)]
    if min(len(h) for h in halves) < 3:
        return []
    out = []
    for half in halves:
        slope, statistical, quantum = rss_slope([t for t, _ in half], [y for _, y in half])
        out.append((slope * 60, (slope - statistical - quantum) * 60))
    return out


def lag1_autocorrelation(residuals: list) -> float:
    """The residuals' correlation with themselves one sample later (0 when they are all 0)."""
    total = sum(e * e for e in residuals)
    return sum(a * b for a, b in pairwise(residuals)) / total if total else 0.0


def seconds_to_resolve(span: float, statistical: float, quantum: float, bound: float) -> float:
    """The soak length whose RSS slope interval narrows under ``bound``, from this run's: over a measured
    ``span``, the statistical half-width goes as span^-1.5 (one sample a second: the times' sum of squares
    grows as span^3, the noise stays) and the quantum as 1/span. The run adds its warm-up (a quarter under
    2 minutes, a minute from there on); a tenth more for the estimate's own uncertainty, rounded up to 10 s."""
    needed = max(span, 1.0)
    while statistical * (span / needed) ** 1.5 + quantum * span / needed >= bound and needed < 1e7:
        needed *= 1.05
    needed *= 1.1
    total = needed + 60 if needed + 60 >= 120 else needed / 0.75
    return math.ceil(total / 10) * 10


def flat_verdict(measured: list, key: str, baseline, after) -> Verdict:
    if len(measured) < 3:
        return Verdict(key, "too few samples", "flat", UNRESOLVED, f"only {len(measured)} samples after warm-up")
    ts = [s["t_s"] for s in measured]
    slope, _, _ = slope_interval(ts, [s[key] for s in measured])
    change = slope * (ts[-1] - ts[0])
    value = f"{min(s[key] for s in measured)}..{max(s[key] for s in measured)}, trend {change:+.1f}"
    problems = []
    if abs(change) >= FLAT_TOLERANCE:
        problems.append(f"{key} trend {change:+.1f} over {ts[-1] - ts[0]:.0f} s (tolerance {FLAT_TOLERANCE})")
    if baseline is not None and after is not None and after > baseline:
        problems.append(f"{key} {baseline} before the load, {after} after it")
    if baseline is not None and after is not None:
        value += f"; {baseline}->{after}"
    bound = f"trend < {FLAT_TOLERANCE}" + (", back to baseline" if baseline is not None else "")
    return exact(key, value, bound, not problems, "; ".join(problems))


def close_wait_verdict(samples: list, after: int) -> Verdict:
    """FAIL when a socket is in CLOSE_WAIT in two samples in a row, or any is left after the load. The same
    socket, where the samples name them (``close_wait_ids``, the kernel's socket cookies): under turnover and
    half-closes, two samples can each catch a different socket on its way through CLOSE_WAIT, which is not
    one that stays. Samples without names (netlink unavailable) are judged on the counts."""
    runs = [stuck_between(a, b) for a, b in pairwise(samples)]
    stuck = sum(1 for r in runs if r)
    worst = max((s["close_wait"] for s in samples), default=0)
    problems = []
    if stuck:
        problems.append(f"CLOSE_WAIT in {stuck + 1} consecutive samples (up to {worst})")
    if after:
        problems.append(f"{after} CLOSE_WAIT left after the load")
    return exact("CLOSE_WAIT", f"max {worst}, after {after}", "0", not problems, "; ".join(problems))


def p99_verdict(samples: list, floor_us: int | None = None, others_cpu_pct: float | None = None) -> Verdict:
    """Median per-second p99 of the last quarter against the first quarter's (saturated seconds left out)."""
    quarter = math.ceil(len(samples) / 4)          # one sample a second: the first and last quarter of the run

    def usable(part: list) -> list:
        return [p for p in (second_p99(s) for s in part if not s.get("loadgen_saturated")) if p is not None]
    first, last = usable(samples[:quarter]), usable(samples[-quarter:] if quarter else [])
    floor_text = "?" if floor_us is None else f"{floor_us}"
    bound = f"<= first + max({P99_FACTOR - 1:g}x first, floor {floor_text} us)"
    if min(len(first), len(last)) < MIN_QUARTER_SECONDS:
        return Verdict("p99", f"{len(first)} and {len(last)} usable seconds", bound, UNRESOLVED,
                       f"too few seconds with replies and an unsaturated load generator: {len(first)} in the first "
                       f"quarter, {len(last)} in the last (need {MIN_QUARTER_SECONDS} each)")
    before, after = median(first), median(last)
    limit = p99_tolerance(before, floor_us)
    value = f"{before:.0f} -> {after:.0f} us (median of {len(first)} and {len(last)} per-second p99s)"
    if machine_busy(others_cpu_pct):
        return Verdict("p99", value, bound, UNRESOLVED, busy_reason(others_cpu_pct))
    if after <= limit:
        return Verdict("p99", value, f"<= {limit:.0f} us", PASS)
    within = sum(1 for p in last if p <= limit)
    if within:
        return Verdict("p99", value, f"<= {limit:.0f} us", UNRESOLVED,
                       f"p99 {after:.0f} us in the last quarter (median) is over the tolerance {limit:.0f} us, but "
                       f"{within} of its {len(last)} seconds are within it: drift not told from noise")
    if len(last) < MIN_DRIFT_SECONDS:
        return Verdict("p99", value, f"<= {limit:.0f} us", UNRESOLVED,
                       f"p99 {after:.0f} us in the last quarter, {after / before:.1f}x the first quarter's {before:.0f} "
                       f"us, every second over the tolerance {limit:.0f} us, but {len(last)} seconds cannot demonstrate "
                       f"a drift (need {MIN_DRIFT_SECONDS}): a run of {4 * MIN_DRIFT_SECONDS} s or more would tell")
    return Verdict("p99", value, f"<= {limit:.0f} us", FAIL,
                   f"p99 {after:.0f} us in the last quarter, {after / before:.1f}x the first quarter's {before:.0f} us, "
                   f"every second over the tolerance {limit:.0f} us ({P99_FACTOR:g}x, or + the floor's {floor_text} us)")


# -- capacity --------------------------------------------------------------------------------------
def capacity(server: ServerProcess, cpus: str | None = None, seconds: float = CAPACITY_S) -> tuple[float, bool]:
    """(requests/s of a short closed loop, whether the generator saturated measuring it)."""
    warmup = CAPACITY_WARMUP_S * seconds / CAPACITY_S
    result = run_load(LoadParams(target=server.target, mode="closed", conns=CAPACITY_CONNS, duration=seconds,
                                 warmup=warmup, op="echo", size=64, cpus=cpus, engine="c"))
    return result["throughput_rps"], bool(result.get("loadgen_saturated"))


# -- the machine: its latency floor, other processes' CPU ------------------------------------------
def latency_floor(target: str, cpu: int | None) -> int | None:
    """p99 (µs) of a short low-rate ECHO probe (FLOOR_RATE over FLOOR_CONNS for FLOOR_S): what doing nothing costs."""
    size = SoakSize(seconds=FLOOR_S, conns=FLOOR_CONNS, replace_fraction=0.0, fault_rate=0.0)
    load = SteadyLoad(target, FLOOR_RATE, FLOOR_S, size, cpu).start()
    load.join(FLOOR_S + OPEN_DRAIN_S + 10)
    if load.result is None or not load.result["requests"]:
        return None
    return int(load.result["latency_us"]["p99"])


def server_cpu_s(server: ServerProcess) -> float:
    """The server's CPU seconds so far (it is not reaped yet, so getrusage does not count it as ours)."""
    try:
        times = server.process.cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system + times.children_user + times.children_system


def cpu_mark(server: ServerProcess) -> cpustat.Snapshot:
    """/proc/stat now, with this process's and the server's CPU counted as ours."""
    return cpustat.snapshot(server_cpu_s(server))


def others_cpu_pct(since: cpustat.Snapshot, server: ServerProcess) -> float | None:
    """Other processes' CPU since ``since`` on the CPUs this process may use, % of one CPU."""
    share = cpustat.usage(since, cpu_mark(server), sorted(os.sched_getaffinity(0)))["others_cpu_pct"]
    return None if share is None else round(share, 1)


# -- the steady open loop, sliced per second -------------------------------------------------------
EXACT_BELOW = 2048             # with 3 significant figures HDR keeps every value below this apart (its sub-buckets)
SPREAD = 256                   # more distinct latencies than this in one slice: group them by HDR bucket


def bucketed(counts: Counter) -> Counter:
    """``counts`` with values of EXACT_BELOW and up grouped by the HDR bucket they fall in (its lowest value),
    when there are many distinct ones: a second's slice then costs one entry per bucket, not per latency (a
    lagging server's latencies spread out, nearly every one distinct), at the histogram's own resolution."""
    if len(counts) <= SPREAD:
        return counts
    grouped = Counter()
    for value, count in counts.items():
        if value >= EXACT_BELOW:
            shift = value.bit_length() - EXACT_BELOW.bit_length() + 1
            value = value >> shift << shift
        grouped[value] += count
    return grouped


def slice_of(line: dict) -> dict:
    """One of openloop.c's per-second lines as a slice: its replies' latencies, what it sent, the generator's
    CPU share (its polls that found nothing to do are waiting, not load) and whether it fell behind."""
    busy = line["cpu_s"] - line["wait_s"]
    cpu = round(100 * busy / max(line["wall_s"], 1e-3), 1)
    behind = line["own_late"] > BEHIND_MAX * line["sent"]
    return {"latencies": bucketed(Counter({us: n for us, n in line["histogram"]})), "sent": line["sent"],
            "late": line["late"], "own_late": line["own_late"], "loadgen_cpu_percent": cpu,
            "loadgen_behind": behind}


class SteadyLoad:
    """The compiled open loop (``loadgen/c/openloop.c``, ``--slice-s``) as a process of its own pinned to the
    load generator's CPU; a thread here reads its line a second (a slice: what it sent, the replies that came,
    their latency from the scheduled send, its CPU) and its result at the end. ``--replace`` does the
    turnover inside the loop, between two of its turns: ``replace_per_s`` idle connections a second are
    closed and reconnected, each new one in the old one's place in the schedule, so turnover loses nothing.
    Why compiled: the soak's rate is a share of each variant's capacity, and against the fastest servers
    a Python generator saturates first (docs/loadgen.md, "The compiled engine")."""

    def __init__(self, target: str, rate: float, seconds: float, size: SoakSize, cpu: int | None) -> None:
        self.params = LoadParams(target=target, mode="open", rate=rate, conns=size.conns, pipeline=PIPELINE,
                                 duration=seconds, op="echo", size=64, engine="c")
        self.replace_per_s = max(1, round(size.conns * size.replace_fraction)) if size.replace_fraction else 0
        self.cpu = cpu
        self.slices: list = []           # per second: latencies Counter, sent, late, own_late, cpu percent
        self.lock = threading.Lock()
        self.replaced = self.replace_failed = 0
        self.result: dict | None = None
        self.error: str | None = None
        self.proc = None
        self.thread = threading.Thread(target=self._run, name="soak-load", daemon=True)
        self._taken = 0

    def start(self) -> SteadyLoad:
        self.params.validate()
        self.binary = cengine.build("open")
        args = [*cengine.command(self.params, self.binary), "--slice-s", repr(SAMPLE_S)]
        if self.replace_per_s:
            args += ["--replace", str(self.replace_per_s)]
        self.watch = MachineWatch()
        self.stderr = tempfile.TemporaryFile()
        self.proc = processes.spawn(args, cpus=None if self.cpu is None else {self.cpu}, stdout=subprocess.PIPE,
                                    stderr=self.stderr)
        self.thread.start()
        return self

    def _run(self) -> None:
        final = None
        try:
            for raw in self.proc.stdout:
                line = json.loads(raw)
                if "slice" not in line:
                    final = line
                    continue
                with self.lock:
                    self.slices.append(slice_of(line))
            status = self.proc.wait()
            if status != 0 or final is None:
                self.stderr.seek(0)
                said = self.stderr.read().decode(errors="replace").strip().splitlines()
                self.error = f"the compiled open loop exited with status {status}: {said[-1] if said else 'no result'}"
                return
            self.replaced, self.replace_failed = final["replaced"], final["replace_failed"]
            self.result = cengine.assemble(self.params, final, self.watch, self.binary)
        except Exception as exc:  # noqa: BLE001 - reported by the soak, never lost in a thread
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            processes.stop(self.proc, signal.SIGKILL, 1.0)      # reaped (and forgotten) once it ended
            self.proc.stdout.close()
            self.stderr.close()

    def take_slices(self) -> list:
        """The slices made since the last call (the main thread's; ``slices`` keeps every one)."""
        with self.lock:
            fresh, self._taken = self.slices[self._taken:], len(self.slices)
        return fresh

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive() and self.proc is not None:        # hung: stop it, the verdict says so
            processes.stop(self.proc, signal.SIGKILL, 1.0)
            self.thread.join(5)
            self.error = self.error or f"the compiled open loop ran past {timeout:.0f} s and was stopped"


# -- faults ----------------------------------------------------------------------------------------
def fault_reset(server: ServerProcess) -> str | None:
    client = server.connect()
    client.send(encode(ECHO, b"r" * 1000)[:600])
    client.reset()
    return None


def fault_clogged(server: ServerProcess) -> str | None:
    client = server.connect()
    push(client, CLOG_BYTES, encode(ECHO, b"c" * 32_768), stall=0.1, budget=0.5)
    client.reset()
    return None


def fault_half_close(server: ServerProcess) -> str | None:
    frames = [b"h%d" % i * 20 for i in range(5)]
    with server.connect() as client:
        client.send(b"".join(encode(ECHO, f) for f in frames))
        client.sock.shutdown(socket.SHUT_WR)
        ending = client.ending(5.0)
        if client.frames != [(ECHO, f) for f in frames] or ending != "eof":
            return f"half-close: {len(client.frames)} of {len(frames)} replies, then {ending}"
    return None


def fault_oversized(server: ServerProcess) -> str | None:
    with server.connect() as client:
        client.send((MAX_FRAME + 1).to_bytes(4, "big"))
        reply = client.recv_frame()
        ending = client.ending(5.0)
        if reply[0] != ERROR or ending == "open":
            return f"oversized frame: answered {reply[0]:#x} and the connection was {ending}"
    return None


FAULTS = {"reset": fault_reset, "clogged": fault_clogged, "half_close": fault_half_close, "oversized": fault_oversized}


class Faults:
    """Injects FAULTS in turn at ``rate`` a second in a thread; counts each kind, keeps failures."""

    def __init__(self, server: ServerProcess, rate: float) -> None:
        self.server, self.interval = server, 1.0 / rate
        self.done: Counter = Counter()
        self.failures: list = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-faults", daemon=True)

    def _run(self) -> None:
        kinds = list(FAULTS)
        k = 0
        while not self.stop.wait(self.interval):
            kind = kinds[k % len(kinds)]
            k += 1
            try:
                problem = FAULTS[kind](self.server)
            except (OSError, ProtocolError) as exc:
                problem = f"{kind}: {type(exc).__name__}: {exc}"
            self.done[kind] += 1
            if problem and len(self.failures) < 20:
                self.failures.append(problem)

    def start(self) -> Faults:
        self.thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(15)


# -- the run ---------------------------------------------------------------------------------------
def soak(backend: str, options=(), size: SoakSize | None = None, *, server_cpus=None, loadgen_cpu: int | None = None,
         progress=None) -> SoakResult:
    """Measure capacity, then soak one variant for ``size.seconds``; ``progress(text)`` every few seconds.
    A server that cannot start or a load that cannot run is a failed result (``error``), never an exception."""
    size = size or SoakSize.default()
    out = SoakResult(variant_of(backend, options).name, size)
    try:
        return run_soak(out, backend, options, server_cpus, loadgen_cpu, progress or (lambda text: None))
    except (OSError, ServerStartError, LoadError, ProtocolError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out


def run_soak(out: SoakResult, backend: str, options, server_cpus, loadgen_cpu, say) -> SoakResult:
    size = out.size
    with ServerProcess(backend, [*options, *server_options(size.conns)], cpus=server_cpus) as server:
        cpus = None if loadgen_cpu is None else str(loadgen_cpu)
        out.capacity_rps, out.capacity_loadgen_saturated = capacity(server, cpus, size.capacity_s)
        out.rate = round(min(out.capacity_rps * size.load_fraction, size.max_rate), 1)
        say(f"capacity {out.capacity_rps:,.0f} req/s{' (load generator saturated)' if out.capacity_loadgen_saturated else ''}"
            f"; soaking at {out.rate:,.0f} req/s, {size.conns} connections, {size.seconds:g} s")
        baseline = settled_baseline(server)
        since = cpu_mark(server)
        out.floor_p99_us = latency_floor(server.target, loadgen_cpu)
        say(f"latency floor: p99 {out.floor_p99_us} us at {FLOOR_RATE:,.0f} req/s")
        load = SteadyLoad(server.target, out.rate, size.seconds, size, loadgen_cpu).start()
        faults = Faults(server, size.fault_rate).start()
        out.samples = sample_while(load, server, size, say)
        faults.finish()
        load.join(size.seconds + OPEN_DRAIN_S + RESULT_SLACK_S)
        out.others_cpu_pct = others_cpu_pct(since, server)     # once the load generator is reaped: its CPU is ours
        if load.error or load.result is None:
            out.error = f"the load generator failed: {load.error or 'no result'}"
        if not server.alive():
            out.error = f"the server died (exit {server.proc.poll()}): {server.errors()[-200:]!r}"
        wait_until(lambda: server.fds() <= baseline["fds"] and close_wait(server) == 0, SETTLE_S, 0.2)
        after = gauges(server) if server.alive() else {}
    out.totals = totals_of(load, faults, baseline, after)
    if faults.failures:
        out.error = (out.error + "; " if out.error else "") + f"{len(faults.failures)} faults misanswered: {faults.failures[0]}"
    out.totals["loadgen_saturated_seconds"] = sum(1 for s in out.samples if s["loadgen_saturated"])
    out.totals.update(floor_p99_us=out.floor_p99_us, others_cpu_pct=out.others_cpu_pct)
    if out.machine_busy:
        say(busy_reason(out.others_cpu_pct))
    out.verdicts = judge(out.samples, size, out.totals)
    return out


def server_options(conns: int) -> list[str]:
    """--max-frame for the oversized fault, and a worker per connection: the connection-dispatch pool gives a
    worker to a connection for its life, so with fewer the rest would starve in its queue (its head-of-line
    blocking, which scenarios of its own show), not leak. ``--workers`` is accepted by every backend."""
    return ["--max-frame", str(MAX_FRAME), "--workers", str(conns + SPARE_WORKERS)]


def stuck_between(earlier: dict, later: dict) -> bool:
    """A socket in CLOSE_WAIT in both samples: the same one by name, or (unnamed) any in both."""
    ids = earlier.get("close_wait_ids"), later.get("close_wait_ids")
    if ids[0] is not None and ids[1] is not None:
        return bool(ids[0] & ids[1])
    return bool(earlier["close_wait"] and later["close_wait"])


def close_wait_ids(server: ServerProcess) -> frozenset | None:
    """The kernel's cookies of the server's sockets in CLOSE_WAIT (None when netlink fails)."""
    try:
        return tcpdiag.close_wait_sockets(server.port)
    except OSError:
        return None


def close_wait(server: ServerProcess) -> int:
    """The server's sockets in CLOSE_WAIT (sock_diag; the launcher's psutil reading if netlink fails)."""
    try:
        return tcpdiag.count(server.port, (tcpdiag.TCP_CLOSE_WAIT,))["tcp_close_wait"]
    except OSError:
        return server.close_wait()


def gauges(server: ServerProcess) -> dict:
    """RSS (KiB), fds, threads and CLOSE_WAIT of the server, now."""
    ids = close_wait_ids(server)
    return {"rss_kib": server.rss() // 1024, "fds": server.fds(), "threads": server.process.num_threads(),
            "tcp_close_wait": len(ids) if ids is not None else close_wait(server), "close_wait_ids": ids}


def settled_baseline(server: ServerProcess) -> dict:
    """The server's gauges once the capacity run's connections are gone (the least fds of a few reads)."""
    wait_until(lambda: server.stats()["connections_active"] <= 1 and close_wait(server) == 0, SETTLE_S, 0.1)
    reads = []
    for _ in range(5):
        time.sleep(0.1)
        reads.append(gauges(server))
    return min(reads, key=lambda row: row["fds"])


def sample_while(load: SteadyLoad, server: ServerProcess, size: SoakSize, say) -> list:
    """One sample a second until the load ends: the server's gauges and what the load saw since the last one."""
    samples, t0, shown = [], time.monotonic(), 0.0
    while load.thread.is_alive() and time.monotonic() - t0 < size.seconds:    # after it, the load winds down
        time.sleep(max(0.0, SAMPLE_S - (time.monotonic() - t0) % SAMPLE_S))
        pieces = load.take_slices()
        if not pieces:
            continue
        try:
            row = gauges(server)
        except Exception:                     # noqa: BLE001 - the server is gone: the verdict says so
            break
        if not load.thread.is_alive() or time.monotonic() - t0 > size.seconds:   # read as the load wound down
            break
        samples.append(sample_of(time.monotonic() - t0, row, pieces))
        if time.monotonic() - t0 - shown >= 5.0:
            shown = time.monotonic() - t0
            last = samples[-1]
            say(f"{last['t_s']:5.0f} s  RSS {row['rss_kib'] / 1024:7.1f} MiB  fds {row['fds']:4d}  threads "
                f"{row['threads']:4d}  CLOSE_WAIT {last['close_wait']}  p99 {last['p99_us']} us"
                f"{'  (load generator saturated)' if last['loadgen_saturated'] else ''}")
    return samples


def sample_of(t_s: float, row: dict, pieces: list) -> dict:
    """One sample: the server's gauges and the load's slices since the previous sample, merged."""
    latencies = Counter()
    for piece in pieces:
        latencies.update(piece["latencies"])
    cpu = max(piece["loadgen_cpu_percent"] for piece in pieces)
    return {"t_s": round(t_s, 2), "rss_kib": row["rss_kib"], "fds": row["fds"], "threads": row["threads"],
            "close_wait": row.get("tcp_close_wait", 0), "close_wait_ids": row.get("close_wait_ids"),
            "replies": sum(latencies.values()),
            "p99_us": percentile(latencies, 99.0), "sent": sum(p["sent"] for p in pieces),
            "late": sum(p["late"] for p in pieces), "loadgen_cpu_percent": cpu,
            "loadgen_saturated": any(map(loadgen_flagged, pieces)), "latencies": latencies}


def loadgen_flagged(piece: dict) -> bool:
    """A slice the load generator may have been behind in: its CPU self-check, or its own late sends."""
    return piece["loadgen_cpu_percent"] >= SATURATED_CPU or piece["loadgen_behind"]


def totals_of(load: SteadyLoad, faults: Faults, baseline: dict, after: dict) -> dict:
    result = load.result or {}
    counts = result.get("open_loop", {})
    conns = result.get("connections", {})
    unanswered, in_flight = result.get("unanswered", 0), conns.get("lost_in_flight", 0)
    lost = unanswered + in_flight + conns.get("lost", 0)
    return {"sent": counts.get("sent", 0), "replies": result.get("requests", 0), "unsent": counts.get("unsent", 0),
            "lost": lost, "lost_detail": f"{unanswered} unanswered, {conns.get('lost', 0)} connections lost with "
                                         f"{in_flight} in flight; errors {result.get('errors', {})}",
            "replaced": load.replaced, "replace_failed": load.replace_failed, "faults": dict(faults.done),
            "fds_baseline": baseline.get("fds"), "fds_after": after.get("fds"),
            "threads_baseline": baseline.get("threads"), "threads_after": after.get("threads"),
            "close_wait_after": after.get("tcp_close_wait", 0)}
