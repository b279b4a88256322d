"""Experiment 3, latency: open loop, offered rate swept from well below to past saturation.

The generator sends on a schedule whatever the replies do (latency counted
from the scheduled send, so a stalled server is not flattered: no coordinated
omission). Rates are fractions of the variant's capacity: its closed-loop
throughput at the same concurrency (50) in this run's throughput experiment
(the median over repeats; latency lists throughput in its registry ``needs``),
or, when the run has no such rows, a closed-loop calibration point measured
here first (once per variant; the manifest's ``needs`` records it). Each row
has p50, p99, p99.9 at one offered rate; the knee is harness.summary.knee.
Once the generator saturates at a rate, the higher rates of that variant and
round are not offered (skipped.csv says so): they would measure the generator.
"""
from __future__ import annotations

import time

from . import registry
from .harness.fit import spread
from .harness.run import describe, key

NAME = "latency"
NOT_OFFERED = "not offered: the load generator saturated"   # skipped.csv's reason for the rates above such a point


def run(run) -> None:
    run.each_variant(NAME, lambda variant, repeat: measure_variant(run, variant, repeat))


def measure_variant(run, variant, repeat: int) -> None:
    profile = run.profile
    with run.serve(NAME, variant, repeat, max_conns=profile.latency_conns + 100) as server:
        capacity = capacity_of(run, variant, server)
        if not capacity:
            run.skip(NAME, variant, "no capacity measured (calibration served nothing)", point=f"repeat={repeat}")
            return
        saturated_at = None
        for fraction in profile.latency_fractions:
            rate = max(1.0, round(fraction * capacity))
            if saturated_at is not None:
                run.skip(NAME, variant, f"{NOT_OFFERED} at {saturated_at:g} rps, a "
                                        f"lower rate (a higher one would measure it, not the server)",
                         point=f"rate={rate:g} repeat={repeat}")
                continue
            started = time.monotonic()
            row = run.measure(server, f"rate={rate:g}", "open", profile.latency_conns, rate=rate,
                              size=profile.size, op="echo")
            row.update(key(NAME, variant, repeat), conns=profile.latency_conns, size=profile.size,
                       capacity_rps=capacity, rate_fraction=fraction, offered_rps=rate,
                       workers=profile.pool_workers if variant.is_pool else None, server_cpus=run.server_cpus)
            run.write(NAME, row)
            run.progress(f"[{NAME}] {variant.name} rate={rate:g} ({fraction:g} x capacity) r{repeat}: "
                         f"{describe(row)} ({time.monotonic() - started:.1f} s)")
            if row.get("loadgen_saturated"):
                saturated_at = rate


def capacity_of(run, variant, server) -> float:
    """The variant's capacity (rps): its closed-loop throughput at the same concurrency in this run's
    throughput rows (else its best at any concurrency), else the capacity an earlier repeat calibrated, else
    a calibration point measured now."""
    rows = [r for r in registry.results(run, NAME, "throughput")
            if r["variant"] == variant.name and r["throughput_rps"]]
    at_conns = spread(r["throughput_rps"] for r in rows if r["conns"] == run.profile.latency_conns)
    if at_conns:
        return at_conns["median"]
    if rows:
        return max(r["throughput_rps"] for r in rows)
    earlier = [r["capacity_rps"] for r in run.tables[NAME].rows if r["variant"] == variant.name and r["capacity_rps"]]
    if earlier:
        return earlier[0]
    row = run.measure(server, "calibrate", "closed", run.profile.latency_conns, size=run.profile.size, op="echo")
    capacity = row.get("throughput_rps") or 0.0
    run.progress(f"[{NAME}] {variant.name} calibration: {capacity:.0f} rps closed loop, "
                 f"{run.profile.latency_conns} conns")
    registry.measured_itself(run, NAME, "throughput", variant)
    return capacity
