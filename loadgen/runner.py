"""``run_load(params) -> result dict``: plan the processes, run them, merge exactly, check ourselves.

This is the programmatic API the experiments call and what ``conclab load``
prints. Planning: connections are split over ``--procs`` processes, more if
one process's descriptor limit cannot hold its share; when the connections
outnumber one source address's ephemeral ports, several 127.0.0.x source
addresses are used (loopback targets only). Merging: histograms are added
bucket by bucket (``histo.merge``), counters summed.
"""
from __future__ import annotations

import ipaddress
import math
import os
import time
from collections import Counter
from pathlib import Path

from . import conn as connmod
from . import histo
from .engine import OPEN_DRAIN_S, OPEN_LATE_US, Worker, open_connections
from .fleet import RESULT_GRACE_S, START_DELAY_S, Fleet, WorkerSpec, fd_budget, run_local, split
from .params import LoadError, LoadParams
from .progress import Progress
from .report import MachineWatch, cpu_check

PREFLIGHT_TIMEOUT_S = 3.0      # the first connection, which tells "nothing listens there" at once
EPHEMERAL_RESERVE = 1_000      # ephemeral ports left for everyone else on the machine
PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def run_load(params: LoadParams) -> dict:
    """Run the load ``params`` describe; return the result (see docs/loadgen.md)."""
    params.validate()
    if params.engine == "locust":
        from .locust_engine import run_locust
        return run_locust(params)
    if params.mode == "hold":
        from .hold import run_hold
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


def traffic_worker(spec: WorkerSpec, channel) -> None:
    """One process's closed- or open-loop share (runs here or in a spawned process)."""
    socks, errors = open_connections(spec.params, spec.conns, spec.sources)
    channel.ready({"opened": len(socks), "connect_errors": dict(errors)})
    start = channel.wait_go()
    if start is None:
        for sock in socks:
            sock.close()
        return
    worker = Worker(spec.params, socks, spec.rate, channel.progress, spec.phase, channel.stopped)
    result = worker.run(start)
    result["connect_errors"] = dict(errors)
    channel.result(result)


# -- planning ---------------------------------------------------------------------------------
def preflight(params: LoadParams) -> None:
    """One connection first, so an unreachable target is one clear line, not a wall of errors."""
    family, address = connmod.resolve(params.target)
    try:
        connmod.probe(family, address, min(params.connect_timeout, PREFLIGHT_TIMEOUT_S))
    except OSError as exc:
        reason = connmod.reason_of(exc)
        hint = " (is a server running there? e.g. `conclab serve threads --port 7878`)" if reason == "refused" else ""
        raise LoadError(f"cannot connect to {params.target}: {describe(exc)}{hint}") from None


def describe(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def plan(params: LoadParams, conns: int, rate: float | None = None) -> list[WorkerSpec]:
    """Split ``conns`` (and the rate) over the processes."""
    rate = params.rate if rate is None else rate
    procs = min(max(params.procs, math.ceil(conns / fd_budget())), conns)
    sources = plan_sources(params, conns + (params.probe_conns if params.mode == "hold" else 0))
    cpus = params.cpu_list
    specs = []
    for i, share in enumerate(split(conns, procs)):
        specs.append(WorkerSpec(index=i, params=params, conns=share, rate=rate * share / conns if rate else None,
                                phase=i / procs, procs=procs, sources=sources, cpu=cpus[i % len(cpus)] if cpus else None))
    return specs


def plan_sources(params: LoadParams, conns: int) -> list[str] | None:
    """Source addresses: the user's, or enough 127.0.0.x when one address runs out of ports."""
    if params.sources:
        return params.sources
    per_source = ephemeral_ports() - EPHEMERAL_RESERVE
    if conns <= per_source:
        return None
    host = params.address[0]
    try:
        loopback = ipaddress.ip_address(host).version == 4 and ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise LoadError(f"{conns} connections need more than one source address ({per_source} ephemeral ports each): "
                        f"give --source-addrs")
    return [f"127.0.0.{i + 1}" for i in range(math.ceil(conns / per_source))]


def ephemeral_ports() -> int:
    try:
        low, high = map(int, PORT_RANGE_FILE.read_text().split())
        return high - low + 1
    except (OSError, ValueError):
        return 28_232                                  # Linux's default 32768..60999


def cpus_usable(params: LoadParams, procs: int) -> int:
    cpus = params.cpu_list or sorted(os.sched_getaffinity(0))
    return min(procs, len(cpus))


# -- running ----------------------------------------------------------------------------------
def check_ready(params: LoadParams, infos: list[dict]) -> None:
    if sum(info["opened"] for info in infos) == 0:
        errors = Counter()
        for info in infos:
            errors.update(info["connect_errors"])
        raise LoadError(f"could not open any connection to {params.target}: {dict(errors)}")


def execute(fn, specs: list[WorkerSpec], progress: Progress, planned_s: float) -> list[dict]:
    """Run ``fn`` for every spec (here if there is one, else in spawned processes); the parts, in order."""
    params = specs[0].params
    t0 = [time.monotonic()]

    def on_ready(infos: list[dict]) -> None:
        check_ready(params, infos)
        t0[0] = time.monotonic()

    def on_progress(count: int) -> None:
        progress.update(time.monotonic() - t0[0], count)

    try:
        if len(specs) == 1:
            return run_local(fn, specs[0], on_ready, on_progress)
        fleet = Fleet(fn, specs)
        try:
            check_ready(params, fleet.wait_ready())
            t0[0] = time.monotonic() + START_DELAY_S
            fleet.start_all()
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
        "scheduled": counts["sent"] + counts["unsent"],
        "sent": counts["sent"],
        "late": counts["late"],
        "late_threshold_us": OPEN_LATE_US,
        "unsent": counts["unsent"],
        "unanswered": counts["unanswered"],
        "not_on_schedule": counts["late"] + counts["unsent"],
        "achieved_send_rps": round(counts["sent"] / duration, 1) if duration else 0.0,
        "uncorrected_latency_us": histo.summary(uncorrected),
        "uncorrected_histogram": histo.encode(uncorrected),
    }
