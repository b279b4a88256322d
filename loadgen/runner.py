"""``run_load(params) -> result dict``: pick the mode, run its processes, merge exactly, check ourselves.

This is the programmatic API (``conclab check``'s scenarios call it) and what
``conclab load`` prints. The plan (how connections split over processes and source addresses)
and the checks before a run are ``plan``'s; closed and open loop run here
(``engine.traffic_worker`` in each process), hold in ``hold``, Locust in
``locust_engine``. Merging: histograms are added bucket by bucket
(``histo.merge``), counters summed (the oldest unanswered wait: the maximum).

Imports go one way: runner -> hold / locust_engine -> plan, engine, fleet, ...;
nothing below imports runner.
"""
from __future__ import annotations

import sys
import time
from collections import Counter

from . import histo
from .engine import OPEN_DRAIN_S, OPEN_LATE_US, traffic_worker
from .fleet import RESULT_GRACE_S, START_DELAY_S, Fleet, WorkerSpec, run_local
from .hold import run_hold
from .locust_engine import run_locust
from .params import LoadParams
from .plan import check_ready, cpus_usable, plan, preflight
from .progress import Progress
from .report import MachineWatch, cpu_check

WINDOW_MARK = "conclab load: window"     # the stderr line of announce_window


def run_load(params: LoadParams) -> dict:
    """Run the load ``params`` describe; return the result (see docs/loadgen.md)."""
    params.validate()
    if params.engine == "locust":
        return run_locust(params)
    if params.engine == "c":
        from .cengine import run_c      # (imported on use: it builds with cc)
        return run_c(params)
    if params.mode == "hold":
        return run_hold(params)
    return run_traffic(params)


def run_traffic(params: LoadParams) -> dict:
    """Closed or open loop."""
    preflight(params)
    watch = MachineWatch()
    specs = plan(params, params.conns)
    planned = params.warmup + params.duration + (OPEN_DRAIN_S if params.mode == "open" else 0)
    parts = execute(traffic_worker, specs, Progress(params.progress, params.warmup + params.duration), planned)
    return assemble(params, specs, parts, watch)


# -- running ----------------------------------------------------------------------------------
def announce_window(params: LoadParams, start_ns: int) -> None:
    """With ``params.announce``: say on stderr, as the run starts, when its measured window will start and end.

    One line, ``conclab load: window START END``: seconds on CLOCK_MONOTONIC (``time.monotonic()`` in
    any process of the machine), the warm-up's end and the planned end. Whoever runs the generator (the
    experiments harness) can then read the server at exactly those instants.
    """
    if not params.announce:
        return
    start = (start_ns + int(params.warmup * 1e9)) / 1e9
    print(f"{WINDOW_MARK} {start:.6f} {start + params.duration:.6f}", file=sys.stderr, flush=True)


def execute(fn, specs: list[WorkerSpec], progress: Progress, planned_s: float) -> list[dict]:
    """Run ``fn`` for every spec (here if there is one, else in spawned processes); the parts, in order."""
    params = specs[0].params
    t0 = [time.monotonic()]

    def on_ready(infos: list[dict]) -> None:
        check_ready(params, infos)
        t0[0] = time.monotonic()
        announce_window(params, time.perf_counter_ns())       # the worker starts at once (LocalChannel.wait_go)

    def on_progress(count: int) -> None:
        progress.update(time.monotonic() - t0[0], count)

    try:
        if len(specs) == 1:
            return run_local(fn, specs[0], on_ready, on_progress)
        fleet = Fleet(fn, specs)
        try:
            check_ready(params, fleet.wait_ready())
            t0[0] = time.monotonic() + START_DELAY_S
            announce_window(params, fleet.start_all())
            return fleet.results_within(planned_s + RESULT_GRACE_S, on_progress)
        finally:
            fleet.close()
    finally:
        progress.close()


# -- the result -------------------------------------------------------------------------------
def assemble(params: LoadParams, specs: list[WorkerSpec], parts: list[dict], watch: MachineWatch) -> dict:
    """Merge the processes' parts into the result dict."""
    merged = histo.merge([p["histogram"] for p in parts])
    errors = Counter()
    for p in parts:
        errors.update(p["errors"])
        errors.update(p.get("connect_errors", {}))
    duration = max(p["duration_s"] for p in parts)
    requests = merged.get_total_count()
    result = {
        "params": params.as_dict(),
        "started_at": watch.started_at,
        "requests": requests,
        "errors": dict(errors),
        "duration_s": round(duration, 4),
        "throughput_rps": round(requests / duration, 1) if duration else 0.0,
        "latency_us": histo.summary(merged),
        "histogram": histo.encode(merged),
        "connections": connections_block(params, parts),
        "unanswered": sum(p.get("unanswered", 0) for p in parts),
        "max_unanswered_wait_us": max((p.get("max_unanswered_wait_us", 0) for p in parts), default=0),
        "loadgen_procs": len(parts),
        **cpu_check(parts, cpus_usable(params, len(parts))),
        "clamped_latencies": sum(p.get("clamped", 0) for p in parts),
    }
    if len(parts) > 1:
        result["histograms_per_process"] = [p["histogram"] for p in parts]
    if params.mode == "open":
        result["open_loop"] = open_block(params, parts, duration)
    result["machine"] = watch.finish()
    return result


def connections_block(params: LoadParams, parts: list[dict]) -> dict:
    opened = sum(p["connections"]["opened"] for p in parts)
    return {"requested": params.conns, "opened": opened, "failed": params.conns - opened,
            "served": sum(p["connections"].get("served", 0) for p in parts),
            "lost": sum(p["connections"]["lost"] for p in parts),
            "lost_in_flight": sum(p["connections"]["lost_in_flight"] for p in parts)}


def open_block(params: LoadParams, parts: list[dict], duration: float) -> dict:
    """Open-loop bookkeeping: the schedule kept or not, and the latency *without* the correction."""
    counts = Counter()
    for p in parts:
        counts.update(p["open_loop"])
    uncorrected = histo.merge([p["uncorrected_histogram"] for p in parts])
    return {
        "rate": params.rate,
        "offered": counts["offered"],
        "sent": counts["sent"],
        "late": counts["late"],
        "late_threshold_us": OPEN_LATE_US,
        "unsent": counts["unsent"],
        "unanswered": counts["unanswered"],
        "not_on_schedule": counts["late"] + counts["unsent"],
        "achieved_send_rps": round(counts["sent"] / duration, 1) if duration else 0.0,
        "send_lateness_us": histo.summary(histo.merge([p["send_lateness_histogram"] for p in parts])),
        "uncorrected_latency_us": histo.summary(uncorrected),
        "uncorrected_histogram": histo.encode(uncorrected),
    }
