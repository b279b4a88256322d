"""Experiment 3, latency: open loop, offered rate swept from well below to past saturation.

The generator sends on a schedule whatever the replies do (latency counted
from the scheduled send, so a stalled server is not flattered: no coordinated
omission). Rates are fractions of the variant's capacity: its closed-loop
throughput at the same concurrency (50) in this run's throughput experiment
(the median over repeats), or, when that did not run, a closed-loop
calibration point measured here first. Each row has p50, p99,
p99.9 at one offered rate; the knee (the highest offered rate still served
within ``KNEE_KEEPUP`` of it) is computed in summary.csv.
"""
from __future__ import annotations

import statistics
import time

from .harness.run import describe, key

NAME = "latency"


def run(run) -> None:
    run.each_variant(NAME, lambda variant, repeat: measure_variant(run, variant, repeat))


def measure_variant(run, variant, repeat: int) -> None:
    profile = run.profile
    with run.serve(NAME, variant, repeat, max_conns=profile.latency_conns + 100) as server:
        capacity = capacity_of(run, variant, server)
        if not capacity:
            run.skip(NAME, variant, "no capacity measured (calibration served nothing)", point=f"repeat={repeat}")
            return
        for fraction in profile.latency_fractions:
            rate = max(1.0, round(fraction * capacity))
            started = time.monotonic()
            row = run.measure(server, f"rate={rate:g}", "open", profile.latency_conns, rate=rate,
                              size=profile.size, op="echo")
            row.update(key(NAME, variant, repeat), conns=profile.latency_conns, size=profile.size,
                       capacity_rps=capacity, rate_fraction=fraction, offered_rps=rate,
                       workers=profile.pool_workers if variant.is_pool else None, server_cpus=run.server_cpus)
            run.write(NAME, row)
            run.progress(f"[{NAME}] {variant.name} rate={rate:g} ({fraction:g} x capacity) r{repeat}: "
                         f"{describe(row)} ({time.monotonic() - started:.1f} s)")


def capacity_of(run, variant, server) -> float:
    """The variant's capacity (rps): its closed-loop throughput at the same concurrency in this run, else now."""
    known = run.cache.get("throughput", {}).get(variant.name, {})
    at_conns = [rps for rps in known.get(run.profile.latency_conns, []) if rps]
    if at_conns:
        return statistics.median(at_conns)
    if any(known.values()):
        return max(max(values) for values in known.values() if values)
    row = run.measure(server, "calibrate", "closed", run.profile.latency_conns, size=run.profile.size, op="echo")
    capacity = row.get("throughput_rps") or 0.0
    run.progress(f"[{NAME}] {variant.name} calibration: {capacity:.0f} rps closed loop, "
                 f"{run.profile.latency_conns} conns")
    run.cache.setdefault("throughput", {}).setdefault(variant.name, {}).setdefault(
        run.profile.latency_conns, []).append(capacity)
    return capacity
