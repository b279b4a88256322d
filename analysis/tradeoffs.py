"""Frames and tables of the trade-off experiments: pool_sizing, message_sizes and m_to_n.

Each frame function takes a loaded ``Run`` and returns medians over the rounds
(``derive.medians``: valid repeats only, with min, max and the 95 % interval of
the median for throughput, latency, CPU and switches per request), in the
shape its chart and finding read (analysis.charts ``draw_<name>``,
analysis.findings ``<name>``). ``TABLES`` gives each experiment's tables under
its charts (analysis.tables reads it).

Per-worker costs: ``pool_costs`` fits, per pool variant and load, the
least-squares line of RSS and of context switches per request against the
worker count over its valid points: the slope is what one extra worker costs.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import derive
from .fmt import num
from .tables import MIB_PER_KIB, MS_PER_US, caption, left_out, pivot, spread_table

POOL_VALUES = ["throughput_rps", "p50_us", "p99_us", "server_rss_kib", "server_threads", "cpu_us_per_req",
               "ctx_per_req", "little_bound_rps", "head_of_line", "conns", "conns_served", "unanswered",
               "max_unanswered_wait_us", "server_conns_active", "errors", "io_us"]
COST_COLUMNS = ["variant", "load", "rss_kib_per_worker", "ctx_per_req_per_worker", "threads_per_worker",
                "from_workers", "to_workers", "points"]
MIN_FIT_POINTS = 2


def pool_sizing(run) -> pd.DataFrame:
    """Medians per (variant, load, workers); workers is NaN for the models beside the pool. ``dispatch`` kept."""
    t = run.tables["pool_sizing"]
    if t.empty:
        return derive.medians(t, ["variant", "load", "workers"], POOL_VALUES)
    out = derive.medians(t, ["variant", "load", "workers"], POOL_VALUES)
    notes = t.groupby(["variant", "load", "workers"], dropna=False)["bound_note"].agg(
        lambda s: "; ".join(dict.fromkeys(s.dropna().astype(str))))
    return out.merge(notes.reset_index(), on=["variant", "load", "workers"], how="left")


def pool_costs(frame: pd.DataFrame) -> pd.DataFrame:
    """Per pool variant and load: the slopes of RSS (KiB), switches per request and threads against workers,
    over the valid points (least squares; NaN with fewer than MIN_FIT_POINTS sizes)."""
    rows = []
    pools = derive.valid(frame)
    pools = pools[pools.workers.notna()] if not pools.empty else pools
    for (variant, load), group in pools.groupby(["variant", "load"], sort=False):
        group = group.sort_values("workers")
        rows.append({"variant": variant, "load": load, "rss_kib_per_worker": _slope(group, "server_rss_kib"),
                     "ctx_per_req_per_worker": _slope(group, "ctx_per_req"),
                     "threads_per_worker": _slope(group, "server_threads"),
                     "from_workers": group.workers.min(), "to_workers": group.workers.max(),
                     "points": group.workers.nunique()})
    return pd.DataFrame(rows, columns=COST_COLUMNS)


def _slope(group: pd.DataFrame, column: str) -> float:
    points = group[["workers", column]].dropna()
    if points.workers.nunique() < MIN_FIT_POINTS:
        return float("nan")
    return float(np.polyfit(points.workers.astype(float), points[column].astype(float), 1)[0])


def message_sizes(run) -> pd.DataFrame:
    """Medians per (variant, size), with MB/s (payload, one direction) and its min and max over the rounds."""
    out = derive.medians(run.tables["message_sizes"], ["variant", "size"],
                         ["throughput_rps", "mb_per_s", "p50_us", "p99_us", "cpu_us_per_req", "ctx_per_req",
                          "conns", "conns_served", "unanswered", "max_unanswered_wait_us", "server_conns_active",
                          "errors"])
    if out.empty:
        return out
    for suffix in ("_min", "_max", "_lo", "_hi"):
        out["mb_per_s" + suffix] = out["throughput_rps" + suffix] * out["size"] / 1e6
    return out


def m_to_n(run) -> pd.DataFrame:
    """Per variant: logical units and OS threads while holding (medians over rounds), what a unit is, notes."""
    t = run.tables["m_to_n"]
    values = ["hold_target", "held", "connections_active", "logical_units", "os_threads", "os_threads_idle",
              "units_per_thread", "rss_kib", "workers"]
    if t.empty:
        return pd.DataFrame(columns=["variant", *values, "logical_unit", "note"])
    out = derive.medians(t, ["variant"], values)
    text = t.groupby("variant")[["logical_unit", "note"]].agg(lambda s: "; ".join(sorted(set(s.dropna()))))
    return out.merge(text.reset_index(), on="variant", how="left")


# -- the tables under the charts --------------------------------------------------------------------

def pool_sizing_tables(run) -> list:
    p = pool_sizing(run)
    if p.empty:
        return []
    pools, beside = p[p.workers.notna()], p[p.workers.isna()]
    out = []
    for load, label in (("io", "I/O-bound (WORK io_us only)"), ("echo", "ECHO")):
        rows = pools[pools.load == load]
        out.append((caption(f"{label}: throughput (rps) by workers: median (min–max over rounds)", rows),
                    pivot(rows, "workers", "throughput_rps", "workers=")))
        if load == "io":
            out.append(("I/O-bound: Little's-law bound min(workers, connections) / wait (rps)",
                        pivot(rows.assign(valid=True), "workers", "little_bound_rps", "workers=")))
        out.append((caption(f"{label}: server RSS (MiB) by workers", rows),
                    pivot(rows, "workers", "server_rss_kib", "workers=", MIB_PER_KIB)))
        out.append((caption(f"{label}: context switches per request by workers", rows),
                    pivot(rows, "workers", "ctx_per_req", "workers=")))
        out.append((caption(f"{label}: server CPU per request (µs) by workers", rows),
                    pivot(rows, "workers", "cpu_us_per_req", "workers=")))
        out.append((caption(f"{label}: p99 (ms) by workers", rows),
                    pivot(rows, "workers", "p99_us", "workers=", MS_PER_US)))
    if not beside.empty:
        shown = beside[["variant", "load", "throughput_rps", "little_bound_rps", "p50_us", "p99_us",
                        "server_rss_kib", "server_threads", "ctx_per_req", "cpu_us_per_req"]].assign(
            p50_us=beside.p50_us * MS_PER_US, p99_us=beside.p99_us * MS_PER_US,
            server_rss_kib=beside.server_rss_kib * MIB_PER_KIB).rename(columns={
                "little_bound_rps": "bound: connections / wait (rps)", "p50_us": "p50 ms", "p99_us": "p99 ms",
                "server_rss_kib": "RSS MiB", "server_threads": "threads", "ctx_per_req": "switches/req",
                "cpu_us_per_req": "CPU µs/req"})
        out.append(("Beside the pool, at the same loads (medians over rounds)", shown))
    costs = pool_costs(p)
    if not costs.empty:
        out.append(("What one more worker costs: least-squares slopes over the valid pool sizes", costs.rename(
            columns={"rss_kib_per_worker": "RSS KiB/worker", "ctx_per_req_per_worker": "switches per request/worker",
                     "threads_per_worker": "threads/worker", "from_workers": "from workers",
                     "to_workers": "to workers", "points": "sizes"})))
    labelled = p.assign(point=[f"{r.load}, workers={num(r.workers)}" for r in p.itertuples()])
    out += [spread_table(labelled, "point", "load, pool size"), left_out(labelled, "point", "load, pool size")]
    return out


def message_sizes_tables(run) -> list:
    m = message_sizes(run)
    if m.empty:
        return []
    return [(caption("Throughput (rps) by payload (B): median (min–max over rounds)", m),
             pivot(m, "size", "throughput_rps", "B=")),
            (caption("Payload MB/s (one direction) by payload (B): median (min–max over rounds)", m),
             pivot(m, "size", "mb_per_s", "B=")),
            (caption("Server CPU per request (µs) by payload (B)", m), pivot(m, "size", "cpu_us_per_req", "B=")),
            (caption("p99 (ms) by payload (B)", m), pivot(m, "size", "p99_us", "B=", MS_PER_US)),
            spread_table(m, "size", "payload (B)"), left_out(m, "size", "payload (B)")]


def m_to_n_tables(run) -> list:
    m = m_to_n(run)
    if m.empty:
        return []
    columns = ["variant", "logical_unit", "hold_target", "held", "connections_active", "logical_units",
               "os_threads_idle", "os_threads", "units_per_thread", "rss_kib", "note"]
    frame = m[columns].assign(rss_kib=m.rss_kib * MIB_PER_KIB).rename(columns={
        "logical_unit": "one connection is", "connections_active": "connections (STATS)",
        "logical_units": "logical units", "os_threads_idle": "OS threads before", "os_threads": "OS threads held",
        "units_per_thread": "units per OS thread", "rss_kib": "RSS MiB"})
    return [("Logical units vs OS threads while holding idle connections (medians over rounds)", frame)]


TABLES = {"pool_sizing": pool_sizing_tables, "message_sizes": message_sizes_tables, "m_to_n": m_to_n_tables}


def experiment_tables(run, experiment: str) -> list:
    """(caption, frame) pairs under one of these experiments' charts; [] for any other experiment."""
    return TABLES[experiment](run) if experiment in TABLES else []
