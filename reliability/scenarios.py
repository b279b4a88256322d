"""The reliability scenarios: each starts live servers of one variant, hurts them, and measures.

One function per scenario, ``scenario(backend, options, scale) -> Outcome``; the
test suite (tests/test_reliability.py) asserts on the Outcome, ``conclab check``
prints and records it. An Outcome says whether the server passed, the headline
figure in words, the numbers behind it, and what failed. ``known_limit`` names
the scenarios a model cannot pass by its nature (docs/reliability.md says why).

Every loop here is bounded in count and in time; every number that depends on
how busy the machine is has a generous bound (the contract's, where it has one).
"""
from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import psutil

from conclab.servers import protocol, variant_of
from conclab.servers.client import Client
from conclab.servers.launcher import ServerProcess, ServerStartError, wait_until
from conclab.servers.protocol import ECHO, ERROR, PING, PONG, WORK, encode

SETTLE_TIMEOUT = 10.0          # how long a server gets to close what it should have closed


# -- sizes -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    """How big each scenario is. ``FULL`` is the full size (conclab check), ``CI`` the test suite's."""

    name: str
    resets: int                # connections reset mid-frame
    churn: int                 # connect/request/close cycles
    churn_threads: int
    slow_silent: int           # slowloris: clients that send nothing
    slow_dribblers: int        # slowloris: clients that send a frame one byte at a time
    clog_mib: int              # clogged reader: how much the client tries to push without reading
    emfile_limit: int          # the server's RLIMIT_NOFILE
    emfile_clients: int        # clients beyond the existing one (more than the limit can hold)
    hostile_rounds: int        # each hostile frame, this many times
    claimers: int              # clients announcing a max_frame frame and sending 10 bytes of it
    shutdown_conns: int        # closed-loop connections when SIGTERM comes
    shutdown_load_s: float     # how long the load runs before SIGTERM
    rate_seconds: float        # the rate-limit measurement window


CI = Scale("ci", resets=300, churn=2_000, churn_threads=4, slow_silent=25, slow_dribblers=25, clog_mib=48,
           emfile_limit=64, emfile_clients=100, hostile_rounds=3, claimers=48, shutdown_conns=100,
           shutdown_load_s=1.0, rate_seconds=2.0)
FULL = Scale("full", resets=2_000, churn=20_000, churn_threads=4, slow_silent=200, slow_dribblers=200, clog_mib=64,
             emfile_limit=64, emfile_clients=200, hostile_rounds=20, claimers=64, shutdown_conns=100,
             shutdown_load_s=3.0, rate_seconds=5.0)


def default_scale() -> Scale:
    """The test suite's sizes: FULL when the environment says CONCLAB_FULL=1, else CI."""
    return FULL if os.environ.get("CONCLAB_FULL") == "1" else CI


# -- outcome ---------------------------------------------------------------------------------------
@dataclass
class Outcome:
    scenario: str
    variant: str
    figure: str = ""
    metrics: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    limit: str | None = None            # why this model cannot pass this scenario, if it cannot
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def status(self) -> str:
        if self.passed:
            return "pass"
        return "limit" if self.limit else "FAIL"

    def check(self, ok, message: str) -> bool:
        if not ok:
            self.failures.append(message)
        return bool(ok)


def settled(server: ServerProcess, outcome: Outcome, baseline_fds: int, active: int = 0) -> tuple[int, int]:
    """Wait until only ``active`` connections (besides the STATS probe) are left and fds are back.

    Returns (fds, CLOSE_WAIT) as last seen, and records a failure for each that is not back.
    """
    def active_now():
        try:
            return server.stats()["connections_active"] - 1          # minus the probe itself
        except OSError:
            return None
    ok = wait_until(lambda: active_now() == active, SETTLE_TIMEOUT, 0.1)
    outcome.check(ok, f"connections_active stayed {active_now()}, expected {active}")
    wait_until(lambda: server.fds() <= baseline_fds and server.close_wait() == 0, SETTLE_TIMEOUT, 0.1)
    fds, close_wait = server.fds(), server.close_wait()
    outcome.check(fds <= baseline_fds, f"fds {baseline_fds} -> {fds}: not back to the baseline")
    outcome.check(close_wait == 0, f"{close_wait} connections left in CLOSE_WAIT")
    return fds, close_wait


def seconds(value: float | None) -> str:
    return "forever (no answer)" if value is None else f"{value:.2f} s"


def mib(nbytes: float) -> float:
    return nbytes / (1 << 20)


def alive(server: ServerProcess, outcome: Outcome) -> bool:
    return outcome.check(server.alive(), f"the server died (exit {server.proc.poll()}): {server.errors()[-300:]!r}")


def echo_ok(server: ServerProcess, payload: bytes = b"bystander", timeout: float = 10.0) -> float | None:
    """A fresh client's ECHO round trip in seconds, or None if it was not answered correctly."""
    began = time.monotonic()
    try:
        with server.connect(timeout) as client:
            if client.request(ECHO, payload) != (ECHO, payload):
                return None
    except OSError:
        return None
    return time.monotonic() - began


# -- 1. resets mid-frame ---------------------------------------------------------------------------
RESET_BATCH = 25
HALF_FRAME = encode(ECHO, b"r" * 1000)[:600]                      # the server holds 600 bytes of 1005
BIG_ECHO = encode(ECHO, bytes(256 * 1024))


def reset_while_stopped(server: ServerProcess) -> None:
    """A reset the server finds together with the last data: a reply the client never reads waits unsent in the
    server's kernel, then half a frame and the RST arrive while the server is stopped (SIGSTOP), so it wakes to
    both at once. (What a busy server sees now and then; libuv then tells the reset as an EOF.)"""
    client = Client(server.address, receive_buffer=4096)
    try:
        client.send(BIG_ECHO)
        client.sock.recv(1, socket.MSG_PEEK)          # the reply has begun: the server's kernel holds the rest
        pids = [server.pid, *server.worker_pids()]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(lambda: all(stopped(pid) for pid in pids), 5.0, 0.01)
            client.send(HALF_FRAME)
        finally:
            client.reset()
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
    finally:
        client.close()


def stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP took effect), or gone."""
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    return True


def reset_mid_frame(backend, options, scale: Scale) -> Outcome:
    """Clients that reset (SO_LINGER 0) mid-frame, mid-reply or right after a request, and one whose reset
    comes with its last data while the server is stopped; a bystander is served."""
    out = Outcome("reset", variant_of(backend, options).name)
    kinds = [HALF_FRAME,                                         # mid-frame
             encode(ECHO, b"x" * 100) + HALF_FRAME,              # one request answered, then mid-frame
             BIG_ECHO * 2]                                       # the server is writing 512 KiB back when the RST comes
    with ServerProcess(backend, options) as server, server.connect() as bystander:
        bystander.request(PING)
        time.sleep(0.1)
        baseline = server.fds()
        bad = 0
        done = 0
        deadline = time.monotonic() + 120
        while done < scale.resets and time.monotonic() < deadline:
            batch = []
            for _ in range(min(RESET_BATCH, scale.resets - done)):
                try:
                    client = server.connect()
                    client.send(kinds[(done + len(batch)) % len(kinds)])
                    batch.append(client)
                except OSError:
                    bad += 1
            for client in batch:
                client.reset()
            done += len(batch) or RESET_BATCH
            payload = b"still here %d" % done
            try:
                bad += bystander.request(ECHO, payload) != (ECHO, payload)
            except OSError:
                bad += 1
                break
        try:
            reset_while_stopped(server)
        except OSError:
            bad += 1
        alive(server, out)
        out.check(bad == 0, f"{bad} bystander requests or connects failed")
        out.check(done >= scale.resets, f"only {done} of {scale.resets} resets done in time")
        fds, close_wait = settled(server, out, baseline, active=1)
        out.metrics = {"resets": done, "fds_before": baseline, "fds_after": fds, "close_wait": close_wait,
                       "bystander_failures": bad}
        out.figure = f"{done} resets; fds {baseline}->{fds}; CLOSE_WAIT {close_wait}; bystander failures {bad}"
    return out


# -- 2. half-close ---------------------------------------------------------------------------------
def half_close(backend, options, scale: Scale) -> Outcome:
    """Pipelined requests, then SHUT_WR: every reply comes back in order, then the server closes (FIN)."""
    out = Outcome("half_close", variant_of(backend, options).name)
    cases = {
        "200 pipelined ECHOs": [(ECHO, b"e%d" % i * (i % 50)) for i in range(200)],
        "ECHOs around two WORK waits": ([(ECHO, b"a%d" % i) for i in range(50)] + [(WORK, struct.pack(">II", 200_000, 0))]
                                        + [(PING, b"p%d" % i) for i in range(50)]
                                        + [(WORK, struct.pack(">II", 50_000, 100) + b"w")]),
        "8 x 256 KiB ECHOs": [(ECHO, bytes([i]) * (256 * 1024)) for i in range(8)],
        "no request": [],
    }
    delivered = expected_total = 0
    with ServerProcess(backend, options) as server:
        clients = {}
        for name, frames in cases.items():
            client = server.connect()
            client.send(b"".join(encode(op, payload) for op, payload in frames))
            client.sock.shutdown(socket.SHUT_WR)
            clients[name] = client
        for name, frames in cases.items():
            client = clients[name]
            ending = client.ending(10.0)
            expected = [(PONG if op == PING else op, payload) for op, payload in frames]
            got = client.frames
            good = sum(1 for a, b in zip(got, expected) if a == b)
            delivered += good
            expected_total += len(expected)
            out.check(got == expected, f"{name}: {good} of {len(expected)} replies right ({len(got)} received)")
            out.check(ending == "eof", f"{name}: the server ended with {ending}, not a clean close")
            client.close()
        alive(server, out)
    out.metrics = {"replies_expected": expected_total, "replies_delivered": delivered}
    out.figure = f"{delivered}/{expected_total} replies after SHUT_WR, then EOF ({len(cases)} cases)"
    return out


# -- 3. a client that stops reading ----------------------------------------------------------------
CLOG_FRAME = encode(ECHO, b"c" * (256 * 1024))
CLOG_STALL = 0.3               # the client is clogged once the kernel takes nothing for this long
CLOG_IDLE = 2.0                # --idle-timeout: a client that reads nothing is dropped within about this
CLOG_DRAIN = 1.0               # --drain-timeout for the SIGTERM part
CLOG_RSS_LIMIT = 32 << 20      # RSS growth allowed while clogged (an unbounded server holds all it was sent)
BYSTANDER_SLOW = 2.0           # a bystander round trip over this means the clog got in its way


def push_until_clogged(client: Client, limit: int, stall: float = CLOG_STALL, budget: float = 10.0,
                       frame: bytes = CLOG_FRAME) -> int:
    """Send ``frame`` again and again without reading until the kernel takes nothing for ``stall`` s;
    returns the bytes it took."""
    return push(client, limit, frame, stall, budget)[0]


def push(client: Client, limit: int, frame: bytes, stall: float = 0.3, budget: float = 10.0) -> tuple[int, float]:
    """Send ``frame`` again and again without reading, until ``limit`` bytes went or the kernel takes
    nothing for ``stall`` s: (bytes taken, when the last of them was taken)."""
    sock = client.sock
    sock.setblocking(False)
    pushed, pending, last = 0, b"", time.monotonic()
    end = last + budget
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_WRITE)
        while pushed < limit and time.monotonic() < end:
            pending = pending or frame[:limit - pushed]
            try:
                sent = sock.send(pending)
            except BlockingIOError:
                if not sel.select(stall):
                    break
                continue
            except OSError:
                break
            pushed, pending, last = pushed + sent, pending[sent:], time.monotonic()
    return pushed, last


def clogged_reader(backend, options, scale: Scale) -> Outcome:
    """A client pushes megabytes of ECHO and never reads: memory stays bounded, others are served,
    the clog is dropped after the idle timeout, and SIGTERM still exits within drain-timeout + 1 s."""
    out = Outcome("clogged_reader", variant_of(backend, options).name)
    with ServerProcess(backend, [*options, "--idle-timeout", str(CLOG_IDLE),
                                 "--drain-timeout", str(CLOG_DRAIN)]) as server:
        out.check(echo_ok(server) is not None, "warm-up ECHO failed")
        rss0 = server.rss()
        clog = server.connect()
        pushed = push_until_clogged(clog, scale.clog_mib << 20)
        clogged_at = time.monotonic()
        growth = server.rss() - rss0
        rtts = [echo_ok(server, b"b%d" % i * 100) for i in range(10)]
        worst = max((r for r in rtts if r is not None), default=None)
        out.check(None not in rtts, f"{rtts.count(None)} of {len(rtts)} bystander ECHOs failed while clogged")
        out.check(worst is not None and worst < BYSTANDER_SLOW, f"a bystander ECHO took {seconds(worst)} while clogged")
        out.check(growth < CLOG_RSS_LIMIT, f"RSS grew {mib(growth):.1f} MiB holding a clogged client "
                                           f"({mib(pushed):.1f} MiB pushed)")
        dropped = wait_until(lambda: server.stats()["connections_active"] == 1, CLOG_IDLE + 6, 0.1)
        dropped_after = time.monotonic() - clogged_at
        out.check(dropped, f"the clogged client was still connected {dropped_after:.1f} s after it stopped "
                           f"(--idle-timeout {CLOG_IDLE})")
        clog.reset()
        # again, and this time SIGTERM while it is clogged
        clog = server.connect()
        pushed2 = push_until_clogged(clog, scale.clog_mib << 20, budget=1.5)
        status, final = server.stop()
        clog.reset()
        stopped_in = server.stopped_in
        out.check(status == 0, f"exit status {status} after SIGTERM")
        out.check(stopped_in is not None and stopped_in <= CLOG_DRAIN + 1.0,
                  f"SIGTERM took {seconds(stopped_in)} to exit with a clogged client (limit {CLOG_DRAIN + 1:g} s)")
    out.metrics = {"pushed_mib": round(mib(pushed), 1), "rss_growth_mib": round(mib(growth), 1),
                   "bystander_worst_ms": round(worst * 1000, 1) if worst is not None else None,
                   "dropped_after_s": round(dropped_after, 2) if dropped else None,
                   "pushed_at_sigterm_mib": round(mib(pushed2), 1),
                   "exit_s": round(stopped_in, 2) if stopped_in is not None else None,
                   "aborted": (final or {}).get("connections_aborted")}
    out.figure = (f"pushed {mib(pushed):.0f} MiB unread: RSS +{mib(growth):.1f} MiB; bystander worst "
                  f"{out.metrics['bystander_worst_ms']} ms; dropped after {out.metrics['dropped_after_s']} s "
                  f"(idle {CLOG_IDLE:g}); SIGTERM exit {out.metrics['exit_s']} s (limit {CLOG_DRAIN + 1:g})")
    return out


# -- 4. slowloris ----------------------------------------------------------------------------------
SLOW_IDLE = 3.0                # --idle-timeout: closes the silent clients
SLOW_FRAME = 1.5               # --frame-timeout: closes the dribblers, well before their idle timeout would
DRIBBLE_EVERY = 0.25           # a dribbler sends one byte this often: the idle clock never sees a frame end
SLOW_BYSTANDER = 1.0           # a bystander's round trip must be well under the timeouts that free the slow ones
SLOW_LATE = 3.0                # a slow client closed later than its timeout + this was kept waiting
SLOW_GIVE_UP = 60.0            # a slow client still open this long after it connected is never closed


def slowloris(backend, options, scale: Scale) -> Outcome:
    """Silent clients and byte-dribblers are closed by the idle and frame timeouts; others are served meanwhile."""
    out = Outcome("slowloris", variant_of(backend, options).name)
    frame = encode(ECHO, b"d" * 1000)               # 4 bytes/s: never complete within SLOW_GIVE_UP
    with ServerProcess(backend, [*options, "--idle-timeout", str(SLOW_IDLE),
                                 "--frame-timeout", str(SLOW_FRAME)]) as server:
        began = time.monotonic()
        silent = [server.connect() for _ in range(scale.slow_silent)]
        dribblers = [server.connect() for _ in range(scale.slow_dribblers)]
        stop = threading.Event()

        def dribble():
            for i in range(len(frame)):
                for client in dribblers:
                    try:
                        client.sock.send(frame[i:i + 1], socket.MSG_DONTWAIT)
                    except OSError:
                        pass
                if stop.wait(DRIBBLE_EVERY):
                    return
        thread = threading.Thread(target=dribble, daemon=True)
        thread.start()
        time.sleep(0.3)
        rtts = []
        try:
            with server.connect(SLOW_GIVE_UP) as bystander:      # (how long it waits is the figure)
                for i in range(5):
                    t0 = time.monotonic()
                    ok = bystander.request(PING, b"%d" % i) == (PONG, b"%d" % i)
                    rtts.append(time.monotonic() - t0 if ok else None)
                    time.sleep(0.1)
        except OSError as exc:
            rtts.append(None)
            out.check(False, f"bystander failed: {exc!r}")
        worst = max((r for r in rtts if r is not None), default=None)
        out.check(None not in rtts and worst is not None and worst < SLOW_BYSTANDER,
                  f"bystander PINGs took up to {seconds(worst)} with slow clients connected (bound {SLOW_BYSTANDER:g} s)")
        closed_in = wait_closed(silent + dribblers, began + SLOW_GIVE_UP)
        stop.set()
        thread.join()
        still_open = sum(1 for c in closed_in if c is None)
        last = max((c - began for c in closed_in if c is not None), default=None)
        out.check(still_open == 0, f"{still_open} slow clients never closed ({SLOW_GIVE_UP:g} s)")
        out.check(last is None or last <= SLOW_IDLE + SLOW_LATE, f"the last slow client was closed only "
                                                                 f"{seconds(last)} after it connected (idle {SLOW_IDLE:g} s)")
        reasons = {"idle": sum((ERROR, b"idle timeout") in c.frames for c in silent),
                   "frame": sum((ERROR, b"frame timeout") in c.frames for c in dribblers)}
        for client in silent + dribblers:
            client.close()
        stats = server.stats()
        out.check(stats["idle_timeouts"] >= scale.slow_silent and stats["frame_timeouts"] >= scale.slow_dribblers,
                  f"counted {stats['idle_timeouts']} idle and {stats['frame_timeouts']} frame timeouts")
        alive(server, out)
    out.metrics = {"slow_clients": scale.slow_silent + scale.slow_dribblers, "still_open": still_open,
                   "last_closed_s": round(last, 2) if last is not None else None,
                   "bystander_worst_ms": round(worst * 1000, 1) if worst is not None else None,
                   "told_idle": reasons["idle"], "told_frame": reasons["frame"]}
    total = scale.slow_silent + scale.slow_dribblers
    out.figure = (f"{total - still_open}/{total} slow clients ({scale.slow_silent} silent + {scale.slow_dribblers} "
                  f"dribbling) closed, the last at "
                  f"{out.metrics['last_closed_s']} s (idle {SLOW_IDLE:g} s, frame {SLOW_FRAME:g} s); bystander worst "
                  f"{out.metrics['bystander_worst_ms']} ms")
    return out


def wait_closed(clients: list, deadline: float) -> list:
    """When each client saw the server close (EOF or reset), or None if it had not by ``deadline``."""
    closed = [None] * len(clients)
    with selectors.DefaultSelector() as sel:
        for i, client in enumerate(clients):
            client.sock.setblocking(False)
            sel.register(client.sock, selectors.EVENT_READ, i)
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                i, client = key.data, clients[key.data]
                try:
                    data = client.sock.recv(65536)
                    if data:
                        client.frames.extend(client.decoder.feed(data))
                        continue
                except BlockingIOError:
                    continue
                except (OSError, protocol.ProtocolError):
                    pass
                closed[i] = time.monotonic()
                sel.unregister(client.sock)
    return closed


# -- 5. descriptor exhaustion (EMFILE) -------------------------------------------------------------
EMFILE_SETTLE = 0.5            # time for the server to run into its fd limit
EMFILE_WINDOW = 1.5            # CPU measured over this, saturated
EMFILE_CPU_LIMIT = 25.0        # % of one core: more means it retries accept() in a busy loop
EMFILE_RESUME = 10.0           # after fds free up, a new client must be served within this


def emfile(backend, options, scale: Scale) -> Outcome:
    """More clients than RLIMIT_NOFILE allows: no busy loop, existing clients served, service resumes."""
    out = Outcome("emfile", variant_of(backend, options).name)
    limit = scale.emfile_limit
    with ServerProcess(backend, options, nofile=limit) as server:
        existing = server.connect()
        out.check(existing.request(PING, b"first") == (PONG, b"first"), "the first client was not served")
        crowd = []
        for i in range(scale.emfile_clients):
            try:
                client = Client(server.address, timeout=5.0)
                client.send(encode(PING, b"%d" % i))
                crowd.append(client)
            except OSError:
                break
        time.sleep(EMFILE_SETTLE)
        fds_saturated = server.fds()
        cpu = server.cpu_percent(EMFILE_WINDOW)
        out.check(cpu < EMFILE_CPU_LIMIT, f"{cpu:.0f}% CPU while out of fds (limit {EMFILE_CPU_LIMIT:g}%): a busy loop")
        t0 = time.monotonic()
        try:
            served = existing.request(PING, b"existing") == (PONG, b"existing")
        except OSError:
            served = False
        existing_rtt = time.monotonic() - t0
        out.check(served and existing_rtt < 5.0, f"the existing client was not served while saturated "
                                                 f"({existing_rtt:.2f} s)")
        answered_before = sum(1 for c in crowd if poll_reply(c) == "answered")
        # free fds: close whoever was answered or turned away; a new client must then be served. A new client
        # that arrives while the server still holds every fd may be shed like the crowd: it tries again.
        fresh, fresh_state, t_free = None, "pending", time.monotonic()
        shed = answered = fresh_shed = 0
        end = t_free + EMFILE_RESUME
        while time.monotonic() < end:
            for client in list(crowd):
                state = poll_reply(client)
                if state != "pending":
                    answered += state == "answered"
                    shed += state != "answered"
                    client.close()
                    crowd.remove(client)
            if fresh is None:
                try:
                    fresh = Client(server.address, timeout=5.0)
                    fresh.send(encode(PING, b"fresh"))
                except OSError:
                    fresh = None
            elif fresh_state == "pending":
                fresh_state = poll_reply(fresh, b"fresh")
                if fresh_state == "closed":
                    fresh.close()
                    fresh, fresh_state, fresh_shed = None, "pending", fresh_shed + 1
            if fresh_state == "answered" and not crowd:
                break
            time.sleep(0.05)
        resumed_in = time.monotonic() - t_free
        out.check(fresh_state == "answered", f"no new client was served within {EMFILE_RESUME:g} s of fds being "
                                             f"freed ({fresh_shed} shed)")
        out.check(not crowd, f"{len(crowd)} queued clients neither served nor closed {EMFILE_RESUME:g} s after "
                             f"fds were freed")
        alive(server, out)
        for client in crowd + [existing] + ([fresh] if fresh else []):
            client.close()
        status, _ = server.stop()
        out.check(status == 0, f"exit status {status}")
    out.metrics = {"nofile": limit, "clients": scale.emfile_clients + 1, "fds_saturated": fds_saturated,
                   "answered_while_saturated": answered_before,
                   "cpu_percent": round(cpu, 1), "existing_rtt_ms": round(existing_rtt * 1000, 1),
                   "answered": answered, "shed": shed, "fresh_shed": fresh_shed, "resumed_s": round(resumed_in, 2)}
    out.figure = (f"CPU {cpu:.1f}% out of fds ({fds_saturated}/{limit}); existing served in "
                  f"{existing_rtt * 1000:.0f} ms; queued: {answered} served, {shed} shed; new client served "
                  f"{resumed_in:.1f} s after fds freed")
    return out


def poll_reply(client: Client, payload: bytes | None = None) -> str:
    """Non-blocking: 'answered' (a PONG), 'closed' (EOF, reset, ERROR) or 'pending'."""
    client.sock.setblocking(False)     # (with a timeout set, Python would wait for data before recv)
    try:
        data = client.sock.recv(65536)
    except BlockingIOError:
        data = None
    except OSError:
        return "closed"
    if data == b"":
        return "closed"
    if data:
        client.frames.extend(client.decoder.feed(data))
    if client.frames:
        op, got = client.frames[0]
        return "answered" if op == PONG and (payload is None or got == payload) else "closed"
    return "pending"


# -- 6. hostile frames -----------------------------------------------------------------------------
HOSTILE = {
    "length 2^32-1": (struct.pack(">IB", 2**32 - 1, ECHO), "frame length"),
    "length 2^31": (struct.pack(">I", 2**31), "frame length"),
    "length max+1": (struct.pack(">I", protocol.DEFAULT_MAX_FRAME + 1), "frame length"),
    "length 0": (struct.pack(">I", 0), "frame length"),
    "unknown op": (encode(0x42, b"?"), "unknown op"),
    "client sends ERROR": (encode(ERROR, b"x"), "unknown op"),
    "client sends PONG": (encode(PONG), "unknown op"),
    "short WORK": (encode(WORK, b"1234567"), "WORK"),
    "empty WORK": (encode(WORK), "WORK"),
    "PING 65 bytes": (encode(PING, b"p" * 65), "PING"),
    "PING of max_frame": (encode(PING, b"p" * (protocol.DEFAULT_MAX_FRAME - 1)), "PING"),
}
HOSTILE_RSS_LIMIT = 24 << 20   # growth allowed; the claims alone would be claimers x 1 MiB if allocated


def hostile(backend, options, scale: Scale) -> Outcome:
    """Bad lengths (up to 2^32-1, header only), unknown ops, short WORK, oversized PING, and clients
    announcing a max_frame frame they never send: clear ERROR, nothing allocated, others unaffected."""
    out = Outcome("hostile", variant_of(backend, options).name)
    wrong = []
    with ServerProcess(backend, options) as server, server.connect() as bystander:
        out.check(bystander.request(ECHO, b"warm-up") == (ECHO, b"warm-up"), "warm-up ECHO failed")
        rss0 = server.rss()
        errors0 = bystander.stats()["protocol_errors"]
        offenders = 0
        for _ in range(scale.hostile_rounds):
            clients = {}
            for name, (data, _) in HOSTILE.items():
                client = server.connect()
                client.send(data)
                clients[name] = client
            for name, client in clients.items():
                ending = client.ending(10.0)
                reason = HOSTILE[name][1]
                frames = client.frames
                ok = len(frames) == 1 and frames[0][0] == ERROR and reason in frames[0][1].decode(errors="replace")
                if not ok or ending == "open":
                    wrong.append(f"{name}: {frames[:1]!r}, then {ending}")
                offenders += 1
                client.close()
        claimers = []
        for _ in range(scale.claimers):            # each says "1 MiB follows", sends 10 bytes, waits
            client = server.connect()
            client.send(struct.pack(">IB", protocol.DEFAULT_MAX_FRAME, ECHO) + b"0123456789")
            claimers.append(client)
        time.sleep(0.5)
        growth = server.rss() - rss0
        t0 = time.monotonic()
        rtt = time.monotonic() - t0 if bystander.request(ECHO, b"unaffected") == (ECHO, b"unaffected") else None
        for client in claimers:
            client.reset()
        errors = bystander.stats()["protocol_errors"] - errors0
        alive(server, out)
    out.check(not wrong, f"{len(wrong)} hostile frames not answered with a clear ERROR and close: {wrong[:3]}")
    out.check(errors == offenders, f"protocol_errors rose by {errors}, expected {offenders}")
    out.check(growth < HOSTILE_RSS_LIMIT, f"RSS grew {mib(growth):.1f} MiB ({scale.claimers} clients claimed "
                                          f"{scale.claimers} MiB)")
    out.check(rtt is not None and rtt < BYSTANDER_SLOW, f"the bystander's ECHO took {seconds(rtt)}")
    out.metrics = {"hostile_frames": offenders, "answered_right": offenders - len(wrong),
                   "claimed_mib": scale.claimers, "rss_growth_mib": round(mib(growth), 1),
                   "bystander_ms": round(rtt * 1000, 1) if rtt is not None else None}
    out.figure = (f"{offenders - len(wrong)}/{offenders} hostile frames -> ERROR + close; {scale.claimers} MiB "
                  f"claimed, RSS +{mib(growth):.1f} MiB; bystander {out.metrics['bystander_ms']} ms")
    return out


# -- 7. churn --------------------------------------------------------------------------------------
def churn(backend, options, scale: Scale) -> Outcome:
    """Many connect/request/close cycles (some close before reading, some send nothing): fds back, no CLOSE_WAIT."""
    out = Outcome("churn", variant_of(backend, options).name)
    with ServerProcess(backend, options) as server:
        out.check(echo_ok(server) is not None, "warm-up ECHO failed")
        time.sleep(0.1)
        baseline = server.fds()
        failures = [0] * scale.churn_threads
        done = [0] * scale.churn_threads
        deadline = time.monotonic() + 300

        def cycles(worker: int) -> None:
            for k in range(worker, scale.churn, scale.churn_threads):
                if time.monotonic() > deadline:
                    return
                try:
                    with socket.create_connection(server.address, timeout=10) as sock:
                        if k % 10 == 3:
                            sock.sendall(encode(PING))            # and close without reading the PONG
                        elif k % 10 != 7:                         # 7: connect and close at once
                            sock.sendall(encode(PING, b"%d" % k))
                            reply = b""
                            while len(reply) < 5 + len(b"%d" % k):
                                data = sock.recv(64)
                                if not data:
                                    break
                                reply += data
                            failures[worker] += reply != encode(PONG, b"%d" % k)
                except OSError:
                    failures[worker] += 1
                done[worker] += 1
        began = time.monotonic()
        threads = [threading.Thread(target=cycles, args=(w,)) for w in range(scale.churn_threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - began
        total, failed = sum(done), sum(failures)
        out.check(total == scale.churn, f"only {total} of {scale.churn} cycles ran in time")
        out.check(failed == 0, f"{failed} cycles failed")
        fds, close_wait = settled(server, out, baseline)
        alive(server, out)
    out.metrics = {"cycles": total, "failed": failed, "cycles_per_s": round(total / elapsed), "fds_before": baseline,
                   "fds_after": fds, "close_wait": close_wait}
    out.figure = (f"{total} cycles ({total / elapsed:.0f}/s), {failed} failed; fds {baseline}->{fds}; "
                  f"CLOSE_WAIT {close_wait}")
    return out


# -- 8. graceful shutdown under load ---------------------------------------------------------------
SHUTDOWN_DRAIN = 5.0


def shutdown_under_load(backend, options, scale: Scale) -> Outcome:
    """SIGTERM under a closed loop of many connections: every request the server counted is answered, exit 0."""
    from conclab.loadgen import LoadParams, run_load
    out = Outcome("shutdown", variant_of(backend, options).name)
    with ServerProcess(backend, [*options, "--drain-timeout", str(SHUTDOWN_DRAIN)]) as server:
        baseline = server.fds()
        target = f"{server.address[0]}:{server.address[1]}"
        params = LoadParams(target=target, mode="closed", conns=scale.shutdown_conns, duration=60.0, op="echo",
                            size=64, connect_timeout=10.0)
        box = {}

        def load():
            try:
                box["result"] = run_load(params)
            except Exception as exc:            # reported below, never lost in a thread
                box["error"] = exc
        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        loaded = wait_until(lambda: server.fds() >= baseline + scale.shutdown_conns or not thread.is_alive(), 20)
        out.check(loaded, f"the load never reached {scale.shutdown_conns} connections")
        time.sleep(scale.shutdown_load_s)
        status, final = server.stop()
        stopped_in = server.stopped_in
        thread.join(30)
    result = box.get("result") or {}
    out.check("error" not in box, f"the load generator failed: {box.get('error')!r}")
    replies = result.get("requests", 0)
    counted = (final or {}).get("requests_total")
    lost = None if counted is None else counted - replies
    out.check(status == 0, f"exit status {status}")
    out.check(final is not None, "no final JSON line")
    out.check(lost == 0, f"{lost} requests counted by the server were never answered ({counted} counted, "
                         f"{replies} replies)")
    out.check(replies > 0, "no replies at all")
    aborted = (final or {}).get("connections_aborted")
    out.metrics = {"conns": scale.shutdown_conns, "replies": replies, "server_requests": counted, "lost": lost,
                   "exit_status": status, "exit_s": round(stopped_in, 2) if stopped_in is not None else None,
                   "aborted": aborted, "client_errors": result.get("errors")}
    out.figure = (f"{scale.shutdown_conns} conns: {replies} replies, {lost} lost; exit {status} in "
                  f"{out.metrics['exit_s']} s; aborted {aborted}")
    return out


# -- 9. rate limit, delay mode ---------------------------------------------------------------------
RATE = 200.0
RATE_BURST = 10
RATE_TOLERANCE = 0.10
RATE_RSS_LIMIT = 16 << 20      # a client pipelining tiny requests faster than the rate, never reading


def rate_delay(backend, options, scale: Scale) -> Outcome:
    """--rate-limit R (delay): a pipelining client gets R requests/s (within 10%), nothing refused; and
    one that pipelines tiny requests far faster, never reading, costs the server a bounded amount of memory."""
    from conclab.loadgen import LoadParams, run_load
    out = Outcome("rate_delay", variant_of(backend, options).name)
    with ServerProcess(backend, [*options, "--rate-limit", str(RATE), "--burst", str(RATE_BURST)]) as server:
        target = f"{server.address[0]}:{server.address[1]}"
        result = run_load(LoadParams(target=target, mode="closed", conns=1, pipeline=16, duration=scale.rate_seconds,
                                     op="ping", size=8))
        stats = server.stats()
        rss0 = server.rss()
        with server.connect() as hog:               # 10,000 PINGs a send: years of debt at 200/s
            pushed = push_until_clogged(hog, 64 << 20, budget=5.0, frame=encode(PING) * 10_000)
            growth = server.rss() - rss0
            hog.reset()
        out.check(growth < RATE_RSS_LIMIT, f"RSS grew {mib(growth):.1f} MiB with {mib(pushed):.1f} MiB of PINGs "
                                           f"waiting for tokens")
        alive(server, out)
    rps = result["throughput_rps"]
    error = (rps - RATE) / RATE
    out.check(abs(error) <= RATE_TOLERANCE, f"{rps:.1f} req/s, {error:+.1%} off --rate-limit {RATE:g}")
    out.check(not result["errors"], f"client errors {result['errors']}")
    out.check(stats["rate_limited"] == 0, f"{stats['rate_limited']} refused in delay mode")
    out.metrics = {"rate": RATE, "burst": RATE_BURST, "measured_rps": rps, "error_percent": round(error * 100, 1),
                   "seconds": scale.rate_seconds, "hog_pushed_mib": round(mib(pushed), 1),
                   "hog_rss_growth_mib": round(mib(growth), 1)}
    out.figure = (f"{rps:.1f} req/s over {scale.rate_seconds:g} s for R={RATE:g} ({error:+.1%}), pipeline 16; "
                  f"{mib(pushed):.1f} MiB of unread PINGs: RSS +{mib(growth):.1f} MiB")
    return out


# -- 10. rate limit, reject mode -------------------------------------------------------------------
def rate_reject(backend, options, scale: Scale) -> Outcome:
    """--rate-limit-mode reject: the excess gets ERROR "rate limited" and the connection stays open; a frame
    that breaks the protocol gets its ERROR and the close, over the rate or not."""
    out = Outcome("rate_reject", variant_of(backend, options).name)
    burst, sent = 5, 20
    with ServerProcess(backend, [*options, "--rate-limit", "2", "--burst", str(burst),
                                 "--rate-limit-mode", "reject"]) as server, server.connect() as client:
        client.send(b"".join(encode(PING, b"%d" % i) for i in range(sent)))
        replies = [client.recv_frame() for _ in range(sent)]
        pongs = [p for op, p in replies if op == PONG]
        refused = [p for op, p in replies if op == ERROR]
        out.check(burst <= len(pongs) <= burst + 1, f"{len(pongs)} of {sent} served at once with --burst {burst}")
        out.check(len(pongs) + len(refused) == sent and set(refused) == {b"rate limited"},
                  f"unexpected replies: {replies[:3]}...")
        time.sleep(0.7)                                      # a token comes back (2 a second)
        again = client.request(PING, b"again")
        out.check(again == (PONG, b"again"), f"after the refusals the connection answered {again}")
        counted = client.stats()["rate_limited"]
        out.check(counted == len(refused), f"rate_limited counted {counted}, {len(refused)} refused")
        # Over the rate still, a frame that breaks the protocol: checked before any bucket is asked.
        client.send(encode(WORK, b"1234567"))
        broken = client.recv_frame()
        out.check(broken[0] == ERROR and b"WORK" in broken[1],
                  f"a short WORK over the rate got {broken!r}, not the protocol's ERROR")
        out.check(client.ending(5.0) in ("eof", "reset"), "the connection stayed open after the protocol ERROR")
    out.metrics = {"sent": sent, "served": len(pongs), "refused": len(refused)}
    out.figure = (f"{sent} pipelined at --rate-limit 2 --burst {burst}: {len(pongs)} served, {len(refused)} "
                  f"'rate limited'; still open, served 0.7 s later; a short WORK then: ERROR, closed")
    return out


# -- 11. --max-frame -------------------------------------------------------------------------------
def max_frame(backend, options, scale: Scale) -> Outcome:
    """--max-frame N: a frame of N is served; a header announcing N+1 is refused before any payload is sent."""
    out = Outcome("max_frame", variant_of(backend, options).name)
    with ServerProcess(backend, [*options, "--max-frame", "1000"]) as server:
        with server.connect() as client:
            got = client.request(ECHO, b"m" * 999)
            out.check(got == (ECHO, b"m" * 999), "a frame of exactly --max-frame was not echoed")
        with server.connect() as client:
            t0 = time.monotonic()
            client.send(struct.pack(">I", 1001))             # the header only: no payload will ever come
            try:
                reply = client.recv_frame()
            except OSError as exc:
                reply = exc
            rtt = time.monotonic() - t0
            out.check(reply == (ERROR, b"frame length 1001 outside 1..1000"), f"the header got {reply!r}")
            out.check(client.ending(5.0) != "open", "the connection stayed open after ERROR")
    out.metrics = {"max_frame": 1000, "refused_after_ms": round(rtt * 1000, 1)}
    out.figure = f"1000 served; a 4-byte header announcing 1001 refused in {rtt * 1000:.0f} ms, no payload read"
    return out


# -- 12. loopback by default -----------------------------------------------------------------------
NON_LOOPBACK = "192.0.2.1"     # TEST-NET-1 (RFC 5737): never assigned here, so nothing is ever exposed


def loopback_default(backend, options, scale: Scale) -> Outcome:
    """No --host: bound to 127.0.0.1. A non-loopback --host prints a warning (tried on an address this
    host does not have, so the bind fails and nothing is exposed); another loopback address does not."""
    out = Outcome("loopback", variant_of(backend, options).name)
    with ServerProcess(backend, options) as server:
        out.check(server.address[0] == "127.0.0.1", f"default bind {server.address[0]}")
        default = server.address[0]
    warning = f"warning: binding {NON_LOOPBACK}"
    runs = {"cli": [sys.executable, "-m", "conclab.servers", backend, *options, "--host", NON_LOOPBACK, "--port", "0"]}
    if backend == "go":
        from conclab.servers.golang import build
        runs["go binary"] = [str(build()), "--host", NON_LOOPBACK, "--port", "0"]
    for name, cmd in runs.items():
        done = run_briefly(cmd)
        out.check(warning in done.stderr, f"{name}: no warning for --host {NON_LOOPBACK}: {done.stderr[-200:]!r}")
    with ServerProcess(backend, [*options, "--host", "127.0.0.2"]) as other:
        quiet = "warning" not in other.errors()
    out.check(quiet, "a loopback --host 127.0.0.2 printed a warning")
    out.metrics = {"default_host": default, "warns_non_loopback": not any("no warning" in f for f in out.failures)}
    out.figure = f"default {default}; --host {NON_LOOPBACK} warns; 127.0.0.2 quiet"
    return out


def run_briefly(cmd: list, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run a server that should fail to bind; if it binds after all (the address exists), stop it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "CONCLAB_WARNED"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=STOP_GRACE)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


STOP_GRACE = 20.0


# -- registry --------------------------------------------------------------------------------------
from . import edges, redis_outage  # noqa: E402  (here: both build on the helpers above; this module is imported first)

SCENARIOS = {
    "reset": reset_mid_frame,
    "half_close": half_close,
    "clogged_reader": clogged_reader,
    "slowloris": slowloris,
    "emfile": emfile,
    "hostile": hostile,
    "churn": churn,
    "shutdown": shutdown_under_load,
    "rate_delay": rate_delay,
    "rate_reject": rate_reject,
    "max_frame": max_frame,
    "loopback": loopback_default,
    **edges.EDGES,          # the edge scenarios (reliability/edges.py, built on the helpers above)
    **redis_outage.SCENARIOS,   # the shared rate limit's Redis killed and restarted (reliability/redis_outage.py)
}

# (scenario, variant) -> (why the model cannot pass it, the failures that show it). Only failures that
# start so are excused; any other failure of the same scenario is a real one. docs/reliability.md tells the story.
KNOWN_LIMITS = {
    ("slowloris", "threadpool"): (
        "connection dispatch: each slow client holds one of the --workers threads until its timeout frees it; "
        "with more slow clients than workers, a new client waits in the executor's queue behind them "
        "(head-of-line blocking, the model's lesson); the slow clients queued behind the first 32 start "
        "their timeouts only when a worker takes them",
        ("bystander", "the last slow client was closed only")),
    ("non_reading_clients", "threadpool"): (
        "connection dispatch: with --workers 2, the two clients that never read hold both workers (each "
        "a connection's for its life) until --idle-timeout frees one; the third client waits in the "
        "executor's queue (head-of-line blocking, the model's lesson)",
        ("a third client's PING took",)),
}


def known_limit(scenario: str, variant: str) -> str | None:
    limit = KNOWN_LIMITS.get((scenario, variant))
    return limit[0] if limit else None


def run(scenario: str, backend: str, options=(), scale: Scale | None = None) -> Outcome:
    """Run one scenario against one variant; a server's misbehaviour is a failed Outcome, never an exception."""
    scale = scale or default_scale()
    variant = variant_of(backend, options).name
    began = time.monotonic()
    try:
        outcome = SCENARIOS[scenario](backend, list(options), scale)
    except (OSError, ServerStartError, protocol.ProtocolError, psutil.Error, ValueError) as exc:   # a server gone wrong
        outcome = Outcome(scenario, variant, figure=f"error: {exc!r}"[:200], failures=[f"{type(exc).__name__}: {exc}"])
    outcome.seconds = time.monotonic() - began
    limit = KNOWN_LIMITS.get((scenario, variant))
    if limit and outcome.failures and all(failure.startswith(limit[1]) for failure in outcome.failures):
        outcome.limit = limit[0]
    return outcome
