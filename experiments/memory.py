"""Experiment 1, memory: what an idle connection costs each model.

For every N of the profile a fresh server (``--max-conns`` above N, a long
``--idle-timeout``) is made to hold N idle connections; once it has accepted
them and settled, its RSS, USS, VMS, threads and fds are read. N = 0 is read
on the first of those servers, before it holds anything. A least-squares
line over the points gives KiB per connection (RSS: what the kernel maps,
shared pages included; USS: what is this process's alone) and the same slope
for VMS and threads: the "1 MB per thread" of the article is *virtual* stack
(VMS grows by the stack size per thread), while RSS grows by the few KiB a
thread actually touches.
"""
from __future__ import annotations

import time

from . import holding
from .harness.fit import least_squares
from .harness.run import HELD_STOP_GRACE_S

NAME = "memory"
IDLE_TIMEOUT_S = 3600.0        # far longer than any point: nothing may time out while held
CONN_MARGIN = 100              # --max-conns above N, so the cap never bites
FIT_METRICS = {"rss_kib": "KiB/conn", "uss_kib": "KiB/conn", "vms_kib": "KiB/conn", "threads": "threads/conn",
               "fds": "fds/conn"}


def run(run) -> None:
    run.each_variant(NAME, lambda variant, repeat: measure_variant(run, variant, repeat))


def measure_variant(run, variant, repeat: int) -> None:
    points = run.profile.memory_points()
    baseline = 0 in points                     # read on the first server, before it holds anything
    rows = []
    for n in [n for n in points if n > 0] or [0]:
        for row in measure_point(run, variant, repeat, n, baseline):
            run.write("memory", row)
            rows.append(row)
        baseline = False
    for fit_row in fit_rows(rows):
        run.write("memory_fit", {"experiment": NAME, "backend": variant.backend, "variant": variant.name,
                                 "repeat": repeat, **fit_row})


def measure_point(run, variant, repeat: int, n: int, baseline: bool) -> list:
    """Rows for n held connections on a fresh server (and for 0, read before the hold, if ``baseline``)."""
    rows = []
    with run.serve(NAME, variant, repeat, track_ctx=False, max_conns=n + CONN_MARGIN,
                   idle_timeout=IDLE_TIMEOUT_S, stop_grace=HELD_STOP_GRACE_S) as server:
        if baseline or n == 0:
            rows.append(read_point(run, variant, repeat, server, 0, None, time.monotonic()))
        if n > 0:
            started = time.monotonic()
            server.sampler.point = f"n={n}"
            rows.append(read_point(run, variant, repeat, server, n, holding.hold(run, server, n,
                                                                                 holding.measure_window(run)),
                                   started))
    return rows


def read_point(run, variant, repeat: int, server, n: int, h, started: float) -> dict:
    """Settle, read the gauges, let the hold (if any) end; one memory row."""
    server.sampler.point = f"n={n}"
    gauges, held, connect_errors = {}, 0, 0
    try:
        time.sleep(run.profile.settle_s)
        gauges = holding.gauges(server)
        held = holding.accepted(server, h.base_fds) if h else 0
    finally:
        if h:
            server.sampler.stop()              # before thousands of connections (and threads) go away
            _, connect_errors = holding.release(h, gauges.get("tcp_established"))
    row = {"experiment": NAME, "backend": variant.backend, "variant": variant.name, "repeat": repeat,
           "n_target": n, "n_conns": held, **gauges, "connect_errors": connect_errors,
           "server_cpus": run.server_cpus}
    run.progress(f"[{NAME}] {variant.name} n={n} r{repeat}: held {held}, RSS {gauges['rss_kib'] / 1024:.1f} MiB, "
                 f"USS {gauges['uss_kib'] / 1024:.1f} MiB, VMS {gauges['vms_kib'] / 1024:.0f} MiB, "
                 f"{gauges['threads']} threads ({time.monotonic() - started:.1f} s)")
    return row


def fit_rows(rows: list) -> list:
    """memory_fit rows: per metric, the least-squares slope over n_conns (KiB per connection for memory)."""
    out = []
    for metric, unit in FIT_METRICS.items():
        line = least_squares([r["n_conns"] for r in rows], [r.get(metric) for r in rows])
        if line is not None:
            out.append({"metric": metric, "per_conn": line.slope, "intercept": line.intercept, "r2": line.r2,
                        "n_points": line.n, "unit": unit})
    return out
