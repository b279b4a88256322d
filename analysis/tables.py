"""The tables under each experiment's charts: medians over repeats, pivoted to read across.

``experiment_tables(run, experiment)`` returns (caption, DataFrame) pairs; the
page renders them with analysis.html.table. Units are in the column names.
An invalid point (derive.valid) is shown, marked ``INVALID_MARK``, and listed
with its reason in the experiment's "left out" table; the findings never use it.
"""
from __future__ import annotations

import pandas as pd

from . import derive
from .fmt import num
from .results import Run

MS_PER_US = 1e-3
MIB_PER_KIB = 1 / 1024
INVALID_MARK = "✗"                 # after the number of an invalid point (left out of the findings)
INVALID_NOTE = f" ({INVALID_MARK}: invalid point, left out of the findings; why: the table below)"


def pivot(frame: pd.DataFrame, columns: str, values: str, label: str, scale: float = 1.0) -> pd.DataFrame:
    """One row per variant, one column per point (``label`` + the point's number); invalid points marked."""
    if frame.empty:
        return frame
    p = frame.pivot_table(index="variant", columns=columns, values=values, aggfunc="median") * scale
    bad = derive.invalid(frame)
    if not bad.empty:
        p = p.astype(object)
        for r in bad.itertuples():
            value = p.at[r.variant, getattr(r, columns)] if r.variant in p.index else None
            if value is not None and pd.notna(value):
                p.at[r.variant, getattr(r, columns)] = f"{num(value)} {INVALID_MARK}"
    p.columns = [f"{label}{c:g}" for c in p.columns]
    return derive.sort_variants(p.reset_index())


def caption(text: str, frame: pd.DataFrame) -> str:
    return text + (INVALID_NOTE if not derive.invalid(frame).empty else "")


def left_out(frame: pd.DataFrame, point: str, label: str) -> tuple:
    """("Invalid points, left out of the findings", one row per invalid point and why), empty if none."""
    bad = derive.invalid(frame)
    columns = {"variant": "variant", point: label, "conns_served": "connections served",
               "conns": "of connections", "unanswered": "requests unanswered",
               "max_unanswered_wait_us": "oldest unanswered waited (ms)", "invalid_reason": "why"}
    if point == "conns":
        columns[point] = "connections"
    present = [c for c in columns if c in bad]
    rows = bad[present].copy()
    if "max_unanswered_wait_us" in rows:
        rows["max_unanswered_wait_us"] = rows["max_unanswered_wait_us"] * MS_PER_US
    return ("Invalid points, left out of the findings", rows.rename(columns=columns))


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
    return [(caption("Throughput (rps) by concurrency", t), pivot(t, "conns", "throughput_rps", "conns=")),
            (caption("p99 latency (ms) by concurrency", t), pivot(t, "conns", "p99_us", "conns=", MS_PER_US)),
            left_out(t, "conns", "conns")]


def latency(run: Run) -> list:
    knees = derive.knees(run).rename(columns={
        "served_knee": f"served ≥{derive.KEEPUP:.0%} up to (rps)",
        "p99_knee": f"p99 < {derive.KNEE_P99_FACTOR}× up to (rps)",
        "top_rps": "highest offered (rps)", "knee": "knee (rps)", "where": "knee is"})
    lat = derive.latency(run)
    p99 = pivot(lat, "rate_fraction", "p99_us", "p99 ms @", MS_PER_US)
    return [(caption("p99 (ms) by offered load (fraction of capacity)", lat), p99),
            ("The knee (valid points only)", knees), left_out(lat, "rate_fraction", "fraction of capacity")]


def io_bound(run: Run) -> list:
    io = derive.io_bound(run)
    return [(caption("Throughput (rps) by concurrency", io), pivot(io, "conns", "throughput_rps", "conns=")),
            ("Little's-law ceiling (rps)", pivot(io.assign(valid=True), "conns", "little_ceiling_rps", "conns=")),
            left_out(io, "conns", "conns")]


def cpu_bound(run: Run) -> list:
    cpu = derive.cpu_bound(run)
    if cpu.empty:
        return []
    columns = ["variant", "n_server_cpus", "conns", "throughput_rps", "ceiling_rps", "p99_us", "server_cpu_percent"]
    frame = cpu[columns].assign(p99_us=cpu.p99_us * MS_PER_US).rename(columns={"p99_us": "p99_ms"})
    frame["valid"] = ["yes" if ok else f"{INVALID_MARK} {why}" for ok, why in zip(cpu["valid"], cpu["invalid_reason"])]
    return [(caption("Best throughput per variant and CPU count (the best valid point)", cpu), frame)]


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
