"""Experiment 1, memory: what an idle connection costs each model, in the process and in the kernel.

One fresh server per variant and round (``--max-conns`` above the largest N, a
long ``--idle-timeout``) is read empty (N = 0), then made to hold idle
connections in steps up to every N of the profile (each step one more hold of
the load generator, the earlier ones still held); once it has accepted them
and settled, its RSS, USS, VMS, threads and fds are read. Steps on one server
cost one ramp to the largest N instead of one per point. A least-squares
line over the points gives KiB per connection (RSS: what the kernel maps,
shared pages included; USS: what is this process's alone) and the same slope
for VMS and threads: the "1 MB per thread" of the article is *virtual* stack
(VMS grows by the stack size per thread), while RSS grows by the few KiB a
thread actually touches. Each fit has its intercept, r² and the residual of
every point (memory_fit.csv); with fewer than ``MIN_R2_POINTS`` points there
is no r² (a line through 2 points fits them exactly: r² = 1 by construction).

RSS is not all a connection costs. What the kernel allocates for it is in no
process's RSS: the socket (a tcp_sock, its inode, dentry and file, epoll items:
slab), its buffers (TCP's pages), one kernel stack per thread, the page tables
of what the process maps. Around every point the harness reads /proc/meminfo
(Slab = SReclaimable + SUnreclaim, KernelStack), /proc/net/sockstat (TCP "mem")
and the server's VmPTE once on the fresh server before any connection is
opened and again at every step (holding.kernel_gauges); the change over
the connections held is kernel memory per connection.

Those counters are the whole machine's, and the load generator's end of every
connection lives in the same kernel. That end is estimated once per run
(``client_end``): the harness opens loopback pairs itself (connect, accept, a
few bytes each way as the generator's PING/PONG, no thread per connection),
takes half of a pair's slab and socket memory as one end (both ends are the same
kernel objects), and adds what registering the client ends with epoll costs (the
generator's loop does); a negative estimate is noise and counts as 0. Times the
connections held, that is ``client_slab_kib`` and ``client_sock_kib`` of each
row, subtracted in the fits. Kernel stacks and page tables are the server's
alone: the generator does not start a thread per connection and its page
tables are not read.

Other processes' sockets and threads come and go in the same counters. What
shows it: TCP sockets allocated beyond the two ends of the connections held
(``other_sockets_delta``), TIME_WAIT sockets expiring (each frees slab:
``time_wait_delta``), tasks beyond the server's new threads and the load
generator's (``other_tasks_delta``). Their possible effect is estimated
(``other_kib``: ``TIME_WAIT_KIB`` per TIME_WAIT socket, ``OTHER_SOCKET_KIB`` per
socket, ``OTHER_TASK_KIB`` per task); a point where it exceeds
``OTHER_BUDGET_KIB`` per connection held (at least ``OTHER_BUDGET_MIN_KIB``) is
kept in memory.csv but left out of the kernel fits, and a calibration round so
disturbed is measured again.
"""
from __future__ import annotations

import contextlib
import resource
import select
import socket
import statistics
import struct
import time

from . import holding
from .harness.fit import least_squares
from .harness.profiles import FD_MARGIN
from .harness.run import HELD_STOP_GRACE_S

NAME = "memory"
IDLE_TIMEOUT_S = 3600.0        # far longer than any point: nothing may time out while held
CONN_MARGIN = 100              # --max-conns above N, so the cap never bites
MIN_R2_POINTS = 3              # fewer points: no r² and no residuals (a line through 2 points fits them exactly)
GAUGE_FITS = {"rss_kib": "KiB/conn", "uss_kib": "KiB/conn", "vms_kib": "KiB/conn", "threads": "threads/conn",
              "fds": "fds/conn"}
# The server's kernel memory, per part: memory.csv column of the change -> column of the client's end in it.
SERVER_KERNEL = {"kernel_sock_kib": "client_sock_kib", "kernel_stack_kib": None, "kernel_slab_kib": "client_slab_kib",
                 "kernel_pte_kib": None}
KERNEL_FITS = {**dict.fromkeys(SERVER_KERNEL, "KiB/conn"),
               "kernel_kib": "KiB/conn",          # the server's: the four parts above
               "kernel_both_kib": "KiB/conn",     # unsubtracted: the machine's change, both ends of every connection
               "client_kib": "KiB/conn"}          # the client's end that was subtracted (client_end)
FIT_METRICS = {**GAUGE_FITS, **KERNEL_FITS}
TIME_WAIT_KIB = 0.25           # slab a TIME_WAIT socket holds (a 256 B tw_sock)
OTHER_SOCKET_KIB = 4.5         # slab another process's TCP socket holds: about one end of a connection (client_end)
OTHER_TASK_KIB = 25.0          # kernel memory of another task: a 16 KiB kernel stack and its slab (task_struct...)
OTHER_BUDGET_KIB = 0.5         # other processes may move the kernel's memory by this much per connection held...
OTHER_BUDGET_MIN_KIB = 1024.0  # ...(at least this much) before a point is left out of the kernel fits

CALIBRATION_MIN_PAIRS = 2000   # loopback pairs client_end opens at least (fewer only if the fd limit says so)...
CALIBRATION_ROUNDS = 3         # ...this many times; the median per part is the estimate
CALIBRATION_ATTEMPTS = 8       # rounds tried at most to get CALIBRATION_ROUNDS undisturbed ones
CALIBRATION_SETTLE_S = 0.2
CALIBRATION_TIMEOUT_S = 5.0
CALIBRATION_BACKLOG = 128
PING_BYTES = b"\0" * 16         # about a PING/PONG frame each way


def run(run) -> None:
    client = client_end(run)
    run.each_variant(NAME, lambda variant, repeat: measure_variant(run, variant, repeat, client))


def measure_variant(run, variant, repeat: int, client: dict | None = None) -> None:
    rows = measure_steps(run, variant, repeat, run.profile.memory_points(), client or {})
    for row in rows:
        run.write("memory", row)
    for fit_row in fit_rows(rows):
        run.write("memory_fit", {"experiment": NAME, "backend": variant.backend, "variant": variant.name,
                                 "repeat": repeat, **fit_row})


def measure_steps(run, variant, repeat: int, points: list, client: dict) -> list:
    """Rows for every N of ``points`` on one fresh server, N growing in steps: read it empty (N = 0), then
    hold more connections (one more hold per step, the earlier ones still held) up to each N and read it.
    Every kernel change is from the empty server's reading. A step whose connections were not all accepted
    ends the climb (the server holds no more; the larger points would not be what they say)."""
    rows, holds = [], []
    steps = [n for n in points if n > 0]
    with run.serve(NAME, variant, repeat, track_ctx=False, max_conns=max(steps, default=0) + CONN_MARGIN,
                   idle_timeout=IDLE_TIMEOUT_S, stop_grace=HELD_STOP_GRACE_S) as server:
        try:
            before = holding.kernel_gauges(server.pid)
            base_fds = server.sampler.probe.process.num_fds()
            if 0 in points:
                rows.append(read_point(run, variant, repeat, server, 0, 0, time.monotonic(), before, client, []))
            held = 0
            for i, n in enumerate(steps):
                started = time.monotonic()
                server.sampler.point = f"n={n}"
                h = holding.hold(run, server, n - held, step_window(run, steps[i:]))
                holds.append(h)
                held = holding.accepted(server, base_fds)
                rows.append(read_point(run, variant, repeat, server, n, held, started, before, client, holds))
                if held < n:
                    run.skip(NAME, variant, f"the server accepted {held} of {n} connections: larger N not measured",
                             point=f"n={n} repeat={repeat}")
                    break
        finally:
            server.sampler.stop()              # before thousands of connections (and threads) go away
            release_all(holds, rows)
    return rows


def step_window(run, steps_left: list) -> float:
    """How long a step's hold must last: its own reading and every later step's ramp and reading (the holds
    are stopped as soon as the climb ends; this only bounds a hold the harness could not stop)."""
    profile, previous, total = run.profile, None, 0.0
    for n in steps_left:
        added = n - previous if previous is not None else 0
        total += added / profile.connect_rate + holding.STALL_S + holding.measure_window(run) + \
            holding.kernel_window()
        previous = n
    return total


def read_point(run, variant, repeat: int, server, n: int, held: int, started: float, before: dict,
               client: dict, holds: list) -> dict:
    """Settle, read the gauges and the kernel (the holds still held); one memory row."""
    time.sleep(run.profile.settle_s)
    gauges = holding.gauges(server)
    kernel = holding.kernel_gauges(server.pid)
    generator_tasks = sum(holding.generator_tasks(h) for h in holds)
    delta = holding.kernel_delta(before, kernel)
    row = {"experiment": NAME, "backend": variant.backend, "variant": variant.name, "repeat": repeat,
           "n_target": n, "n_conns": held, **gauges, "connect_errors": max(0, n - held),
           "server_cpus": run.server_cpus, **delta,
           **holding.other_activity(before, kernel, 2 * held, own_tasks=generator_tasks),
           **client_share(client, held)}
    both = [delta[c] for c in SERVER_KERNEL]
    kernel_text = (f", kernel {sum(both) / 1024:+.1f} MiB (both ends" + ("; disturbed by other processes)"
                                                                       if disturbed(row) else ")")
                   if None not in both else "")
    run.progress(f"[{NAME}] {variant.name} n={n} r{repeat}: held {held}, RSS {gauges['rss_kib'] / 1024:.1f} MiB, "
                 f"USS {gauges['uss_kib'] / 1024:.1f} MiB, VMS {gauges['vms_kib'] / 1024:.0f} MiB, "
                 f"{gauges['threads']} threads{kernel_text} ({time.monotonic() - started:.1f} s)")
    return row


def release_all(holds: list, rows: list) -> None:
    """End every hold; a hold the server did not fully accept runs to its end, and the generator's own count
    of failed connects (when it gives one) replaces the row's N - held for the step it belongs to."""
    for h, row in zip(holds, [r for r in rows if r["n_target"] > 0]):
        _, errors = holding.release(h)
        if errors is not None and h.held < h.target:
            row["connect_errors"] = errors


def client_share(client: dict, conns: int) -> dict:
    """client_sock_kib, client_slab_kib: the generator's ends of ``conns`` connections (None: not estimated)."""
    return {f"client_{part}": client[part] * conns if client.get(part) is not None else None
            for part in ("sock_kib", "slab_kib")}


# -- the fit ----------------------------------------------------------------------------------------

def _value(value):
    return None if value is None or value == "" else float(value)


def _total(values):
    values = list(values)
    return None if None in values else sum(values)


def other_kib(time_wait=None, other_sockets=None, other_tasks=None) -> float:
    """How much other processes' TIME_WAIT sockets, sockets and tasks may have moved the kernel's memory (KiB,
    either way); a count that is None was not readable and adds nothing."""
    return sum(abs(value) * kib for value, kib in ((time_wait, TIME_WAIT_KIB), (other_sockets, OTHER_SOCKET_KIB),
                                                  (other_tasks, OTHER_TASK_KIB)) if value is not None)


def activity_disturbed(conns: float, time_wait=None, other_sockets=None, other_tasks=None) -> bool:
    """Whether other processes may have moved the kernel's memory by more than the budget for ``conns``
    connections (OTHER_BUDGET_KIB each, at least OTHER_BUDGET_MIN_KIB) while they were measured."""
    return other_kib(time_wait, other_sockets, other_tasks) > max(OTHER_BUDGET_MIN_KIB, OTHER_BUDGET_KIB * conns)


def disturbed(row: dict) -> bool:
    """activity_disturbed for one memory row."""
    return activity_disturbed(_value(row.get("n_conns")) or 0.0, _value(row.get("time_wait_delta")),
                              _value(row.get("other_sockets_delta")), _value(row.get("other_tasks_delta")))


def fit_values(row: dict) -> dict:
    """The y of every FIT_METRICS entry for one memory row: the gauges; the server's kernel memory per part
    (the change minus the client's end where it has one) and their sum; the unsubtracted change (both ends)
    and the client's end. The kernel values are None for a point ``disturbed`` by other processes."""
    out = {metric: _value(row.get(metric)) for metric in GAUGE_FITS}
    if disturbed(row):
        return {**out, **dict.fromkeys(KERNEL_FITS)}
    for column, client_column in SERVER_KERNEL.items():
        change, client = _value(row.get(column)), _value(row.get(client_column)) if client_column else 0.0
        out[column] = change - client if change is not None and client is not None else None
    out["kernel_kib"] = _total(out[c] for c in SERVER_KERNEL)
    out["kernel_both_kib"] = _total(_value(row.get(c)) for c in SERVER_KERNEL)
    out["client_kib"] = _total(_value(row.get(c)) for c in SERVER_KERNEL.values() if c)
    return out


def fit_rows(rows: list) -> list:
    """memory_fit rows: per metric the least-squares line over n_conns (KiB per connection for memory), its
    r², the largest residual and every point's (``n:residual;...``); r² and residuals only from MIN_R2_POINTS
    points on. A metric with too few points for a line still gets its row: n_points, no slope."""
    values = [fit_values(r) for r in rows]
    xs = [r.get("n_conns") for r in rows]
    out = []
    for metric, unit in FIT_METRICS.items():
        ys = [v[metric] for v in values]
        line = least_squares(xs, ys)
        if line is None:
            usable = sum(x not in (None, "") and y is not None for x, y in zip(xs, ys))
            if rows:
                out.append({"metric": metric, "n_points": usable, "unit": unit})
            continue
        residuals = [(float(x), y - (line.slope * float(x) + line.intercept))
                     for x, y in zip(xs, ys) if x not in (None, "") and y is not None]
        judged = line.n >= MIN_R2_POINTS
        out.append({"metric": metric, "per_conn": line.slope, "intercept": line.intercept,
                    "r2": line.r2 if judged else None, "n_points": line.n, "unit": unit,
                    "max_abs_residual": max(abs(r) for _, r in residuals) if judged else None,
                    "residuals": ";".join(f"{x:g}:{r:.6g}" for x, r in residuals) if judged else None})
    return out


# -- the client's end of a connection ------------------------------------------------------------------

def calibration_pairs(points) -> int:
    """How many loopback pairs client_end opens: the largest point (at least CALIBRATION_MIN_PAIRS), as far as
    this process's file limit allows (two fds a pair)."""
    cap = max(0, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_MARGIN) // 2)
    return min(max(max(points, default=0), CALIBRATION_MIN_PAIRS), cap)


def client_end(run) -> dict:
    """The kernel memory of a connection's client end, KiB per connection: {"sock_kib", "slab_kib"} (the median
    of CALIBRATION_ROUNDS undisturbed rounds of ``measure_pairs``, of every round tried if fewer were); {} if it
    could not be measured (recorded as skipped)."""
    n = calibration_pairs(run.profile.memory_points())
    rounds, quiet = [], []
    try:
        while len(quiet) < CALIBRATION_ROUNDS and len(rounds) < CALIBRATION_ATTEMPTS:
            estimate, busy = measure_pairs(n)
            rounds.append(estimate)
            if not busy:
                quiet.append(estimate)
    except OSError as exc:
        run.skip(NAME, None, f"the client end's kernel memory was not estimated: {exc}", point="client end")
        return {}
    if len(quiet) < CALIBRATION_ROUNDS:
        run.skip(NAME, None, f"the client end's kernel memory was estimated on a busy machine: other processes' "
                             f"sockets or tasks moved during {len(rounds) - len(quiet)} of {len(rounds)} rounds",
                 point="client end")
    rounds = quiet if len(quiet) >= CALIBRATION_ROUNDS else rounds
    estimate = {part: statistics.median(r[part] for r in rounds) for part in ("sock_kib", "slab_kib")
                if all(r.get(part) is not None for r in rounds)}
    if len(estimate) < 2:
        run.skip(NAME, None, "the client end's kernel memory was not estimated: /proc/meminfo or "
                             "/proc/net/sockstat unreadable", point="client end")
        return {}
    run.progress(f"[{NAME}] client end of a connection ({n} loopback pairs, median of {len(rounds)}): "
                 f"slab {estimate['slab_kib']:.2f} KiB, socket memory {estimate['sock_kib']:.2f} KiB")
    return estimate


def measure_pairs(n: int) -> tuple[dict, bool]:
    """Open n loopback pairs in this process and register their client ends with epoll: client_estimate of
    the kernel readings before, with the pairs open, and with the epoll registrations; and whether other
    processes disturbed it (pairs_disturbed)."""
    before = holding.kernel_gauges()
    with loopback_pairs(n) as pairs:
        time.sleep(CALIBRATION_SETTLE_S)
        opened = holding.kernel_gauges()
        with select.epoll() as poller:
            for client, _ in pairs:
                poller.register(client.fileno(), select.EPOLLIN)
            time.sleep(CALIBRATION_SETTLE_S)
            polled = holding.kernel_gauges()
    return client_estimate(before, opened, polled, len(pairs)), pairs_disturbed(before, opened, polled, len(pairs))


def pairs_disturbed(before: dict, opened: dict, polled: dict, pairs: int) -> bool:
    """Whether other processes moved the counters while ``pairs`` loopback pairs (and their listener) were
    measured: activity_disturbed over both steps (this process starts no thread)."""
    for a, b, own in ((before, opened, 2 * pairs + 1), (opened, polled, 0)):
        other = holding.other_activity(a, b, own)
        tw = holding.kernel_delta(a, b)["time_wait_delta"]
        if activity_disturbed(pairs, tw, other["other_sockets_delta"], other["other_tasks_delta"]):
            return True
    return False


def client_estimate(before: dict, opened: dict, polled: dict, pairs: int) -> dict:
    """One end of a connection from three kernel readings (holding.kernel_gauges) around ``pairs`` loopback
    pairs: half of a pair's change, plus the epoll registration of one end. KiB per connection, at least 0
    (less is noise: the counters are the machine's); None where a reading lacks the part."""
    pair, epoll = holding.kernel_delta(before, opened), holding.kernel_delta(opened, polled)
    out = {}
    for part, column in (("sock_kib", "kernel_sock_kib"), ("slab_kib", "kernel_slab_kib")):
        if pairs > 0 and pair[column] is not None and epoll[column] is not None:
            out[part] = max(0.0, pair[column] / 2 / pairs + epoll[column] / pairs)
        else:
            out[part] = None
    return out


@contextlib.contextmanager
def loopback_pairs(n: int):
    """n connected TCP pairs on 127.0.0.1 (client, accepted), PING_BYTES sent and read each way; closed with
    a reset (SO_LINGER 0) on the way out, so none lingers in TIME_WAIT."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    pairs = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(CALIBRATION_BACKLOG)
        listener.settimeout(CALIBRATION_TIMEOUT_S)
        address = listener.getsockname()
        for _ in range(n):
            client = socket.create_connection(address, timeout=CALIBRATION_TIMEOUT_S)
            try:
                accepted, _ = listener.accept()
            except OSError:
                client.close()
                raise
            accepted.settimeout(CALIBRATION_TIMEOUT_S)
            pairs.append((client, accepted))
            client.sendall(PING_BYTES)
            _read(accepted, len(PING_BYTES))
            accepted.sendall(PING_BYTES)
            _read(client, len(PING_BYTES))
        yield pairs
    finally:
        reset = struct.pack("ii", 1, 0)
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
                sock.close()
        listener.close()


def _read(sock, size: int) -> None:
    got = 0
    while got < size:
        chunk = sock.recv(size - got)
        if not chunk:
            raise ConnectionError("loopback peer closed during the client-end calibration")
        got += len(chunk)
