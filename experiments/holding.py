"""Holding N idle connections open against a server (the generator's hold mode), and reading the server then.

The generator ramps N connections at ``--connect-rate``, PINGs each once and
then holds them for ``--duration`` seconds after the ramp; the harness reads
the server inside that window. The window is long enough for the harness to
notice a stalled ramp (``STALL_S``) and still measure inside it. Then, if the
server accepted all N, the generator is stopped at once (nothing failed, there
is nothing to wait for); if not, it is left to finish, so its JSON says how
many connections failed and why.

The server's own count of accepted connections is its fd count above what it
had before the hold (every backend gives each accepted socket an fd; kernel
TCP state would also count connections still waiting in the accept backlog).
The ramp is over, for the harness, when that count reaches N, stops growing for
``STALL_S`` (a server that no longer accepts), or the generator exits.

The kernel's memory (slab, kernel stacks, TCP socket memory, page tables: not in
any process's RSS) is read here too (``kernel_gauges``), before a hold and while
it is held; the memory experiment turns the change into kernel memory per connection.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import psutil

from .harness import loadproc

STALL_S = 3.0                  # no newly accepted connection for this long: the ramp is over
POLL_S = 0.05
HOLD_MARGIN_S = 0.5            # the hold lasts this much longer than what is measured inside it
RAMP_SLACK_S = 10.0            # time budget for the ramp beyond N / connect rate (covers connect timeouts)
MEASURE_SAMPLES = 3            # gauges are the median of this many reads...
MEASURE_GAP_S = 0.1            # ...this far apart
GAUGE_KEYS = ("rss_kib", "uss_kib", "vms_kib", "threads", "fds", "tcp_established", "tcp_close_wait",
              "tcp_time_wait")


@dataclass
class Hold:
    run: loadproc.LoadRun | None
    target: int
    held: int                  # connections the server accepted (fds above the baseline)
    ramp_s: float
    base_fds: int


def accepted(server, base_fds: int) -> int:
    return max(0, server.sampler.probe.process.num_fds() - base_fds)


def hold(run, server, n: int, measure_s: float) -> Hold:
    """Hold ``n`` connections for ``measure_s`` (+ a margin) after the ramp; return once the server has them."""
    base_fds = server.sampler.probe.process.num_fds()
    if n <= 0:
        return Hold(None, 0, 0, 0.0, base_fds)
    profile = run.profile
    handle = loadproc.start_loadgen(server.target, "hold", n, measure_s + STALL_S + HOLD_MARGIN_S,
                             connect_rate=profile.connect_rate, cpus=run.loadgen_cpus,
                             extra_s=n / profile.connect_rate + RAMP_SLACK_S)
    t0 = time.monotonic()
    best, best_at = 0, t0
    while time.monotonic() - t0 < profile.ramp_timeout_s and handle.running():
        now_held = accepted(server, base_fds)
        if now_held >= n:
            break
        if now_held > best:
            best, best_at = now_held, time.monotonic()
        elif time.monotonic() - best_at > STALL_S:
            break
        time.sleep(POLL_S)
    return Hold(handle, n, accepted(server, base_fds), time.monotonic() - t0, base_fds)


def gauges(server) -> dict:
    """The server's memory, threads, fds and TCP states: the median of a few reads."""
    reads = []
    for i in range(MEASURE_SAMPLES):
        if i:
            time.sleep(MEASURE_GAP_S)
        reads.append(server.sampler.sample() or server.sampler.probe.read())
    values = {key: [r[key] for r in reads if r.get(key) is not None] for key in GAUGE_KEYS}
    return {key: statistics.median(v) if v else None for key, v in values.items()}


def measure_window(run) -> float:
    """Seconds to read gauges inside a hold: settle, then the samples."""
    return run.profile.settle_s + MEASURE_SAMPLES * MEASURE_GAP_S


def release(h: Hold, tcp_established=None, clean: bool | None = None) -> tuple[dict | None, int | None]:
    """End the hold; (its JSON or None, connect failures: the generator's count, else N - ESTABLISHED).

    ``clean`` (default: the server accepted all N): stop it now, there is no failure
    to explain. Otherwise it runs to its end and its JSON says what failed and why.
    """
    if h.run is None:
        return None, 0
    if clean is None:
        clean = h.held >= h.target
    try:
        result = h.run.stop() if clean else h.run.wait()
    except loadproc.LoadgenError:
        result = None
    finally:
        h.run.close()
    errors = loadproc.connect_errors(result, h.target)
    if errors is None and tcp_established is not None:
        errors = max(0, h.target - int(tcp_established))
    return result, errors


# -- kernel memory ----------------------------------------------------------------------------------
#
# RSS counts a process's own pages. What the kernel allocates for a connection is not in it: the
# socket structures (struct tcp_sock, its inode, dentry and file, epoll items: slab), the socket
# buffers (TCP's pages, /proc/net/sockstat "mem"), one kernel stack per thread (KernelStack) and
# the page tables of the pages a process maps (its VmPTE). The first three are read machine-wide
# (/proc/meminfo, /proc/net/sockstat), page tables per process (/proc/PID/status).
#
# Machine-wide counters also move with what other processes do meanwhile, so a reading carries
# the counts that show it: TCP sockets allocated (sockstat "alloc", every namespace), TIME_WAIT
# sockets ("tw": each one that expires frees slab) and tasks (/proc/loadavg: threads of every
# process); ``other_activity`` is what of their change the server and its clients do not explain.

MEMINFO = "/proc/meminfo"
SOCKSTAT = "/proc/net/sockstat"          # "TCP: ... mem N": pages of TCP socket memory, IPv4 and IPv6
LOADAVG = "/proc/loadavg"                # "0.52 0.58 0.59 4/161 27251": 161 tasks exist
MEMINFO_FIELDS = {"Slab": "slab_kib", "SReclaimable": "sreclaimable_kib", "SUnreclaim": "sunreclaim_kib",
                  "KernelStack": "stack_kib"}
SOCKSTAT_FIELDS = {"mem": "sock_kib", "tw": "time_wait", "alloc": "tcp_alloc"}
KERNEL_KEYS = (*MEMINFO_FIELDS.values(), *SOCKSTAT_FIELDS.values(), "tasks", "pte_kib", "threads")
# memory.csv column <- key of a kernel reading: the change from before the hold to while it is held
KERNEL_DELTAS = {"kernel_sock_kib": "sock_kib", "kernel_stack_kib": "stack_kib", "kernel_slab_kib": "slab_kib",
                 "kernel_sreclaimable_kib": "sreclaimable_kib", "kernel_sunreclaim_kib": "sunreclaim_kib",
                 "kernel_pte_kib": "pte_kib", "time_wait_delta": "time_wait"}
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") / 1024 if hasattr(os, "sysconf") else 4.0


def parse_meminfo(text: str) -> dict:
    """Slab, SReclaimable, SUnreclaim and KernelStack (KiB) from /proc/meminfo's text."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in MEMINFO_FIELDS and rest.split():
            out[MEMINFO_FIELDS[name]] = float(rest.split()[0])          # "kB": KiB
    return out


def parse_sockstat(text: str, page_kib: float = PAGE_KIB) -> dict:
    """From /proc/net/sockstat's text: TCP socket memory (KiB; "mem" is in pages), TIME_WAIT sockets ("tw")
    and TCP sockets allocated ("alloc")."""
    for line in text.splitlines():
        if line.startswith("TCP:"):
            fields = line.split()[1:]
            values = dict(zip(fields[::2], fields[1::2]))
            out = {key: float(values[name]) for name, key in SOCKSTAT_FIELDS.items() if name in values}
            if "sock_kib" in out:
                out["sock_kib"] *= page_kib
            return out
    return {}


def parse_loadavg(text: str) -> dict:
    """{"tasks": threads of every process on the machine} from /proc/loadavg's text ({} if unreadable)."""
    fields = text.split()
    if len(fields) >= 4 and "/" in fields[3]:
        return {"tasks": float(fields[3].split("/")[1])}
    return {}


def parse_status(text: str) -> dict:
    """{"pte_kib": VmPTE (the process's page tables, KiB), "threads": Threads} from /proc/PID/status's text."""
    out = {}
    for line in text.splitlines():
        if line.startswith("VmPTE:"):
            out["pte_kib"] = float(line.split()[1])
        elif line.startswith("Threads:"):
            out["threads"] = float(line.split()[1])
    return out


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def read_kernel(pid: int | None = None) -> dict:
    """One reading: the machine's slab, kernel stacks, TCP socket memory, TCP sockets, TIME_WAIT sockets and
    tasks; the page tables and threads of ``pid`` if given. Keys that could not be read are absent."""
    out = {**parse_meminfo(_read_text(MEMINFO)), **parse_sockstat(_read_text(SOCKSTAT)),
           **parse_loadavg(_read_text(LOADAVG))}
    if pid is not None:
        out.update(parse_status(_read_text(f"/proc/{pid}/status")))
    return out


def kernel_gauges(pid: int | None = None) -> dict:
    """read_kernel, the median of MEASURE_SAMPLES reads MEASURE_GAP_S apart (as ``gauges``)."""
    reads = []
    for i in range(MEASURE_SAMPLES):
        if i:
            time.sleep(MEASURE_GAP_S)
        reads.append(read_kernel(pid))
    values = {key: [r[key] for r in reads if key in r] for key in KERNEL_KEYS}
    return {key: statistics.median(v) for key, v in values.items() if v}


def kernel_window() -> float:
    """Seconds kernel_gauges takes (added to the hold's window by the memory experiment)."""
    return MEASURE_SAMPLES * MEASURE_GAP_S


def kernel_delta(before: dict, held: dict) -> dict:
    """The KERNEL_DELTAS columns: held minus before, per reading key (None where either lacks it)."""
    return {column: (held[key] - before[key]) if key in held and key in before else None
            for column, key in KERNEL_DELTAS.items()}


def other_activity(before: dict, held: dict, own_sockets: float, own_tasks: float = 0.0) -> dict:
    """What other processes did between two readings: other_sockets_delta, TCP sockets allocated beyond
    ``own_sockets`` (both ends of the connections held: 2 per connection); other_tasks_delta, tasks beyond
    the server's own new threads (``threads`` of both readings; none if they lack it) and ``own_tasks`` (the
    load generator's). None: not readable."""
    def change(key):
        return held[key] - before[key] if key in held and key in before else None
    sockets, tasks, threads = change("tcp_alloc"), change("tasks"), change("threads")
    return {"other_sockets_delta": sockets - own_sockets if sockets is not None else None,
            "other_tasks_delta": tasks - (threads or 0.0) - own_tasks if tasks is not None else None}


def generator_tasks(h: Hold | None) -> int:
    """Threads of the load generator holding ``h`` (its processes and theirs); 0 without one or if unreadable."""
    if h is None or h.run is None:
        return 0
    try:
        proc = psutil.Process(h.run.proc.pid)
        return sum(p.num_threads() for p in [proc, *proc.children(recursive=True)])
    except (psutil.Error, AttributeError):
        return 0
