"""The tidy tables every run writes: one CSV per experiment, column lists as constants.

The report (and anyone with pandas) relies on these names: ``COLUMNS[table]``
is the exact header of ``results/<run-id>/<table>.csv``, in order. One row is
one measurement (one backend variant, one repeat, one point); nothing is
aggregated in these tables except ``summary.csv``, ``memory_fit.csv`` and
``targets.csv``, which are computed from them. docs/experiments.md documents
every column and its unit.

Units are in the names: ``_kib`` KiB, ``_us`` microseconds, ``_s`` seconds,
``_rps`` requests per second, ``_ns`` nanoseconds. An empty cell means "not
measured" (for instance ``uss_kib`` where /proc/PID/smaps_rollup is not readable).
"""
from __future__ import annotations

import csv
import math
import os

# Every measurement row starts with these: who measured what, and which repeat.
KEY = ("run_id", "experiment", "backend", "variant", "repeat")

# What the load generator reported for one point (adapter: harness.loadproc), and whether the point is valid:
# every connection served, nothing left unanswered, the generator not saturated (loadproc.validity);
# loadgen_engine: "c" (compiled) or "python", the engine that drove the point (loadproc.engine_for).
LOAD = ("duration_s", "requests", "errors", "throughput_rps", "p50_us", "p90_us", "p99_us", "p999_us",
        "p9999_us", "max_us", "loadgen_cpu_percent", "loadgen_saturated", "unanswered", "conns_served",
        "max_unanswered_wait_us", "valid", "invalid_reason", "loadgen_engine")

# What the server process did during that point: the connections it had accepted when measuring began (STATS),
# deltas of /proc counters over the measured window (harness.run.server_deltas), peaks of gauges.
SERVER = ("server_requests", "server_conns_active", "server_cpu_user_s", "server_cpu_sys_s", "server_cpu_percent",
          "server_ctx_voluntary", "server_ctx_involuntary", "cpu_us_per_req", "ctx_per_req",
          "server_rss_kib", "server_threads", "server_fds")

# One point of a server's gauges (memory and c10k).
GAUGES = ("rss_kib", "uss_kib", "vms_kib", "threads", "fds", "tcp_established", "tcp_close_wait", "tcp_time_wait")

# Kernel memory around one memory point (experiments.memory): the change from before the connections were opened
# to while they were held (machine-wide slab, kernel stacks, TCP socket memory; the server's page tables), what
# other processes did meanwhile (TIME_WAIT sockets, TCP sockets and tasks not the server's or its clients'), and
# the load generator's end of the connections held (estimated), which is in the machine's change.
KERNEL = ("kernel_sock_kib", "kernel_stack_kib", "kernel_slab_kib", "kernel_sreclaimable_kib", "kernel_sunreclaim_kib",
          "kernel_pte_kib", "time_wait_delta", "other_sockets_delta", "other_tasks_delta", "client_sock_kib",
          "client_slab_kib")

# The open loop's accounting of one point (the generator's ``open_loop``): requests scheduled inside the measured
# window (offered), of them sent, sent more than OPEN_LATE_US behind schedule (late) and never sent (unsent);
# ``requests`` is what of the offered was answered (served <= offered). The compiled engine also says which sends
# waited for a reply because their connection was full (held: the server was behind) and how many of the others were
# late (own_late: the generator's own lateness); the Python engine cannot tell them apart (both left empty).
OPEN = ("offered", "sent", "late", "unsent", "held", "own_late")

COLUMNS = {
    "memory": KEY + ("n_target", "n_conns", *GAUGES, "connect_errors", "server_cpus", *KERNEL),
    "memory_fit": KEY + ("metric", "per_conn", "intercept", "r2", "n_points", "unit", "max_abs_residual", "residuals"),
    "throughput": KEY + ("conns", "size", "op", "workers", "server_cpus", *LOAD, *SERVER),
    "latency": KEY + ("conns", "size", "capacity_rps", "rate_fraction", "offered_rps", "workers", "server_cpus",
                      *LOAD, *OPEN, *SERVER),
    "io_bound": KEY + ("conns", "io_us", "workers", "conc_ceiling_rps", "little_ceiling_rps", "server_cpus",
                       *LOAD, *SERVER),
    "cpu_bound": KEY + ("conns", "cpu_us", "server_cpus", "n_server_cpus", "gomaxprocs", "ceiling_rps",
                        *LOAD, *SERVER),
    "switch": KEY + ("bench", "pinned", "cpus", "iterations", "rounds", "ns_per_switch", "ns_min", "ns_max",
                     "ctx_voluntary", "ctx_involuntary", "cpu_us_per_req", "ctx_per_req", "source"),
    "c10k": KEY + ("hold_target", "held", "connect_errors", "probe_conns", "requests", "errors", "throughput_rps",
                   "p50_us", "p99_us", "p999_us", "max_us", "loadgen_saturated", "rss_kib", "vms_kib", "threads",
                   "fds", "tcp_established", "tcp_close_wait", "workers", "note"),
    "pool_sizing": KEY + ("load", "workers", "dispatch", "conns", "io_us", "little_bound_rps", "bound_note",
                          "head_of_line", "server_cpus", *LOAD, *SERVER),
    "message_sizes": KEY + ("size", "conns", "max_frame", "mb_per_s", "server_cpus", *LOAD, *SERVER),
    "m_to_n": KEY + ("hold_target", "held", "connections_active", "logical_units", "logical_unit", "os_threads",
                     "os_threads_idle", "units_per_thread", "rss_kib", "workers", "note"),
    "convoy": KEY + ("case", "server_options", "switch_interval", "procs", "gomaxprocs", "server_cpus",
                     "n_server_cpus", "shares_loadgen_cpu", "cpu_conns", "cpu_us", "conns", "rate", "work_rps",
                     "work_p99_us", "work_requests", *LOAD, *OPEN, *SERVER),
    "cores": KEY + ("case", "load", "procs", "gomaxprocs", "server_cpus", "n_server_cpus", "shares_loadgen_cpu",
                    "conns", "cpu_us", "server_procs", "rss_kib_per_proc", *LOAD, *SERVER),
    "redis_call": KEY + ("store", "pool_size", "workers", "little_workers", "little_rate_rps", "little_service_us",
                         "redis_rtt_us", "pool_note", "conns", "size", "rate_limit", "burst", "server_cpus",
                         "redis_cpus", "redis_shares_loadgen_cpu", "rate_store_calls", "rate_store_errors",
                         "store_flag", "redis_cpu_s", "redis_cpu_us_per_req", *LOAD, *SERVER),
    "pitfalls": ("run_id", "backend", "variant", "pitfall", "fixed", "t_s", "fds", "close_wait", "rss_kib",
                 "threads", "served", "starved", "replies_lost"),
    "pitfalls_summary": ("run_id", "backend", "variant", "pitfall", "fixed", "duration_s", "clients", "sent",
                         "served", "starved", "rejected", "replies_lost", "silent_dropped", "fds_start",
                         "fds_end", "fds_peak", "close_wait_end", "close_wait_peak", "rss_kib_start",
                         "rss_kib_peak", "threads_start", "threads_peak", "exit_status"),
    "samples": KEY + ("point", "t_s", "pid", "rss_kib", "uss_kib", "vms_kib", "threads", "fds",
                      "ctx_voluntary", "ctx_involuntary", "cpu_user_s", "cpu_sys_s",
                      "tcp_established", "tcp_close_wait", "tcp_time_wait"),
    "skipped": ("run_id", "experiment", "backend", "variant", "point", "reason"),
    # How quiet the machine was, at the start and end of the run (harness.calibrate): one row per measure.
    "calibration": ("run_id", "phase", "cpu", "metric", "value", "unit"),
    "summary": ("run_id", "experiment", "backend", "variant", "point", "x", "metric", "median", "min", "max", "n",
                "ci_lo", "ci_hi", "ci_flag"),
    "targets": ("run_id", "target", "backend", "variant", "value", "unit", "detail"),
}
# Which experiment writes which of them: experiments.registry (Experiment.tables).

FLOAT_DIGITS = 6          # significant digits kept for floats: small files, no false precision


def cell(value):
    """A value as written to CSV: floats rounded, None/NaN empty, bools as 0/1."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return ""
        return float(f"{value:.{FLOAT_DIGITS}g}")
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return value


class ColumnError(Exception):
    """A row names a column its table does not have: a bug in the harness, never data."""


class TableWriter:
    """Append rows to one CSV, header first; every row is flushed so Ctrl-C keeps what was measured."""

    def __init__(self, path: str, columns: tuple) -> None:
        self.path = path
        self.columns = columns
        new = not os.path.exists(path)
        self._file = open(path, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=columns, extrasaction="raise")
        if new:
            self._writer.writeheader()
            self._file.flush()
        self.rows = []         # what this run wrote, for the summaries

    def write(self, row: dict) -> None:
        """Write one row; a column it lacks is left empty, a column the table lacks is a bug."""
        unknown = set(row) - set(self.columns)
        if unknown:
            raise ColumnError(f"{os.path.basename(self.path)}: unknown columns {sorted(unknown)}")
        full = {c: cell(row.get(c)) for c in self.columns}
        self._writer.writerow(full)
        self._file.flush()
        self.rows.append(dict(full))

    def close(self) -> None:
        self._file.close()
