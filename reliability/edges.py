"""Edge scenarios: fairness, peers that do not read, shutdown and resource edges, start-up validation.

Same shape as reliability/scenarios.py (``scenario(backend, options, scale) ->
Outcome``, registered in its ``SCENARIOS``), built on its helpers. Each checks
one decided policy; docs/reliability.md ("Edge scenarios") says what each does
and why the policy is what it is:

* ``fairness``: a client that pipelines without pause does not starve others.
* ``non_reading_clients``: clients that never read hold no worker others need.
* ``closing_with_unsent_data``: a connection closing with replies it cannot
  deliver is dropped (RST) within --idle-timeout + 2 s, no socket left behind.
* ``sigterm_during_connect_burst``: SIGTERM while connections pour in: exit 0, nothing aborted.
* ``thread_exhaustion``: no thread to be had: "server busy", never death.
* ``churn_state``: nothing is kept per *closed* connection.
* ``slow_steady_reader`` / ``stopped_reader``: the write policy. A reply that
  makes no progress for --idle-timeout ends the connection with a reset,
  counted in ``idle_timeouts``; one that makes progress is never cut.
* ``big_frame_memory``: no connection keeps a big-frame buffer for life.
* ``buffer_budget``: ``--max-buffered`` bounds the request bytes held; past it ERROR "server busy".
* ``huge_timeouts``: timeouts no timer can hold are refused at start.
* ``metrics_port``: ``--metrics-port 0`` says where it is; slow scrapers harm nobody.

Where a scenario looks at the kernel's own view of a connection it reads
``/proc/net/tcp`` and ``/proc/net/tcp6`` (what ``ss`` reads): a socket the
server closed with unsent data is an orphan there (FIN-WAIT-1 with a Send-Q),
invisible in the server's fds but still holding that data and the peer.

Every loop is bounded in count and time; waits are conditions with deadlines.
"""
from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass

import psutil

from conclab.servers import variant_of
from conclab.servers.client import Client
from conclab.servers.launcher import ServerProcess, wait_until
from conclab.servers.protocol import ECHO, ERROR, PING, PONG, FrameDecoder, ProtocolError, encode

from .scenarios import Outcome, Scale, alive, echo_ok, mib, push, seconds


# -- sizes -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EdgeSizes:
    """How big each edge scenario is, for a Scale of reliability/scenarios.py (by its name)."""

    fair_seconds: float        # fairness: how long the bystander PINGs while the hog pipelines
    burst_repeats: int         # sigterm_during_connect_burst: servers started and signalled
    burst_conns: int           # ... connections each burst opens
    exhaust_conns: int         # thread_exhaustion: connections held at once
    churn_cycles: int          # churn_state: connect/PING/close cycles per round
    churn_threads: int
    steady_mib: int            # slow_steady_reader: replies requested
    steady_slow_s: float       # ... read slowly for this long, then the rest at full speed
    big_clients: int           # big_frame_memory: clients that each sent 1 MiB, then idle


EDGE_CI = EdgeSizes(fair_seconds=1.5, burst_repeats=10, burst_conns=300, exhaust_conns=300, churn_cycles=8_000,
                    churn_threads=4, steady_mib=8, steady_slow_s=8.0, big_clients=64)
EDGE_FULL = EdgeSizes(fair_seconds=5.0, burst_repeats=20, burst_conns=300, exhaust_conns=300, churn_cycles=20_000,
                      churn_threads=4, steady_mib=12, steady_slow_s=15.0, big_clients=64)


def sizes_of(scale: Scale) -> EdgeSizes:
    return EDGE_FULL if scale.name == "full" else EDGE_CI


# -- the kernel's view of one connection ----------------------------------------------------------
TCP_STATES = {"01": "ESTABLISHED", "02": "SYN-SENT", "03": "SYN-RECV", "04": "FIN-WAIT-1", "05": "FIN-WAIT-2",
              "06": "TIME-WAIT", "07": "CLOSE", "08": "CLOSE-WAIT", "09": "LAST-ACK", "0A": "LISTEN",
              "0B": "CLOSING", "0C": "NEW-SYN-RECV"}
GONE = {"TIME-WAIT", "CLOSE"}  # states that hold neither data nor the peer


def kernel_sockets(local_port: int, remote_port: int) -> list[tuple[str, int, int]]:
    """(state, Send-Q, Recv-Q) of every TCP socket from local_port to remote_port, orphans included."""
    found = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as table:
                lines = table.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if (int(fields[1].rsplit(":", 1)[1], 16) == local_port
                    and int(fields[2].rsplit(":", 1)[1], 16) == remote_port):
                send_q, recv_q = (int(q, 16) for q in fields[4].split(":"))
                found.append((TCP_STATES.get(fields[3], fields[3]), send_q, recv_q))
    return found


def server_side(server: ServerProcess, client: Client) -> list[tuple[str, int, int]]:
    """The server's sockets for this client that still hold something (not TIME-WAIT or CLOSE)."""
    return [s for s in kernel_sockets(server.port, client.sock.getsockname()[1]) if s[0] not in GONE]


def describe(sockets: list[tuple[str, int, int]]) -> str:
    def one(state: str, send_q: int) -> str:
        if state == "ESTABLISHED":
            return f"ESTABLISHED with {mib(send_q):.1f} MiB unsent (not closed)"
        return (f"{state} with {mib(send_q):.1f} MiB unsent (closed with a FIN queued behind unsent data: the "
                f"kernel keeps the socket, its data and the peer; a reset would not)")
    return ", ".join(one(state, send_q) for state, send_q, _ in sockets)


def active_now(server: ServerProcess) -> int | None:
    """connections_active minus the STATS probe itself, or None if STATS does not answer."""
    try:
        return server.stats(5.0)["connections_active"] - 1
    except (OSError, ValueError, ProtocolError):
        return None


def baseline_fds(server: ServerProcess) -> int:
    """The server's fds once nothing but listeners is open (the probes of a warm-up gone)."""
    wait_until(lambda: active_now(server) == 0, 5.0, 0.05)
    fds = server.fds()
    wait_until(lambda: server.fds() < fds, 0.3, 0.05)       # a probe's socket still closing
    return server.fds()


LET_GO_LOOK = 2.0              # past a bound, how much longer dropped_within looks (for the figure)


def dropped_within(server: ServerProcess, client: Client, fds0: int, since: float, bound: float,
                   out: Outcome, what: str) -> float | None:
    """Wait until the server has let go of ``client``: not counted in connections_active (STATS minus
    the probe), fds back to ``fds0``, no socket of it left in the kernel. Records a failure for each
    condition still unmet ``bound`` s after ``since``; returns when all were met (seconds after
    ``since``, looking up to LET_GO_LOOK s past the bound), or None."""
    state = {}

    def gone() -> bool:
        state.update(fds=server.fds(), sockets=server_side(server, client))    # before the probe opens
        state["active"] = active_now(server)
        return state["active"] == 0 and state["fds"] <= fds0 and not state["sockets"]
    if wait_until(gone, max(0.0, since + bound - time.monotonic()), 0.05):
        return time.monotonic() - since
    out.check(state["active"] == 0, f"{what}: still counted in connections_active {bound:g} s later")
    out.check(state["fds"] <= fds0, f"{what}: fds {fds0} -> {state['fds']} {bound:g} s later")
    out.check(not state["sockets"], f"{what}: the server's socket for it still there {bound:g} s later: "
                                    f"{describe(state['sockets'])}")
    return time.monotonic() - since if wait_until(gone, LET_GO_LOOK, 0.1) else None


def let_go(after: float | None, bound: float) -> str:
    if after is None:
        return f"not let go of within {bound + LET_GO_LOOK:g} s (bound {bound:g} s)"
    return f"let go of after {after:.2f} s (bound {bound:g} s)"


def reason(frames) -> str:
    errors = [payload.decode(errors="replace") for op, payload in frames if op == ERROR]
    return f'ERROR "{errors[0]}"' if errors else "no ERROR"


# -- 1. fairness -----------------------------------------------------------------------------------
FAIR_IDLE = 1.0                # --idle-timeout: the idle connection must be told within FAIR_IDLE + FAIR_LATE
FAIR_LATE = 1.0
FAIR_PING = 0.5                # a bystander PING answered within this while the hog pipelines
FAIR_GIVE_UP = 2.0             # a PING not answered this long counts as unanswered (and ends the PINGs)
HOG_BLOCK = encode(ECHO, b"h" * 1019) * 64   # 64 KiB of 1 KiB ECHOs per send: the socket never runs dry


def fairness(backend, options, scale: Scale) -> Outcome:
    """One client pipelines ECHOs as fast as the server takes them and reads every reply (its socket is
    always readable, its replies always writable); meanwhile another's PINGs are answered within
    0.5 s each, and an idle connection gets ERROR "idle timeout" within idle + 1 s."""
    out = Outcome("fairness", variant_of(backend, options).name)
    sizes = sizes_of(scale)
    with ServerProcess(backend, [*options, "--idle-timeout", str(FAIR_IDLE)]) as server:
        bystander = server.connect(FAIR_GIVE_UP)
        out.check(bystander.request(PING, b"warm-up") == (PONG, b"warm-up"), "the bystander's first PING failed")
        hog = server.connect(5.0)
        stop, echoed, sent = threading.Event(), [0], [0]

        def pipeline():
            while not stop.is_set():
                try:
                    hog.sock.sendall(HOG_BLOCK)
                except OSError:
                    return
                sent[0] += len(HOG_BLOCK)

        def drink():
            while not stop.is_set():
                try:
                    data = hog.sock.recv(1 << 20)
                except OSError:
                    return
                if not data:
                    return
                echoed[0] += len(data)
        workers = [threading.Thread(target=pipeline, daemon=True), threading.Thread(target=drink, daemon=True)]
        for worker in workers:
            worker.start()
        flowing = wait_until(lambda: echoed[0] >= 1 << 20, 5.0, 0.01)
        out.check(flowing, f"the pipelining client got only {echoed[0]} bytes back in 5 s")
        idle = server.connect(5.0)
        idle_at = time.monotonic()
        closed = []
        watcher = threading.Thread(target=lambda: closed.extend(wait_closed_one(idle, idle_at + FAIR_IDLE + 5.0)),
                                   daemon=True)
        watcher.start()
        rtts, end = [], time.monotonic() + sizes.fair_seconds
        for i in range(int(sizes.fair_seconds / 0.1) + 1):
            if time.monotonic() >= end:
                break
            began = time.monotonic()
            try:
                ok = bystander.request(PING, b"%d" % i) == (PONG, b"%d" % i)
            except OSError:
                ok = False
            rtts.append(time.monotonic() - began if ok else None)
            if not ok:
                break
            time.sleep(0.1)
        watcher.join(FAIR_IDLE + 6.0)
        stop.set()
        hog.reset()
        for worker in workers:
            worker.join(5.0)
        told_after = closed[0] - idle_at if closed and closed[0] is not None else None
        told = reason(idle.frames)
        idle.close()
        bystander.close()
        alive(server, out)
    answered = [r for r in rtts if r is not None]
    worst = max(answered, default=None)
    out.check(None not in rtts and rtts, f"a bystander PING was not answered within {FAIR_GIVE_UP:g} s while a "
                                         f"client pipelined ECHOs ({len(answered)} answered before it)")
    out.check(worst is None or worst <= FAIR_PING, f"a bystander PING took {seconds(worst)} while a client "
                                                   f"pipelined ECHOs (bound {FAIR_PING:g} s)")
    when = (f"{told}, then a close, {told_after:.2f} s after it connected" if told_after is not None
            else f"{told} and no close in {FAIR_IDLE + 5:g} s")
    out.check(told_after is not None and told_after <= FAIR_IDLE + FAIR_LATE and told == 'ERROR "idle timeout"',
              f"the idle connection (--idle-timeout {FAIR_IDLE:g}) got {when} (bound: ERROR \"idle timeout\" "
              f"within {FAIR_IDLE + FAIR_LATE:g} s)")
    out.metrics = {"pings": len(rtts), "ping_worst_ms": round(worst * 1000, 1) if worst is not None else None,
                   "idle_closed_s": round(told_after, 2) if told_after is not None else None, "idle_told": told,
                   "hog_echoed_mib": round(mib(echoed[0]), 1)}
    out.figure = (f"hog echoed {mib(echoed[0]):.0f} MiB; bystander {len(answered)}/{len(rtts)} PINGs answered, "
                  f"worst {out.metrics['ping_worst_ms']} ms; the idle connection got {when}")
    return out


def wait_closed_one(client: Client, deadline: float) -> list:
    """[when the server closed ``client``] (EOF or reset), or [None] by ``deadline``; frames are kept."""
    sock = client.sock
    sock.setblocking(False)
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                return [time.monotonic()]
            if not data:
                return [time.monotonic()]
            try:
                client.frames.extend(client.decoder.feed(data))
            except ProtocolError:
                return [time.monotonic()]
    return [None]


# -- 2. clients that never read, and a pool's workers ----------------------------------------------
NONREAD_WORKERS = 2
NONREAD_IDLE = 3.0             # --idle-timeout: frees a stuck worker only after this
NONREAD_MIB = 8
NONREAD_FRAME = encode(ECHO, b"n" * (64 * 1024 - 1))   # 64 KiB frames (header aside)
NONREAD_PING = 1.0


def non_reading_clients(backend, options, scale: Scale) -> Outcome:
    """--workers 2 --idle-timeout 3: two clients send 8 MiB of ECHOs each and never read; a third
    client's PING (three fresh connections, one after another) is answered within 1 s each."""
    out = Outcome("non_reading_clients", variant_of(backend, options).name)
    with ServerProcess(backend, [*options, "--workers", str(NONREAD_WORKERS),
                                 "--idle-timeout", str(NONREAD_IDLE)]) as server:
        out.check(echo_ok(server) is not None, "warm-up ECHO failed")
        clogs = [server.connect(), server.connect()]
        pushed = [0, 0]

        def clog(i):
            pushed[i] = push(clogs[i], NONREAD_MIB << 20, NONREAD_FRAME)[0]
        pushers = [threading.Thread(target=clog, args=(i,), daemon=True) for i in range(2)]
        for pusher in pushers:
            pusher.start()
        for pusher in pushers:
            pusher.join(15.0)
        rtts = []
        for i in range(3):
            began = time.monotonic()
            try:
                with server.connect(10.0) as third:
                    ok = third.request(PING, b"third %d" % i) == (PONG, b"third %d" % i)
            except OSError:
                ok = False
            rtts.append(time.monotonic() - began if ok else None)
        alive(server, out)
        for client in clogs:
            client.reset()
    worst = max((r for r in rtts if r is not None), default=None)
    out.check(None not in rtts and worst <= NONREAD_PING,
              f"a third client's PING took {seconds(worst) if None not in rtts else 'over 10 s (no answer)'} "
              f"while two clients did not read their replies (--workers {NONREAD_WORKERS}, bound "
              f"{NONREAD_PING:g} s)")
    out.metrics = {"pushed_mib": [round(mib(p), 1) for p in pushed],
                   "ping_ms": [round(r * 1000, 1) if r is not None else None for r in rtts]}
    out.figure = (f"2 non-readers pushed {mib(pushed[0]):.1f} + {mib(pushed[1]):.1f} MiB; a third client's PINGs "
                  f"{', '.join(seconds(r) for r in rtts)} (bound {NONREAD_PING:g} s)")
    return out


# -- 3. closing with unsent data -------------------------------------------------------------------
UNSENT_IDLE = 1.0
UNSENT_LATE = 2.0
UNSENT_FRAME = 8 << 20         # one ECHO bigger than what the kernel buffers for a peer that reads nothing
UNSENT_MAX_FRAME = 16 << 20
BAD_HEADER = struct.pack(">I", 0)


def closing_with_unsent_data(backend, options, scale: Scale) -> Outcome:
    """--idle-timeout 1: an ECHO of 8 MiB (--max-frame 16 MiB) arrives whole but for its last byte; then that
    byte and a length-0 header in one segment, so the server reads both at once, answers the ECHO (more
    than the kernel holds for a peer that does not read) and the protocol error, and closes with unsent
    data. The client never reads: within idle + 2 s the server must have let go of it: not counted
    active, fds back, no socket of it left in the kernel (a reset, not a FIN queued behind 4 MiB)."""
    out = Outcome("closing_with_unsent_data", variant_of(backend, options).name)
    payload = bytes(range(256)) * (UNSENT_FRAME // 256 - 1) + b"u" * 251
    frame = encode(ECHO, payload)
    with ServerProcess(backend, [*options, "--idle-timeout", str(UNSENT_IDLE),
                                 "--max-frame", str(UNSENT_MAX_FRAME)]) as server:
        out.check(echo_ok(server) is not None, "warm-up ECHO failed")
        fds0 = baseline_fds(server)
        client = server.connect(10.0)
        port = client.sock.getsockname()[1]
        client.sock.sendall(frame[:-1])
        read_all = wait_until(lambda: not any(s[1] for s in kernel_sockets(port, server.port))
                              and not any(s[2] for s in kernel_sockets(server.port, port)), 0.5, 0.005)
        client.sock.send(frame[-1:] + BAD_HEADER)      # one segment: read in one recv
        began = time.monotonic()
        wait_until(lambda: sum(s[1] for s in server_side(server, client)) > 0, 0.5, 0.01)
        unsent = sum(s[1] for s in server_side(server, client))
        after = dropped_within(server, client, fds0, began, UNSENT_IDLE + UNSENT_LATE, out,
                               "a connection closing with unsent replies")
        ending = client.ending(5.0)
        client.reset()
        alive(server, out)
    out.check(read_all, "setup: the server did not read the first 8 MiB within 0.5 s (the last byte and the bad "
                        "header may not have been read together)")
    out.metrics = {"unsent_in_kernel_mib": round(mib(unsent), 1),
                   "dropped_after_s": round(after, 2) if after is not None else None, "client_saw": ending}
    out.figure = (f"closing with {mib(unsent):.1f} MiB unsent in the kernel: {let_go(after, UNSENT_IDLE + UNSENT_LATE)}"
                  f"; the client then saw {ending}")
    return out


# -- 4. SIGTERM in a burst of connects -------------------------------------------------------------
BURST_THREADS = 6
BURST_EXIT = 2.0               # idle connections: the drain closes them at once


def sigterm_during_connect_burst(backend, options, scale: Scale) -> Outcome:
    """Several times: a burst of connections from 6 threads, SIGTERM when half are open; exit 0 within
    2 s with the final JSON line, connections_aborted 0, no traceback on stderr."""
    out = Outcome("sigterm_during_connect_burst", variant_of(backend, options).name)
    sizes = sizes_of(scale)
    runs = []
    for repeat in range(sizes.burst_repeats):
        with ServerProcess(backend, options) as server:
            opened, lock = [], threading.Lock()
            per_thread = -(-sizes.burst_conns // BURST_THREADS)
            threads = [threading.Thread(target=connect_burst, args=(server.address, per_thread, opened, lock),
                                        daemon=True) for _ in range(BURST_THREADS)]
            for thread in threads:
                thread.start()
            half = sizes.burst_conns // 2
            wait_until(lambda: len(opened) >= half, 10.0, 0.001)       # noqa: B023 (used right here)
            at = len(opened)
            status, final = server.stop(grace=10.0)
            errors = server.errors()
            for thread in threads:
                thread.join(10.0)
            with lock:
                for sock in opened:
                    sock.close()
        aborted = (final or {}).get("connections_aborted")
        runs.append({"open_at_sigterm": at, "status": status, "final": final is not None, "aborted": aborted,
                     "exit_s": round(server.stopped_in, 2) if server.stopped_in is not None else None,
                     "traceback": "Traceback" in errors})
        name = f"burst {repeat + 1}"
        out.check(status == 0, f"{name}: exit status {status} (SIGTERM with {at} connections open): "
                               f"{last_line(errors)!r}")
        out.check(final is not None, f"{name}: no final JSON line")
        out.check(aborted == 0, f"{name}: connections_aborted {aborted} (idle connections: the drain closes them)")
        out.check(server.stopped_in is not None and server.stopped_in <= BURST_EXIT,
                  f"{name}: exit took {seconds(server.stopped_in)} (bound {BURST_EXIT:g} s)")
        out.check("Traceback" not in errors, f"{name}: a traceback on stderr: {traceback_tail(errors)!r}")
    out.metrics = {"bursts": runs}
    worst = max((r["exit_s"] for r in runs if r["exit_s"] is not None), default=None)
    out.figure = (f"{len(runs)} bursts of {sizes.burst_conns} connects, SIGTERM at ~{sizes.burst_conns // 2}: "
                  f"exit {[r['status'] for r in runs]}, aborted {[r['aborted'] for r in runs]}, slowest exit "
                  f"{seconds(worst)}, tracebacks {sum(r['traceback'] for r in runs)}")
    return out


def connect_burst(address, count: int, opened: list, lock: threading.Lock) -> None:
    """Open ``count`` connections as fast as they come, keeping each; refused ones (the listener
    closed by SIGTERM) are skipped."""
    for _ in range(count):
        try:
            sock = socket.create_connection(address, timeout=5.0)
        except OSError:
            continue
        with lock:
            opened.append(sock)


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def traceback_tail(text: str) -> str:
    """The traceback's last line (the error) and the line before it (where)."""
    lines = [line.strip() for line in text[text.find("Traceback"):].splitlines() if line.strip()]
    return " | ".join(lines[-2:])


# -- 5. thread exhaustion --------------------------------------------------------------------------
# Address space left to the server. A thread costs its stack (8 MiB, RLIMIT_STACK) and, until glibc has
# 8 per CPU, a malloc arena (64 MiB reserved): 32 such threads (the pool's workers) + 256 MiB fit, 300
# threads do not (here, 2 CPUs: ~190 with 16 arenas; more CPUs, fewer).
AS_HEADROOM = 32 * (8 + 64) + 256 << 20
EXHAUST_WAIT = 20.0


def thread_exhaustion(backend, options, scale: Scale) -> Outcome:
    """RLIMIT_AS = the server's VMS + 2.5 GiB, set once it runs (prlimit); then 300 connections at once,
    each with a PING, held open once answered: the server lives, each is served (PONG) or told "server
    busy" (counted in connections_rejected), and once they close a fresh client is served."""
    out = Outcome("thread_exhaustion", variant_of(backend, options).name)
    sizes = sizes_of(scale)
    with ServerProcess(backend, options) as server:
        out.check(echo_ok(server) is not None, "warm-up ECHO failed")
        vms = server.process.memory_info().vms
        limit = vms + AS_HEADROOM
        server.process.rlimit(psutil.RLIMIT_AS, (limit, limit))
        if not out.check(echo_ok(server) is not None, "an ECHO failed right after RLIMIT_AS was set"):
            alive(server, out)
            out.figure = f"RLIMIT_AS {mib(limit):.0f} MiB (VMS + {mib(AS_HEADROOM):.0f}): not serving"
            return out
        rejected0 = server.stats()["connections_rejected"]
        clients, connect_failures = [], 0
        for i in range(sizes.exhaust_conns):
            try:
                client = Client(server.address, timeout=10.0)
                client.send(encode(PING, b"%d" % i))
                clients.append((i, client))
            except OSError:
                connect_failures += 1
        fates = collect_replies(clients, time.monotonic() + EXHAUST_WAIT)
        try:
            stats = server.stats(5.0)
        except (OSError, ValueError, ProtocolError):
            stats = {}
        fresh = echo_ok(server)
        alive(server, out)
    counts = {fate: sum(1 for f in fates if f == fate) for fate in ("served", "busy", "closed", "other", "pending")}
    rejected = stats.get("connections_rejected", rejected0) - rejected0
    out.check(connect_failures == 0, f"{connect_failures} of {sizes.exhaust_conns} connects failed")
    out.check(counts["closed"] + counts["other"] + counts["pending"] == 0,
              f"of {sizes.exhaust_conns} connections: {counts['closed']} closed without a reply, {counts['other']} "
              f"got something else, {counts['pending']} no reply in {EXHAUST_WAIT:g} s (served {counts['served']}, "
              f"busy {counts['busy']})")
    out.check(not stats or rejected == counts["busy"], f"connections_rejected rose by {rejected}, "
                                                       f"{counts['busy']} were told 'server busy'")
    out.check(fresh is not None, "a fresh client was not served after the 300 closed")
    out.metrics = {"vms_mib": round(mib(vms)), "limit_mib": round(mib(limit)), **counts,
                   "connect_failures": connect_failures, "rejected_counted": rejected if stats else None}
    out.figure = (f"RLIMIT_AS {mib(limit):.0f} MiB (VMS + {mib(AS_HEADROOM):.0f}): {counts['served']} served, "
                  f"{counts['busy']} busy, {counts['closed'] + counts['other'] + counts['pending']} neither; "
                  f"fresh client {'served' if fresh is not None else 'NOT served'}")
    return out


EXHAUST_QUIET = 0.3            # no reply for this long: the server waits for connections to close (a pool)


def collect_replies(clients: list, deadline: float) -> list[str]:
    """Read each client's first reply: 'served' (its PONG), 'busy' (ERROR "server busy"), 'closed' (EOF or
    reset first), 'other', or 'pending' at ``deadline``. Answered clients stay open, so the server holds
    them all at once, until no reply has come for EXHAUST_QUIET s (a bounded pool waits for closes)."""
    fates = {i: "pending" for i, _ in clients}
    held = []
    with selectors.DefaultSelector() as sel:
        for i, client in clients:
            client.sock.setblocking(False)
            sel.register(client.sock, selectors.EVENT_READ, (i, client))
        while sel.get_map() and time.monotonic() < deadline:
            events = sel.select(min(EXHAUST_QUIET, max(0.0, deadline - time.monotonic())))
            if not events:
                for client in held:
                    client.close()
                held = []
                continue
            for key, _ in events:
                i, client = key.data
                try:
                    data = client.sock.recv(65536)
                    frames = client.decoder.feed(data) if data else None
                except BlockingIOError:
                    continue
                except (OSError, ProtocolError):
                    frames = None
                if frames == []:
                    continue                               # part of a frame: more to come
                if not frames:
                    fates[i] = "closed"
                elif frames[0] == (PONG, b"%d" % i):
                    fates[i] = "served"
                elif frames[0] == (ERROR, b"server busy"):
                    fates[i] = "busy"
                else:
                    fates[i] = "other"
                sel.unregister(client.sock)
                held.append(client)
    for _, client in clients:
        client.close()
    return list(fates.values())


# -- 6. state kept per closed connection -----------------------------------------------------------
CHURN_IDLE = 60.0              # long: whatever a closed connection leaves until its idle deadline, it keeps here
CHURN_PER_CONN = 250           # bytes of RSS growth allowed per closed connection in round 2 (see churn_state)


def churn_state(backend, options, scale: Scale) -> Outcome:
    """--idle-timeout 60; two rounds of N connect/PING/close cycles: RSS after round 2 is within
    N x 350 B of RSS after round 1 (round 1 warms every pool and cache; what round 2 adds is kept
    per closed connection)."""
    out = Outcome("churn_state", variant_of(backend, options).name)
    sizes = sizes_of(scale)
    bound = sizes.churn_cycles * CHURN_PER_CONN
    with ServerProcess(backend, [*options, "--idle-timeout", str(CHURN_IDLE)]) as server:
        out.check(echo_ok(server) is not None, "warm-up ECHO failed")
        rss, failed = [], 0
        for round_ in range(2):
            failed += churn_round(server, sizes.churn_cycles, sizes.churn_threads)
            settled = wait_until(lambda: active_now(server) == 0, 10.0, 0.05)
            out.check(settled, f"round {round_ + 1}: connections still counted active 10 s after it ended")
            rss.append(settled_rss(server))
        alive(server, out)
    growth = rss[1] - rss[0]
    out.check(failed == 0, f"{failed} cycles failed")
    out.check(growth <= bound, f"RSS grew {mib(growth):.2f} MiB in round 2 ({growth / sizes.churn_cycles:.0f} B per "
                               f"closed connection; bound {CHURN_PER_CONN} B, {mib(bound):.2f} MiB)")
    out.metrics = {"cycles": sizes.churn_cycles, "rss_round1_mib": round(mib(rss[0]), 2),
                   "rss_round2_mib": round(mib(rss[1]), 2), "growth_bytes_per_conn": round(growth / sizes.churn_cycles),
                   "failed": failed}
    out.figure = (f"2 x {sizes.churn_cycles} cycles at --idle-timeout {CHURN_IDLE:g}: RSS {mib(rss[0]):.1f} -> "
                  f"{mib(rss[1]):.1f} MiB ({growth / sizes.churn_cycles:+.0f} B per closed connection, bound "
                  f"{CHURN_PER_CONN})")
    return out


def churn_round(server: ServerProcess, cycles: int, threads: int) -> int:
    """``cycles`` connect/PING/read/close cycles from ``threads`` threads; returns how many failed."""
    failures = [0] * threads
    deadline = time.monotonic() + 120

    def cycle(worker: int) -> None:
        for k in range(worker, cycles, threads):
            if time.monotonic() > deadline:
                failures[worker] += 1
                continue
            try:
                with socket.create_connection(server.address, timeout=10) as sock:
                    sock.sendall(encode(PING, b"%d" % k))
                    want, reply = encode(PONG, b"%d" % k), b""
                    while len(reply) < len(want):
                        data = sock.recv(64)
                        if not data:
                            break
                        reply += data
                    failures[worker] += reply != want
            except OSError:
                failures[worker] += 1
    workers = [threading.Thread(target=cycle, args=(w,)) for w in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(failures)


def settled_rss(server: ServerProcess, samples: int = 5, every: float = 0.1) -> int:
    """The least of a few RSS readings (a transient allocation is not state)."""
    readings = []
    for _ in range(samples):
        readings.append(server.rss())
        time.sleep(every)
    return min(readings)


# -- 7. the write policy ---------------------------------------------------------------------------
WRITE_IDLE = 1.0               # --idle-timeout of both write-policy scenarios
STEADY_FRAME_PAYLOAD = 64 * 1024 - 5      # 64 KiB frames on the wire
STEADY_READ = 64 * 1024        # the reader takes this much...
STEADY_EVERY = 0.3             # ...this often: progress every 0.3 s, always well within --idle-timeout
STOPPED_MIB = 8
STOPPED_LATE = 2.0             # dropped within idle + this after the client's last accepted byte


def slow_steady_reader(backend, options, scale: Scale) -> Outcome:
    """--idle-timeout 1: the client pipelines 64 KiB ECHOs (8 MiB at CI size, from a thread: more than
    the kernel buffers, so the server holds replies it cannot send yet) and reads 64 KiB every 0.3 s
    for 8 s, then the rest at full speed. Its replies always make progress, so every byte must come
    back, in order: nothing cut."""
    out = Outcome("slow_steady_reader", variant_of(backend, options).name)
    sizes = sizes_of(scale)
    count = (sizes.steady_mib << 20) // (STEADY_FRAME_PAYLOAD + 5)
    frames = [encode(ECHO, bytes([i % 251]) * STEADY_FRAME_PAYLOAD) for i in range(count)]
    total = sum(map(len, frames))
    budget = sizes.steady_slow_s + 30.0
    with ServerProcess(backend, [*options, "--idle-timeout", str(WRITE_IDLE)]) as server:
        out.check(echo_ok(server) is not None, "warm-up ECHO failed")
        idle0 = server.stats()["idle_timeouts"]
        # A fixed receive buffer: the reader's progress reaches the server as window updates of its
        # reads, not as the kernel's autotuned bursts (which can hide several reads from the server).
        client = Client(server.address, budget, receive_buffer=STEADY_READ)

        def send():
            with contextlib.suppress(OSError):          # cut: what it got says it
                client.sock.sendall(b"".join(frames))
        sender = threading.Thread(target=send, daemon=True)
        began = time.monotonic()
        sender.start()
        got, slow_got, ending, decoder, replies = 0, 0, None, FrameDecoder(max_frame=2**32 - 1), []
        slow_until, deadline = began + sizes.steady_slow_s, began + budget
        with selectors.DefaultSelector() as sel:
            sel.register(client.sock, selectors.EVENT_READ)
            while got < total and ending is None and time.monotonic() < deadline:
                if time.monotonic() < slow_until:
                    time.sleep(STEADY_EVERY)             # the pace of this reader is the point
                    chunk, ending = read_up_to(client.sock, STEADY_READ)
                    slow_got += len(chunk)
                else:
                    sel.select(1.0)
                    chunk, ending = read_up_to(client.sock, 1 << 20)
                got += len(chunk)
                try:
                    replies.extend(decoder.feed(chunk))
                except ProtocolError:
                    ending = "garbage"
        elapsed = time.monotonic() - began
        wrong = next((n for n, (reply, frame) in enumerate(zip(replies, frames))
                      if reply != (ECHO, frame[5:])), None)
        idle_timeouts = server.stats()["idle_timeouts"] - idle0 if server.alive() else None
        client.reset()
        sender.join(5.0)
        alive(server, out)
    right = min(len(replies), count) if wrong is None else wrong
    how = {"eof": "EOF", "reset": "a reset", "garbage": "bytes that are no frame"}.get(ending, "nothing more")
    phase = "while it read 64 KiB every 0.3 s" if elapsed < sizes.steady_slow_s else "reading at full speed"
    out.check(got >= total and wrong is None,
              f"cut: {mib(got):.2f} of {mib(total):.2f} MiB back ({right} of {count} replies right"
              f"{', then ' + reason(replies[wrong:]) if wrong is not None else ''}), then {how}, "
              f"{elapsed:.1f} s in, {phase} (--idle-timeout {WRITE_IDLE:g})")
    out.metrics = {"requested_mib": round(mib(total), 2), "received_mib": round(mib(got), 2),
                   "received_slowly_mib": round(mib(slow_got), 2), "replies_right": right,
                   "seconds": round(elapsed, 1), "ending": ending, "idle_timeouts": idle_timeouts}
    out.figure = (f"{mib(got):.2f}/{mib(total):.2f} MiB back ({right}/{count} replies right) in {elapsed:.1f} s: "
                  f"64 KiB per {STEADY_EVERY:g} s for {sizes.steady_slow_s:g} s, then at full speed "
                  f"(--idle-timeout {WRITE_IDLE:g}); ended by {ending or 'nothing'}")
    return out


def read_up_to(sock: socket.socket, limit: int) -> tuple[bytes, str | None]:
    """What the kernel holds now, at most ``limit`` bytes, without waiting; and 'eof' or 'reset' if it ended.
    (Readability is asked first: a socket with a timeout waits for data even with MSG_DONTWAIT.)"""
    chunks, size = [], 0
    while size < limit and readable(sock):
        try:
            data = sock.recv(limit - size)
        except BlockingIOError:
            break
        except OSError:
            return b"".join(chunks), "reset"
        if not data:
            return b"".join(chunks), "eof"
        chunks.append(data)
        size += len(data)
    return b"".join(chunks), None


def readable(sock: socket.socket) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(0))


STOPPED_CASES = {"8 MiB pushed": STOPPED_MIB << 20,        # more than it reads: input left unread, replies held
                 "2 MiB pushed": 2 << 20}                    # all read and answered: the replies wait in the kernel


def stopped_reader(backend, options, scale: Scale) -> Outcome:
    """--idle-timeout 1: a client sends 64 KiB ECHOs and never reads, 8 MiB (more than the server can take
    in: it holds replies and leaves input unread) and, on a second connection, 2 MiB (all read and
    answered: every reply waits in the kernel). Each time, within idle + 2 s of the last byte the kernel
    took from the client, the server has let go of it (not active, fds back, no socket of it left),
    idle_timeouts rose by exactly 1, and the client, reading at last, gets a reset."""
    out = Outcome("stopped_reader", variant_of(backend, options).name)
    seen = {}
    with ServerProcess(backend, [*options, "--idle-timeout", str(WRITE_IDLE)]) as server:
        out.check(echo_ok(server) is not None, "warm-up ECHO failed")
        for case, size in STOPPED_CASES.items():
            fds0 = baseline_fds(server)
            idle0 = server.stats()["idle_timeouts"]
            client = server.connect(10.0)
            pushed, last = push(client, size, NONREAD_FRAME)
            after = dropped_within(server, client, fds0, last, WRITE_IDLE + STOPPED_LATE, out, case)
            idle = server.stats()["idle_timeouts"] - idle0 if server.alive() else None
            client.sock.setblocking(True)
            ending = client.ending(10.0)
            client.reset()
            out.check(idle == 1, f"{case}: idle_timeouts rose by {idle}, expected 1 (a reply that made no progress "
                                 f"for --idle-timeout is an idle timeout)")
            out.check(ending == "reset", f"{case}: reading at last, the client got "
                                         f"{'EOF' if ending == 'eof' else ending}, not a reset (the end of a reply "
                                         f"that made no progress is an abort)")
            seen[case] = {"pushed_mib": round(mib(pushed), 1), "dropped_after_s": round(after, 2) if after else None,
                          "idle_timeouts": idle, "client_saw": ending}
            if not alive(server, out):
                break
    out.metrics = seen
    out.figure = "; ".join(f"{case}, never read: {let_go(m['dropped_after_s'], WRITE_IDLE + STOPPED_LATE)}, "
                           f"idle_timeouts +{m['idle_timeouts']}, the client saw {m['client_saw']}"
                           for case, m in seen.items())
    return out


# -- 11. a big frame's buffer ----------------------------------------------------------------------
BIG_PAYLOAD = (1 << 20) - 1   # the largest ECHO the default --max-frame (1 MiB, op byte included) takes
BIG_PER_CLIENT = 256 << 10     # RSS allowed per idle client that once sent a 1 MiB frame


def big_frame_memory(backend, options, scale: Scale) -> Outcome:
    """64 clients, one after another, each ECHO 1 MiB, read it back, then stay connected and idle: the
    server's RSS is within the baseline (after one 1 MiB ECHO on a closed connection) + 64 x 256 KiB."""
    out = Outcome("big_frame_memory", variant_of(backend, options).name)
    sizes = sizes_of(scale)
    payload = (bytes(range(256)) * (BIG_PAYLOAD // 256 + 1))[:BIG_PAYLOAD]
    # a worker per idle client for the connection-dispatch pool (ignored elsewhere): memory, not its queue
    with ServerProcess(backend, [*options, "--workers", str(sizes.big_clients + 8)]) as server:
        out.check(echo_ok(server, payload) is not None, "warm-up 1 MiB ECHO failed")
        wait_until(lambda: active_now(server) == 0, 5.0, 0.05)
        rss0 = settled_rss(server)
        clients, wrong = [], 0
        for i in range(sizes.big_clients):
            try:
                client = server.connect(10.0)
                clients.append(client)
                wrong += client.request(ECHO, payload) != (ECHO, payload)
            except OSError:
                wrong += 1
        still = active_now(server)
        rss = settled_rss(server, samples=10)
        alive(server, out)
        for client in clients:
            client.close()
    growth = rss - rss0
    bound = sizes.big_clients * BIG_PER_CLIENT
    out.check(wrong == 0, f"{wrong} of {sizes.big_clients} 1 MiB ECHOs failed")
    out.check(still == len(clients), f"{still} clients counted active while {len(clients)} idled")
    out.check(growth <= bound, f"RSS grew {mib(growth):.1f} MiB for {sizes.big_clients} idle clients that each "
                               f"once sent 1 MiB ({growth / sizes.big_clients / 1024:.0f} KiB each; bound "
                               f"{BIG_PER_CLIENT >> 10} KiB each, {mib(bound):.0f} MiB)")
    out.metrics = {"clients": sizes.big_clients, "rss_before_mib": round(mib(rss0), 1),
                   "rss_idle_mib": round(mib(rss), 1), "kib_per_client": round(growth / sizes.big_clients / 1024)}
    out.figure = (f"{sizes.big_clients} idle clients after a 1 MiB ECHO each: RSS {mib(rss0):.1f} -> {mib(rss):.1f} "
                  f"MiB ({growth / sizes.big_clients / 1024:.0f} KiB each, bound {BIG_PER_CLIENT >> 10})")
    return out


# -- 12. the buffer budget -------------------------------------------------------------------------
BUDGET = 8 << 20               # --max-buffered: room for 8 maximal frames (--max-frame is the default 1 MiB)
BUDGET_LOOK = 0.5              # how long the held connections are watched for an answer they must not get
BUDGET_MAX_FRAME = 1 << 20
BUDGET_HOSTILE = 40            # connections that each send most of one maximal frame, then stop
BUDGET_MISSING = 4096          # ... this many bytes short of its end
BUDGET_SLACK = 16 << 20        # RSS allowed over the baseline + the budget (reads in flight, threads, the runtime)
BUDGET_HONEST = 3              # clients that PING and ECHO during the attack
BUDGET_PING = 2.0              # ... each answered within this


def buffer_budget(backend, options, scale: Scale) -> Outcome:
    """--max-buffered 8 MiB, then 40 connections each send most of one 1 MiB frame and stop: RSS stays
    within the baseline + the budget + 16 MiB; the connections past the budget get ERROR "server busy",
    counted in buffer_rejections; honest PING/ECHO clients are served meanwhile; the admitted frames, once
    completed, are echoed whole; once everyone left, buffered_bytes is 0 and a fresh 1 MiB ECHO passes."""
    out = Outcome("buffer_budget", variant_of(backend, options).name)
    payload = (bytes(range(256)) * (BUDGET_MAX_FRAME // 256))[:BUDGET_MAX_FRAME - 1]
    frame = encode(ECHO, payload)
    cut = len(frame) - BUDGET_MISSING
    server_options = [*options, "--max-buffered", str(BUDGET), "--frame-timeout", "60",
                      "--workers", str(BUDGET_HOSTILE + BUDGET_HONEST + 8)]   # connection dispatch: memory, not its queue
    with ServerProcess(backend, server_options) as server:
        out.check(echo_ok(server, payload) is not None, "warm-up 1 MiB ECHO failed")
        wait_until(lambda: active_now(server) == 0, 5.0, 0.05)
        rss0 = settled_rss(server)
        hostile, sent = [], []
        for _ in range(BUDGET_HOSTILE):
            client = server.connect(10.0)
            hostile.append(client)
            try:
                client.send(frame[:cut])
                sent.append(True)
            except OSError:                  # refused and closed while it sent
                sent.append(False)
        admissible = BUDGET // BUDGET_MAX_FRAME
        counted = lambda: server.stats().get("buffer_rejections", 0)
        wait_until(lambda: counted() >= BUDGET_HOSTILE - admissible, 10.0, 0.05)
        rss = settled_rss(server)
        slow = honest_round_trips(server)
        look_until = time.monotonic() + BUDGET_LOOK       # one wait for all: the refused are closed by now
        endings = [client.ending(max(look_until - time.monotonic(), 0.01)) for client in hostile]
        refused = [i for i, client in enumerate(hostile) if reason(client.frames) == 'ERROR "server busy"']
        held = [i for i, ending in enumerate(endings) if ending == "open" and not hostile[i].frames]
        lost = 0
        for i in held:                      # admitted: finish the frame, get it back whole
            try:
                hostile[i].sock.settimeout(10.0)
                hostile[i].send(frame[cut:])
                lost += hostile[i].recv_frame() != (ECHO, payload)
            except OSError:
                lost += 1
        rejections = counted()
        for client in hostile:
            client.close()
        freed = wait_until(lambda: server.stats().get("buffered_bytes") == 0 and active_now(server) == 0, 10.0, 0.05)
        fresh = echo_ok(server, payload)
        alive(server, out)
    bound = BUDGET + BUDGET_SLACK
    growth = rss - rss0
    out.check(growth <= bound, f"RSS grew {mib(growth):.1f} MiB under {BUDGET_HOSTILE} partial 1 MiB frames "
                               f"(bound: budget {mib(BUDGET):.0f} + slack {mib(BUDGET_SLACK):.0f} MiB)")
    out.check(len(refused) >= BUDGET_HOSTILE - admissible,
              f"{len(refused)} hostile connections got ERROR \"server busy\", at least "
              f"{BUDGET_HOSTILE - admissible} are past the budget")
    out.check(len(refused) + len(held) == BUDGET_HOSTILE,
              f"{BUDGET_HOSTILE - len(refused) - len(held)} hostile connections neither refused nor held "
              f"(endings {sorted(set(endings))})")
    out.check(rejections == len(refused), f"buffer_rejections {rejections}, {len(refused)} refused")
    out.check(not slow, f"honest clients during the attack: {'; '.join(slow)}")
    out.check(lost == 0, f"{lost} of {len(held)} admitted frames not echoed whole once completed")
    out.check(freed, "buffered_bytes not back to 0 (or connections left) after every hostile closed")
    out.check(fresh is not None, "a fresh 1 MiB ECHO after the attack failed")
    out.metrics = {"rss_before_mib": round(mib(rss0), 1), "rss_attack_mib": round(mib(rss), 1),
                   "refused": len(refused), "held": len(held)}
    out.figure = (f"{BUDGET_HOSTILE} partial 1 MiB frames, budget {mib(BUDGET):.0f} MiB: RSS {mib(rss0):.1f} -> "
                  f"{mib(rss):.1f} MiB, {len(refused)} refused, {len(held)} held")
    return out


def honest_round_trips(server: ServerProcess) -> list[str]:
    """Each of BUDGET_HONEST fresh clients PINGs and ECHOes 64 B; what went wrong or took over BUDGET_PING."""
    problems = []
    for i in range(BUDGET_HONEST):
        began = time.monotonic()
        try:
            with server.connect(BUDGET_PING) as client:
                answers = client.request(PING, b"%d" % i), client.request(ECHO, b"e" * 64)
        except OSError as exc:
            problems.append(f"client {i}: {type(exc).__name__}")
            continue
        took = time.monotonic() - began
        if answers != ((PONG, b"%d" % i), (ECHO, b"e" * 64)):
            problems.append(f"client {i}: {reason([answers[0], answers[1]])}")
        elif took > BUDGET_PING:
            problems.append(f"client {i}: {took:.2f} s")
    return problems


# -- 13. timeouts no timer can hold ----------------------------------------------------------------
HUGE = [("--idle-timeout", "1e10"), ("--idle-timeout", "inf"), ("--frame-timeout", "1e10"), ("--drain-timeout", "inf")]
REFUSE_WAIT = 30.0             # a server that starts after all is stopped once it says "listening on"


def huge_timeouts(backend, options, scale: Scale) -> Outcome:
    """--idle-timeout 1e10 / inf, --frame-timeout 1e10, --drain-timeout inf: the server refuses to start,
    exit status 2, exactly one line on stderr naming the option, no traceback. For go also the binary
    itself, started directly (its own validation)."""
    out = Outcome("huge_timeouts", variant_of(backend, options).name)
    fronts = {"cli": [sys.executable, "-m", "conclab.servers", backend, *options, "--port", "0"]}
    if backend == "go":
        from conclab.servers.golang import build
        fronts["go binary"] = [str(build()), "--port", "0"]
    refused = 0
    results = {}
    for front, cmd in fronts.items():
        for option, value in HUGE:
            status, err, started = start_refused([*cmd, option, value])
            lines = [line for line in err.splitlines() if line.strip()]
            name = f"{front} {option} {value}"
            ok = [out.check(not started, f"{name}: the server started (listening) instead of refusing"),
                  out.check(started or status == 2, f"{name}: exit status {status}, expected 2"),
                  out.check(started or (len(lines) == 1 and option in lines[0]),
                            f"{name}: stderr is {len(lines)} lines, expected one naming {option}: {err[-200:]!r}"),
                  out.check("Traceback" not in err, f"{name}: a traceback on stderr: {traceback_tail(err)!r}")]
            refused += all(ok)
            results[name] = "listening" if started else f"exit {status}: {lines[-1] if lines else ''}"[:120]
    total = len(fronts) * len(HUGE)
    out.metrics = {"refused_right": refused, "cases": total, "results": results}
    out.figure = f"{refused}/{total} refused with exit 2 and one line ({', '.join(fronts)})"
    return out


def start_refused(cmd: list) -> tuple[int | None, str, bool]:
    """Run a server command that should refuse to start: (exit status, stderr, whether it started).
    One that prints its ready line is stopped with SIGTERM (then SIGKILL)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={k: v for k, v in os.environ.items() if k != "CONCLAB_WARNED"})
    os.set_blocking(proc.stdout.fileno(), False)
    stdout, started, end = b"", False, time.monotonic() + REFUSE_WAIT
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while proc.poll() is None and time.monotonic() < end and not started:
            if sel.select(0.05):
                stdout += proc.stdout.read() or b""
            started = b"listening on" in stdout
    if proc.poll() is None:
        started = True
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)
    err = proc.stderr.read().decode(errors="replace")
    proc.stdout.close()
    proc.stderr.close()
    return proc.returncode, err, started


# -- 16. the metrics port --------------------------------------------------------------------------
METRICS_LINE = re.compile(r"^metrics on (\S+):(\d+)$", re.MULTILINE)
METRICS_SCRAPE = 2.0
METRICS_EXIT = 3.0
DRIBBLE = b"GET /metrics HTTP/1.1\r\nHost: conclab\r\n"


def metrics_port(backend, options, scale: Scale) -> Outcome:
    """--metrics-port 0: stderr says "metrics on HOST:PORT" (stdout's first line is still the ready
    line); with one client on the metrics port that sends nothing and one that dribbles a header byte
    every 0.5 s, three scrapes are each answered within 2 s with conclab_connections_active; then
    SIGTERM exits 0 within 3 s while they hang on."""
    out = Outcome("metrics_port", variant_of(backend, options).name)
    stuck, stop, scrapes = [], threading.Event(), []
    with ServerProcess(backend, [*options, "--metrics-port", "0"]) as server:
        wait_until(lambda: METRICS_LINE.search(server.errors()), 2.0, 0.05)   # it comes with the ready line
        said = METRICS_LINE.search(server.errors())
        listening = metrics_listeners(server)
        port = int(said.group(2)) if said else (listening[0] if listening else None)
        with open(server.out_path, "rb") as stdout:
            first = stdout.readline().decode(errors="replace").strip()
        out.check(said is not None, f"no 'metrics on HOST:PORT' line on stderr (listening on {listening} besides "
                                    f"{server.port}): {server.errors()[-200:]!r}")
        out.check(said is None or int(said.group(2)) in listening,
                  f"stderr says metrics on port {said and said.group(2)}, the server listens on {listening}")
        out.check(first.startswith("listening on "), f"stdout's first line is {first!r}")
        if port is None:
            out.check(False, "no metrics listener found at all")
            out.figure = "no metrics port"
            return out
        host = server.host
        try:
            stuck.append(socket.create_connection((host, port), timeout=5.0))       # sends nothing
            stuck.append(socket.create_connection((host, port), timeout=5.0))       # dribbles

            def dribble():
                for i in range(len(DRIBBLE)):
                    try:
                        stuck[1].send(DRIBBLE[i:i + 1])
                    except OSError:
                        return
                    if stop.wait(0.5):
                        return
            dribbler = threading.Thread(target=dribble, daemon=True)
            dribbler.start()
            time.sleep(0.3)
            for _ in range(3):
                scrapes.append(scrape(host, port))
            closed_by_server = [peer_closed(sock) for sock in stuck]
            status, _ = server.stop(grace=10.0)
        finally:
            stop.set()
            for sock in stuck:
                sock.close()
    times = [t for t, _ in scrapes]
    worst = max((t for t in times if t is not None), default=None)
    out.check(scrapes and None not in times and worst <= METRICS_SCRAPE and all(ok for _, ok in scrapes),
              f"scrapes with two slow clients on the metrics port: {[seconds(t) for t in times]}, with "
              f"conclab_connections_active: {[ok for _, ok in scrapes]} (bound {METRICS_SCRAPE:g} s)")
    out.check(status == 0, f"exit status {status} after SIGTERM with slow metrics clients")
    out.check(server.stopped_in is not None and server.stopped_in <= METRICS_EXIT,
              f"SIGTERM took {seconds(server.stopped_in)} to exit with slow metrics clients (bound {METRICS_EXIT:g} s)")
    out.metrics = {"metrics_line": said.group(0) if said else None, "port": port,
                   "scrape_worst_ms": round(worst * 1000, 1) if worst is not None else None,
                   "exit_s": round(server.stopped_in, 2) if server.stopped_in is not None else None,
                   "slow_clients_closed_by_server": closed_by_server}
    out.figure = (f"{'reported' if said else 'NOT reported'} port {port}; scrapes worst {seconds(worst)} beside a "
                  f"silent and a dribbling client; SIGTERM exit {status} in {seconds(server.stopped_in)}")
    return out


def metrics_listeners(server: ServerProcess) -> list[int]:
    """Ports the server listens on besides its own (psutil)."""
    try:
        return sorted({c.laddr.port for c in server.process.net_connections(kind="tcp")
                       if c.status == psutil.CONN_LISTEN and c.laddr.port != server.port})
    except psutil.Error:
        return []


def scrape(host: str, port: int) -> tuple[float | None, bool]:
    """GET /metrics: (seconds, whether the body has conclab_connections_active), or (None, False)."""
    began = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10.0) as response:
            body = response.read().decode("utf-8", "replace")
    except OSError:
        return None, False
    return time.monotonic() - began, "conclab_connections_active" in body


def peer_closed(sock: socket.socket) -> bool:
    """Whether the other end has closed this connection (EOF or reset waiting), without waiting."""
    if not readable(sock):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


EDGES = {
    "fairness": fairness,
    "non_reading_clients": non_reading_clients,
    "closing_with_unsent_data": closing_with_unsent_data,
    "sigterm_during_connect_burst": sigterm_during_connect_burst,
    "thread_exhaustion": thread_exhaustion,
    "churn_state": churn_state,
    "slow_steady_reader": slow_steady_reader,
    "stopped_reader": stopped_reader,
    "big_frame_memory": big_frame_memory,
    "huge_timeouts": huge_timeouts,
    "metrics_port": metrics_port,
    "buffer_budget": buffer_budget,
}
