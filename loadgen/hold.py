"""Hold mode: ramp N connections, PING each once, hold them; who got in, how fast, and why not.

Every process ramps its share at its share of ``--connect-rate`` (the
processes' schedules interleave, so together they connect at C per second),
each connection a non-blocking ``connect`` watched by one epoll loop:

    CONNECTING --writable, SO_ERROR 0--> PINGING --PONG--> HELD
         |                                  |                 |  --keepalive PING--> KEEPALIVE --PONG--> HELD
         +-- refused / emfile / timeout ... +-- ERROR "server busy" / reset / EOF / timeout  -> failed (reason)
                                                               +-- ERROR "idle timeout" / EOF ... -> lost (reason)

``connect_us`` is the TCP handshake (socket() to writable); ``first_ping_us``
is the first PING's round trip (the accept and the first service). When
``--probe-conns K`` is given, the parent runs a small closed loop through K
more connections while the N are held: latency under N idle connections.
Processes: as many as ``--procs`` asks, more when one process's descriptor
limit cannot hold its share; source addresses 127.0.0.x when ephemeral ports
run short (plan.plan_sources). The probe is the closed loop's own worker
function (engine.traffic_worker), run in the parent.
"""
from __future__ import annotations

import errno
import math
import select
import socket
import time
from collections import Counter, deque

from conclab.servers import protocol
from conclab.servers.protocol import ERROR, PONG, FrameDecoder, ProtocolError

from . import conn as connmod
from . import histo
from .engine import EPOLLIN, EPOLLOUT, NS, TICK_S, traffic_worker
from .fleet import Fleet, WorkerSpec, run_local, stop_requested
from .histo import Recorder
from .params import LoadParams
from .plan import check_ready, cpus_usable, plan, preflight
from .progress import Progress
from .report import MachineWatch, cpu_check

RECV_SIZE = 4096
HOLD_GRACE_S = 30.0          # a held process ends by itself this long after the planned end (parent gone)
PING_ID = b"hold"
CONNECTING, PINGING, HELD, KEEPALIVE, CLOSED = range(5)


class HoldConn:
    __slots__ = ("sock", "fd", "state", "since", "decoder")

    def __init__(self, sock, now: int) -> None:
        self.sock, self.fd, self.state, self.since = sock, sock.fileno(), CONNECTING, now
        self.decoder = FrameDecoder()


class Holder:
    """One process's share of the held connections."""

    def __init__(self, spec: WorkerSpec, channel) -> None:
        self.spec, self.params, self.channel = spec, spec.params, channel
        self.family, self.address = connmod.resolve(spec.params.target)
        self.timeout_ns = int(spec.params.connect_timeout * NS)
        self.ping = protocol.encode(protocol.PING, PING_ID)
        self.ep = select.epoll()
        self.conns: dict[int, HoldConn] = {}
        self.held: list[HoldConn] = []
        self.pending: deque = deque()            # (deadline, conn, state it must have left by then)
        self.failures, self.lost, self.counts = Counter(), Counter(), Counter()
        self.connect_us, self.first_ping_us, self.keepalive_us = Recorder(), Recorder(), Recorder()
        self.cursor = 0
        self.next_tick = 0

    # -- the ramp ------------------------------------------------------------------------------
    def ramp(self, start: int) -> None:
        """Open this process's connections on schedule; return when each is held or has failed."""
        n, procs, index = self.spec.conns, self.spec.procs, self.spec.index
        step = NS * procs / self.params.connect_rate
        first = start + index * NS / self.params.connect_rate
        k = 0
        next_tick = start
        while k < n or self.counts["in_progress"]:
            t = time.perf_counter_ns()
            while k < n and first + k * step <= t:
                self._open(t)
                k += 1
            due = first + k * step if k < n else next_tick
            self._dispatch(self.ep.poll(max(min(due, next_tick) - t, 0) / NS))
            if time.perf_counter_ns() >= next_tick:
                next_tick = time.perf_counter_ns() + int(TICK_S * NS)
                self._expire(time.perf_counter_ns())
                self.channel.progress(self.counts["connected"])
                if self.channel.stopped():
                    n = k                                  # ended early: no more new connections

    def _open(self, now: int) -> None:
        self.counts["attempted"] += 1
        sources = self.spec.sources
        source = sources[self.counts["attempted"] % len(sources)] if sources else None
        try:
            sock = connmod.new_socket(self.family, source)
        except OSError as exc:
            self.failures[connmod.reason_of(exc)] += 1
            return
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.failures[connmod.reason_of(code)] += 1
            return
        c = HoldConn(sock, now)
        self.conns[c.fd] = c
        self.ep.register(c.fd, EPOLLOUT)
        self.pending.append((now + self.timeout_ns, c, CONNECTING))
        self.counts["in_progress"] += 1

    # -- events --------------------------------------------------------------------------------
    def _dispatch(self, events) -> None:
        for fd, _ in events:
            c = self.conns.get(fd)
            if c is None:
                continue
            if c.state == CONNECTING:
                self._connected(c)
            else:
                self._readable(c)

    def _connected(self, c: HoldConn) -> None:
        code = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._end(c, connmod.reason_of(code))
            return
        now = time.perf_counter_ns()
        self.connect_us.values.append((now - c.since) // 1000)
        self.ep.modify(c.fd, EPOLLIN)
        self._ping(c, PINGING, now)

    def _ping(self, c: HoldConn, state: int, now: int) -> None:
        try:
            c.sock.send(self.ping)
        except OSError as exc:
            self._end(c, connmod.reason_of(exc))
            return
        c.state, c.since = state, now
        self.pending.append((now + self.timeout_ns, c, state))

    def _readable(self, c: HoldConn) -> None:
        try:
            data = c.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._end(c, connmod.reason_of(exc))
            return
        if not data:
            self._end(c, "closed")
            return
        try:
            frames = c.decoder.feed(data)
        except ProtocolError:
            self._end(c, "protocol")
            return
        for op, payload in frames:
            self._frame(c, op, payload)

    def _frame(self, c: HoldConn, op: int, payload: bytes) -> None:
        if op == ERROR:
            self._end(c, connmod.server_reason(payload))
        elif op != PONG or c.state not in (PINGING, KEEPALIVE):
            self._end(c, "protocol")
        else:
            rtt = (time.perf_counter_ns() - c.since) // 1000
            if c.state == PINGING:
                self.first_ping_us.values.append(rtt)
                self.counts["connected"] += 1
                self.counts["in_progress"] -= 1
                self.held.append(c)
            else:
                self.keepalive_us.values.append(rtt)
                self.counts["keepalive_answered"] += 1
            c.state = HELD

    def _end(self, c: HoldConn, reason: str) -> None:
        """Close ``c``: a failure if it never got in, a loss if it was held."""
        if c.state == CLOSED:
            return
        if c.state in (CONNECTING, PINGING):
            self.failures[reason] += 1
            self.counts["in_progress"] -= 1
        else:
            self.lost[reason] += 1
        c.state = CLOSED
        self.conns.pop(c.fd, None)
        self.ep.unregister(c.fd)
        c.sock.close()

    def _expire(self, now: int) -> None:
        """Connections still in the state they were in ``connect_timeout`` ago have timed out."""
        pending = self.pending
        while pending and pending[0][0] <= now:
            _, c, state = pending.popleft()
            if c.state == state:
                self._end(c, "timeout")

    # -- the hold ------------------------------------------------------------------------------
    def hold(self, deadline: int) -> None:
        """Keep the connections (and PING them every --keepalive s) until the parent says stop."""
        while True:
            self._dispatch(self.ep.poll(TICK_S))
            now = time.perf_counter_ns()
            if now >= self.next_tick:
                if self.channel.stopped() or now >= deadline:
                    return
                self.next_tick = now + int(TICK_S * NS)
                self._expire(now)
                self._keepalive(now)
                self.channel.progress(len(self.conns))

    def _keepalive(self, now: int) -> None:
        """PING the next slice of held connections, so each gets one every --keepalive seconds."""
        every = self.params.keepalive
        if not every:
            return
        if self.cursor == 0:
            self.held = [c for c in self.held if c.state != CLOSED]
        count = math.ceil(len(self.held) * TICK_S / every)
        for c in self.held[self.cursor:self.cursor + count]:
            if c.state == HELD:
                self.counts["keepalive_sent"] += 1
                self._ping(c, KEEPALIVE, now)
        self.cursor += count
        if self.cursor >= len(self.held):
            self.cursor = 0

    def result(self, cpu_s: float, wall_s: float, ramp_s: float) -> dict:
        held = sum(1 for c in self.conns.values() if c.state in (HELD, KEEPALIVE))
        for c in list(self.conns.values()):
            c.state = CLOSED
            c.sock.close()
        self.ep.close()
        return {
            "requested": self.spec.conns, "attempted": self.counts["attempted"],
            "connected": self.counts["connected"], "failure_reasons": dict(self.failures),
            "lost_during_hold": dict(self.lost), "held_at_end": held, "ramp_s": ramp_s,
            "connect_histogram": self.connect_us.encode(), "first_ping_histogram": self.first_ping_us.encode(),
            "keepalive_histogram": self.keepalive_us.encode(),
            "keepalive": {"sent": self.counts["keepalive_sent"], "answered": self.counts["keepalive_answered"]},
            "cpu_s": cpu_s, "cpu_wall_s": wall_s,
        }


def hold_worker(spec: WorkerSpec, channel) -> None:
    """One process of a hold run: ready, ramp on the common start, report, hold until told, result."""
    channel.ready({"opened": 0})
    start = channel.wait_go()
    if start is None:
        return
    holder = Holder(spec, channel)
    cpu0 = time.thread_time()
    holder.ramp(start)
    ramp_s = (time.perf_counter_ns() - start) / NS
    channel.send("ramped", {"connected": holder.counts["connected"], "ramp_s": ramp_s})
    holder.hold(time.perf_counter_ns() + int((spec.params.duration + HOLD_GRACE_S) * NS))
    wall = (time.perf_counter_ns() - start) / NS
    channel.result(holder.result(time.thread_time() - cpu0, wall, ramp_s))


# -- the parent -------------------------------------------------------------------------------
def run_hold(params: LoadParams) -> dict:
    preflight(params)
    watch = MachineWatch()
    specs = plan(params, params.conns)
    fleet = Fleet(hold_worker, specs)
    try:
        fleet.wait_ready()
        fleet.start_all()
        wait_ramped(params, fleet)
        held_from = time.monotonic()
        probe = run_probe(params) if params.probe_conns else sleep_through(params, fleet)
        duration = time.monotonic() - held_from
        fleet.stop.set()
        parts = fleet.results_within(HOLD_GRACE_S)
    finally:
        fleet.close()
    return assemble_hold(params, specs, parts, probe, duration, watch)


def wait_ramped(params: LoadParams, fleet: Fleet) -> None:
    """Until every process has ramped (bounded by the planned ramp plus the timeouts)."""
    ramp_s = params.conns / params.connect_rate
    progress = Progress(params.progress, ramp_s, unit="conn/s")
    t0 = time.monotonic()
    try:
        fleet.wait_for("ramped", ramp_s + 2 * params.connect_timeout + 30.0,
                       lambda n: progress.update(time.monotonic() - t0, n))
    finally:
        progress.close()


def sleep_through(params: LoadParams, fleet: Fleet) -> None:
    """No probe: wait out the hold, showing how many connections are still held."""
    progress = Progress(params.progress, params.duration, unit="held")
    end = time.monotonic() + params.duration
    try:
        while time.monotonic() < end and not stop_requested():
            time.sleep(min(0.25, max(end - time.monotonic(), 0)))
            progress.update(params.duration - (end - time.monotonic()), sum(fleet.counters))
    finally:
        progress.close()
    return None


def run_probe(params: LoadParams) -> dict:
    """A closed loop through --probe-conns extra connections, in this process, for the hold's duration."""
    probe = params.replace(mode="closed", conns=params.probe_conns, warmup=0.0, procs=1)
    cpus = params.cpu_list
    spec = WorkerSpec(index=0, params=probe, conns=params.probe_conns, cpu=cpus[-1] if cpus else None)
    progress = Progress(params.progress, params.duration)
    t0 = time.monotonic()
    try:
        (part,) = run_local(traffic_worker, spec, lambda infos: check_ready(probe, infos),
                            lambda n: progress.update(time.monotonic() - t0, n))
    finally:
        progress.close()
    return part


def assemble_hold(params: LoadParams, specs: list[WorkerSpec], parts: list[dict], probe: dict | None,
                  duration: float, watch: MachineWatch) -> dict:
    """Merge the processes' holds (and the probe) into the result dict."""
    failures, lost = Counter(), Counter()
    for p in parts:
        failures.update(p["failure_reasons"])
        lost.update(p["lost_during_hold"])
    connect = histo.merge([p["connect_histogram"] for p in parts])
    pings = histo.merge([p["first_ping_histogram"] for p in parts] + [p["keepalive_histogram"] for p in parts])
    latency = histo.decode(probe["histogram"]) if probe else pings
    errors = failures + lost
    if probe:
        errors.update(probe["errors"])
        errors.update(probe.get("connect_errors", {}))
    requests = latency.get_total_count()
    measured = probe["duration_s"] if probe else duration
    connected = sum(p["connected"] for p in parts)
    hold = {
        "requested": params.conns, "attempted": sum(p["attempted"] for p in parts), "connected": connected,
        "failed": sum(failures.values()), "failure_reasons": dict(failures), "lost_during_hold": dict(lost),
        "held_at_end": sum(p["held_at_end"] for p in parts), "connect_rate": params.connect_rate,
        "ramp_s": round(max(p["ramp_s"] for p in parts), 3), "held_s": round(duration, 3),
        "connect_us": histo.summary(connect), "connect_histogram": histo.encode(connect),
        "first_ping_us": histo.summary(histo.merge([p["first_ping_histogram"] for p in parts])),
        "keepalive": {"every_s": params.keepalive, "sent": sum(p["keepalive"]["sent"] for p in parts),
                      "answered": sum(p["keepalive"]["answered"] for p in parts)},
        "processes": len(parts), "source_addrs": specs[0].sources,
        "probe": None if not probe else {"conns": params.probe_conns, "requests": probe["requests"],
                                         "throughput_rps": round(probe["requests"] / probe["duration_s"], 1),
                                         "served": probe["connections"]["served"],
                                         "unanswered": probe["unanswered"],
                                         "max_unanswered_wait_us": probe["max_unanswered_wait_us"]},
    }
    cpu_parts = parts + ([probe] if probe else [])
    return {
        "params": params.as_dict(), "started_at": watch.started_at,
        "requests": requests, "errors": dict(errors), "duration_s": round(measured, 4),
        "throughput_rps": round(requests / measured, 1) if measured else 0.0,
        "latency_us": histo.summary(latency), "latency_source": "probe" if probe else "ping",
        "histogram": histo.encode(latency), "hold": hold, "loadgen_procs": len(cpu_parts),
        **cpu_check(cpu_parts, cpus_usable(params, len(cpu_parts))),
        "machine": watch.finish(),
    }
