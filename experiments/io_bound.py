"""Experiment 4, io_bound: every request waits io_us (10 ms) on a "downstream", concurrency swept.

Little's law: in-flight requests = throughput x time in the system. When each
request waits W seconds and at most K of them can wait at once, throughput is
at most K / W. For a thread pool K is its worker count whatever the
concurrency (``little_ceiling_rps`` = min(conns, workers) / W: with 6 workers
and 10 ms, 600 rps); for threads, coroutines, greenlets, epoll and goroutines K
is the concurrency itself (``conc_ceiling_rps`` = conns / W) until the CPU
becomes the limit. Both lines are in every row so the chart can draw them.
"""
from __future__ import annotations

import time

from .harness.run import describe, key

NAME = "io_bound"
US = 1e-6


def run(run) -> None:
    run.each_variant(NAME, lambda variant, repeat: measure_variant(run, variant, repeat))


def ceilings(variant, conns: int, io_us: int, workers: int) -> tuple[float, float]:
    """(conns / wait, the model's Little's-law ceiling) in requests/s."""
    wait = io_us * US
    in_flight = min(conns, workers) if variant.is_pool else conns
    return conns / wait, in_flight / wait


def measure_variant(run, variant, repeat: int) -> None:
    profile = run.profile
    conns_points = sorted(set(profile.io_conns))
    with run.serve(NAME, variant, repeat, max_conns=max(conns_points) + 100) as server:
        for conns in conns_points:
            started = time.monotonic()
            row = run.measure(server, f"conns={conns}", "closed", conns, op="work", work=(profile.io_us, 0),
                              size=0)
            conc, little = ceilings(variant, conns, profile.io_us, profile.pool_workers)
            row.update(key(NAME, variant, repeat), conns=conns, io_us=profile.io_us,
                       workers=profile.pool_workers if variant.is_pool else None, conc_ceiling_rps=conc,
                       little_ceiling_rps=little, server_cpus=run.server_cpus)
            run.write(NAME, row)
            run.progress(f"[{NAME}] {variant.name} conns={conns} r{repeat}: {describe(row)} "
                         f"(ceiling {little:.0f} rps; {time.monotonic() - started:.1f} s)")
