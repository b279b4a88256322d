"""Experiment 2, throughput: closed loop, 64 B ECHO, concurrency swept (quick: 1, 50, 500; full: 1..1000).

Each connection sends its next request as soon as the reply arrives, so the
throughput at concurrency C is what the server sustains with C requests in
flight. Besides the generator's numbers every row has the server's CPU and
context switches per request (the switch experiment reports them too), and the
point at ``reference_conns`` (50) is the targets' "ratio to go" point. The
latency experiment (capacity) and the switch experiment (per-request costs)
use these rows when the run has them: both list throughput in their registry
``needs`` (experiments.registry).
"""
from __future__ import annotations

import time

from .harness.run import describe, key

NAME = "throughput"


def run(run) -> None:
    run.each_variant(NAME, lambda variant, repeat: measure_variant(run, variant, repeat))


def measure_variant(run, variant, repeat: int) -> None:
    profile = run.profile
    conns_points = sorted(set(profile.throughput_conns))
    with run.serve(NAME, variant, repeat, max_conns=max(conns_points) + 100) as server:
        for conns in conns_points:
            started = time.monotonic()
            row = run.measure(server, f"conns={conns}", "closed", conns, size=profile.size, op="echo")
            row.update(key(NAME, variant, repeat), conns=conns, size=profile.size, op="echo",
                       workers=profile.pool_workers if variant.is_pool else None, server_cpus=run.server_cpus)
            run.write(NAME, row)
            run.progress(f"[{NAME}] {variant.name} conns={conns} r{repeat}: {describe(row)} "
                         f"({time.monotonic() - started:.1f} s)")

