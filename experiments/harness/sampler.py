"""What a server process is doing, read from psutil and /proc at a fixed interval.

One ``Probe`` per server process reads:

* memory: RSS and VMS (psutil, /proc/PID/statm), USS (psutil, smaps_rollup);
* threads, open fds;
* user/sys CPU seconds (/proc/PID/stat: the whole process, exited threads included);
* voluntary/involuntary context switches, summed over *every thread*:
  /proc/PID/status (and so psutil's ``num_ctx_switches``) counts only the main
  thread, which would make a thread-per-connection server look like it never
  switches. Threads that exit take their counts with them, so the probe keeps
  the last count it saw per thread id: exact for threads alive at both ends of
  a point, a lower bound for threads that exit within one sampling interval;
* TCP states of sockets whose local port is the server's (its side of every
  connection): ESTABLISHED, CLOSE_WAIT, TIME_WAIT (sock_diag, filtered in the
  kernel; /proc/net/tcp and tcp6 if netlink is unavailable).

A server started with ``--procs N`` is a parent and N worker processes: every
gauge and counter above is summed over the parent and its children (RSS, USS
and VMS, threads, fds, CPU, context switches), so a number is the server's, not
its parent's. The children are looked up at each sample (the sampler's thread)
and reused by ``counters`` (the window's edges, where a scan of /proc would
delay the read); a single-process server has none and costs nothing more.

``Sampler`` runs a probe in a thread every ``interval`` seconds and keeps the
rows (the raw time series, samples.csv).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time

import psutil

from conclab.servers import tcpdiag

TCP_STATES = {b"01": "tcp_established", b"06": "tcp_time_wait", b"08": "tcp_close_wait"}
TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
KIB = 1024


def tcp_states(port: int) -> dict:
    """Count the sockets on local ``port`` by state (ESTABLISHED, CLOSE_WAIT, TIME_WAIT)."""
    try:
        return tcpdiag.count(port)
    except OSError:
        return proc_tcp_states(port)


def proc_tcp_states(port: int) -> dict:
    """tcp_states from /proc/net/tcp{,6}: the fallback (it reads every socket of the machine)."""
    counts = dict.fromkeys(TCP_STATES.values(), 0)
    suffix = f":{port:04X}".encode()
    for path in TCP_TABLES:
        with contextlib.suppress(OSError), open(path, "rb") as table:
            next(table, None)                          # header
            for line in table:
                fields = line.split(None, 4)
                if len(fields) > 3 and fields[1].endswith(suffix):
                    name = TCP_STATES.get(fields[3])
                    if name:
                        counts[name] += 1
    return counts


def task_ctx_switches(pid: int) -> dict:
    """{tid: (voluntary, involuntary)} for every live thread of ``pid``."""
    counts = {}
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            voluntary = involuntary = 0
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/status", "rb") as status:
                for line in status:
                    if line.startswith(b"voluntary_ctxt_switches"):
                        voluntary = int(line.split()[1])
                    elif line.startswith(b"nonvoluntary_ctxt_switches"):
                        involuntary = int(line.split()[1])
            counts[tid] = (voluntary, involuntary)
    return counts


class Probe:
    """Reads one process; ``track_ctx`` sums context switches over its threads (costs a file per thread)."""

    def __init__(self, pid: int, port: int | None, track_ctx: bool = True) -> None:
        self.pid = pid
        self.port = port
        self.track_ctx = track_ctx
        self.process = psutil.Process(pid)
        self._ctx_seen: dict = {}
        self._lock = threading.Lock()
        self.children: list = self._find_children()

    def _find_children(self) -> list:
        """The server's worker processes (``--procs N``), found now; [] for a single process."""
        with contextlib.suppress(psutil.Error):
            return self.process.children(recursive=True)
        return []

    def family(self) -> list:
        """The parent and the worker processes still alive (the last ones ``_find_children`` found)."""
        return [self.process, *(c for c in self.children if c.is_running())]

    def ctx_switches(self) -> tuple[int, int]:
        """(voluntary, involuntary) over every thread seen so far (see the module doc)."""
        with self._lock:
            for process in self.family():
                self._ctx_seen.update(task_ctx_switches(process.pid))
            seen = list(self._ctx_seen.values())
        return sum(v for v, _ in seen), sum(i for _, i in seen)

    def read(self, uss: bool = True) -> dict:
        """One sample: gauges, cumulative CPU and context switches, TCP states (summed over the family)."""
        self.children = self._find_children()
        row = {"pid": self.pid}
        for process in self.family():
            try:
                part = _read_one(process, uss)
            except psutil.NoSuchProcess:
                if process is self.process:
                    raise
                continue                                   # a worker that just exited: the rest still count
            for key, value in part.items():
                row[key] = None if value is None else (row.get(key) or 0) + value
        if self.track_ctx:
            row["ctx_voluntary"], row["ctx_involuntary"] = self.ctx_switches()
        if self.port is not None:
            row.update(tcp_states(self.port))
        return row

    def counters(self) -> dict:
        """The cumulative counters only (for deltas around one load point)."""
        user = system = 0.0
        for process in self.family():
            with contextlib.suppress(psutil.NoSuchProcess):
                cpu = process.cpu_times()
                user, system = user + cpu.user, system + cpu.system
        voluntary, involuntary = self.ctx_switches() if self.track_ctx else (None, None)
        return {"cpu_user_s": user, "cpu_sys_s": system, "ctx_voluntary": voluntary,
                "ctx_involuntary": involuntary, "t": time.monotonic()}


def _read_one(process, uss: bool) -> dict:
    """The gauges and CPU counters of one process."""
    with process.oneshot():
        memory = process.memory_full_info() if uss else process.memory_info()
        cpu = process.cpu_times()
        return {"rss_kib": memory.rss // KIB, "vms_kib": memory.vms // KIB,
                "uss_kib": memory.uss // KIB if uss else None, "threads": process.num_threads(),
                "fds": process.num_fds(), "cpu_user_s": cpu.user, "cpu_sys_s": cpu.system}


class Sampler:
    """Samples a Probe every ``interval`` seconds in a daemon thread; ``rows`` is the time series."""

    def __init__(self, probe: Probe, interval: float, labels: dict) -> None:
        self.probe = probe
        self.interval = interval
        self.labels = dict(labels)
        self.point = ""
        self.rows: list = []
        self.peaks: dict = {}
        self._stop = threading.Event()
        self._rows_lock = threading.Lock()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def sample(self) -> dict | None:
        try:
            row = self.probe.read()
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, FileNotFoundError):
            return None
        row = {**self.labels, "point": self.point, "t_s": round(time.monotonic() - self._t0, 3), **row}
        with self._rows_lock:
            self.rows.append(row)
        for key in ("rss_kib", "threads", "fds"):
            self.peaks[key] = max(self.peaks.get(key, 0), row[key])
        return row

    def reset_peaks(self) -> None:
        self.peaks = {}

    def stop(self) -> None:
        """Stop sampling (idempotent); the rows stay for ``take``."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def take(self) -> list:
        with self._rows_lock:
            rows, self.rows = self.rows, []
        return rows
