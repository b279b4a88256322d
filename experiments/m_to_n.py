"""Experiment m_to_n: M logical units on N OS threads, per model, while holding many idle connections.

Every model gives a connection *something* to live in; the question is how many
OS threads carry those somethings. Each server holds ``profile.mn_conns``
(10,000; tiny: 200) idle connections (the holding machinery of memory and
c10k: experiments.holding), and the harness reads, while they are held:

* ``os_threads``: the server's OS threads, the entries of /proc/PID/task
  (``os_threads_idle``: the same before the hold);
* ``connections_active``: the server's own count (STATS); ``logical_units`` is
  that count, because by each backend's design one connection is one logical
  unit (``DESIGN``, read from the servers' code): a goroutine (servers/go:
  ``go s.handle(conn)`` per connection, plus the runtime's own goroutines), a
  greenlet (servers/green.py: ``StreamServer(spawn=Group.spawn)``), a Protocol
  object (servers/aio.py: asyncio and uvloop; a task only while a WORK waits),
  a Connection on the one epoll loop (servers/epoll.py), a Connection in the
  pool's selector loop (threadpool --dispatch request), an OS thread
  (servers/threads.py), or a pool worker that owns its connection for life
  (threadpool --dispatch connection: beyond ``workers`` the connections wait in
  the pool's queue; such a server cannot answer STATS while every worker is
  held, and ``held``, the server's fds, stands in).

``units_per_thread`` = logical_units / os_threads is the M:N ratio: about 1
for threads, thousands for one event loop, and for Go: goroutines multiplexed
on the few threads its runtime starts (GOMAXPROCS, plus threads in system calls).
"""
from __future__ import annotations

import os
import time

from . import holding
from .harness.run import HELD_STOP_GRACE_S, key

NAME = "m_to_n"
IDLE_TIMEOUT_S = 3600.0
CONN_MARGIN = 100
READ_MARGIN_S = 2.0            # the hold outlasts the reads by this much (it is stopped as soon as they are done)
STATS_TIMEOUT_S = 0.5          # a connection-dispatch pool with every worker held never answers: do not wait long

# variant -> what one connection is, by the backend's design (the servers' module docstrings and code)
DESIGN = {
    "threads": "connection thread (one OS thread per connection)",
    "threadpool": "queued connection (connection dispatch: each worker owns one until it closes, the rest wait)",
    "threadpool-request": "Connection object (request dispatch: one selector loop, workers take requests)",
    "asyncio": "Protocol object (on the event loop; a task only while a WORK waits)",
    "uvloop": "Protocol object (on the libuv loop; a task only while a WORK waits)",
    "gevent": "greenlet (one per connection, on the gevent hub)",
    "epoll": "Connection object (on the one epoll loop)",
    "go": "goroutine (one per connection, plus the runtime's own)",
}


def run(run) -> None:
    run.each_variant(NAME, lambda variant, repeat: measure_variant(run, variant, repeat))


def os_threads(pid: int) -> int | None:
    """The process's OS threads: entries of /proc/PID/task (None if it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


def active_connections(server) -> int | None:
    """The server's connections_active (STATS, less the STATS connection itself); None if it does not answer."""
    stats = server.try_stats(timeout=STATS_TIMEOUT_S)
    active = stats.get("connections_active") if stats else None
    return active - 1 if isinstance(active, int) else None


def units_per_thread(units, threads):
    return units / threads if units is not None and threads else None


def measure_variant(run, variant, repeat: int) -> None:
    n = run.profile.mn_conns
    started = time.monotonic()
    with run.serve(NAME, variant, repeat, track_ctx=False, max_conns=n + CONN_MARGIN, idle_timeout=IDLE_TIMEOUT_S,
                   stop_grace=HELD_STOP_GRACE_S) as server:
        server.sampler.point = f"hold={n}"
        idle_threads = os_threads(server.pid)
        h = holding.hold(run, server, n, holding.measure_window(run) + run.profile.settle_s + READ_MARGIN_S)
        gauges, threads, active = {}, None, None
        try:
            time.sleep(run.profile.settle_s)          # let lazily started threads (pool workers) appear
            gauges = holding.gauges(server)
            threads, active = os_threads(server.pid), active_connections(server)
        finally:
            server.sampler.stop()
            _, connect_errors = holding.release(h, gauges.get("tcp_established"))
    units = active if active is not None else h.held
    row = {**key(NAME, variant, repeat), "hold_target": n, "held": h.held, "connections_active": active,
           "logical_units": units, "logical_unit": DESIGN.get(variant.name, variant.name), "os_threads": threads,
           "os_threads_idle": idle_threads, "units_per_thread": units_per_thread(units, threads),
           "rss_kib": gauges.get("rss_kib"),
           "workers": run.profile.pool_workers if variant.is_pool else None}
    row["note"] = note(row, connect_errors)
    run.write(NAME, row)
    run.progress(f"[{NAME}] {variant.name} r{repeat}: {units} {unit_name(row['logical_unit'])} on {threads} OS "
                 f"threads ({row['units_per_thread'] or 0:.0f} per thread); {row['note']} "
                 f"({time.monotonic() - started:.1f} s)")


def unit_name(logical_unit: str) -> str:
    """The plural of what a logical unit is: "goroutine (one per ...)" -> "goroutines"."""
    return logical_unit.split(" (")[0] + "s"


def note(row: dict, connect_errors) -> str:
    parts = []
    if row["held"] < row["hold_target"]:
        parts.append(f"server accepted {row['held']} of {row['hold_target']}")
    if connect_errors:
        parts.append(f"{connect_errors} held connections failed")
    if row["connections_active"] is None:
        parts.append("STATS unanswered (every worker held): logical units = connections accepted (fds)")
    return "; ".join(parts) or "all held"
