"""The tables under each experiment's charts: medians over repeats, pivoted to read across.

``experiment_tables(run, experiment)`` returns (caption, DataFrame) pairs; the
page renders them with analysis.html.table. Units are in the column names.
"""
from __future__ import annotations

import pandas as pd

from . import derive
from .results import Run

MS_PER_US = 1e-3
MIB_PER_KIB = 1 / 1024


def pivot(frame: pd.DataFrame, columns: str, values: str, label: str, scale: float = 1.0) -> pd.DataFrame:
    """One row per variant, one column per point (``label`` + the point's number)."""
    if frame.empty:
        return frame
    p = frame.pivot_table(index="variant", columns=columns, values=values, aggfunc="median") * scale
    p.columns = [f"{label}{c:g}" for c in p.columns]
    return derive.sort_variants(p.reset_index())


def memory(run: Run) -> list:
    points = derive.memory_points(run)
    slopes = derive.memory_slopes(run).rename(columns={
        "rss_kib": "RSS KiB/conn", "uss_kib": "USS KiB/conn", "vms_kib": "VMS KiB/conn",
        "threads": "threads/conn", "fds": "fds/conn", "rss_r2": "RSS fit r²"})
    return [("RSS (MiB) by idle connections held", pivot(points, "n_target", "rss_kib", "n=", MIB_PER_KIB)),
            ("Connections actually held", pivot(points, "n_target", "n_conns", "n=")),
            ("Per-connection slopes (least squares)", slopes)]


def throughput(run: Run) -> list:
    t = derive.throughput(run)
    return [("Throughput (rps) by concurrency", pivot(t, "conns", "throughput_rps", "conns=")),
            ("p99 latency (ms) by concurrency", pivot(t, "conns", "p99_us", "conns=", MS_PER_US))]


def latency(run: Run) -> list:
    knees = derive.knees(run).rename(columns={
        "served_knee": f"served ≥{derive.KEEPUP:.0%} up to (rps)",
        "p99_knee": f"p99 < {derive.KNEE_P99_FACTOR}× up to (rps)",
        "top_rps": "highest offered (rps)", "knee": "knee (rps)", "where": "knee is"})
    p99 = pivot(derive.latency(run), "rate_fraction", "p99_us", "p99 ms @", MS_PER_US)
    return [("p99 (ms) by offered load (fraction of capacity)", p99), ("The knee", knees)]


def io_bound(run: Run) -> list:
    io = derive.io_bound(run)
    return [("Throughput (rps) by concurrency", pivot(io, "conns", "throughput_rps", "conns=")),
            ("Little's-law ceiling (rps)", pivot(io, "conns", "little_ceiling_rps", "conns="))]


def cpu_bound(run: Run) -> list:
    cpu = derive.cpu_bound(run)
    if cpu.empty:
        return []
    columns = ["variant", "n_server_cpus", "conns", "throughput_rps", "ceiling_rps", "p99_us", "server_cpu_percent"]
    frame = cpu[columns].assign(p99_us=cpu.p99_us * MS_PER_US).rename(columns={"p99_us": "p99_ms"})
    return [("Best throughput per variant and CPU count", frame)]


def switch(run: Run) -> list:
    return [("Microbenchmarks (ns per switch, median over rounds)", derive.switch_micro(run)),
            ("Server cost per request at the reference point", derive.per_request(run))]


def c10k(run: Run) -> list:
    c = derive.c10k(run)
    if c.empty:
        return []
    columns = ["variant", "hold_target", "held", "connect_errors", "requests", "errors", "p99_us", "rss_kib",
               "threads", "note"]
    frame = c[columns].assign(p99_us=c.p99_us * MS_PER_US, rss_kib=c.rss_kib * MIB_PER_KIB).rename(columns={
        "held": "connected", "connect_errors": "failed", "requests": "probe requests", "p99_us": "p99 ms",
        "rss_kib": "RSS MiB"})
    return [("Holding idle connections", frame)]


TABLES = {"memory": memory, "throughput": throughput, "latency": latency, "io_bound": io_bound,
          "cpu_bound": cpu_bound, "switch": switch, "c10k": c10k}


def experiment_tables(run: Run, experiment: str) -> list:
    """(caption, frame) pairs shown under an experiment's charts; empty frames are left out by the page."""
    return TABLES[experiment](run) if experiment in TABLES else []
