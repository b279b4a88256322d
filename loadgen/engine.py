"""Closed- and open-loop load from one process: one thread, one ``select.epoll`` loop.

Why this shape: on loopback a request costs the *kernel* several microseconds
(send + recv + the TCP stack of both ends); a thread pool or an asyncio
stack would add tens more in Python. One non-blocking epoll loop with a
short hot path keeps the load generator's own Python cost per request to a few
microseconds, so it saturates after the servers it measures (docs/loadgen.md
and docs/performance.md give the measurements).

The hot path, per readable connection: ``recv``; if the bytes are exactly
one expected reply (the common case: the reply to ECHO and WORK is
byte-identical to the request, built by the lab's codec) take a timestamp,
append the latency to an array and send the next request. Anything else -- a
partial or coalesced read, an ERROR frame, EOF -- goes to the slow path,
which decodes with the codec's ``FrameDecoder``. Latencies are folded into
the HDR histogram once per tick (``histo.Recorder``).

``traffic_worker`` is the worker function (see ``fleet``) of a closed- or
open-loop run: one process connects its share, says ready, waits for the
common start, runs a ``Worker`` and hands in its result.

Closed loop: every connection keeps ``pipeline`` requests in flight and sends
the next one when a reply arrives; latency is reply time minus send time.

Open loop (wrk2's coordinated-omission correction): request k of the run is
*scheduled* at ``start + k/rate`` on connection ``k mod conns``. A connection
sends a scheduled request as soon as it is due and it has fewer than
``pipeline`` in flight; latency is reply time minus *scheduled* time, so when
the server stalls, every request that should have gone out meanwhile carries
the stall. Sends more than ``OPEN_LATE_US`` behind schedule are counted
(``late``), and requests never sent by the end are ``unsent``; every send's
lateness (actual minus scheduled time) is recorded too (``send_lateness_histogram``).
The accounting is of the window's requests, those *scheduled* inside it
(``offered``): a reply to a request scheduled in the warm-up but answered in
the window is not served, so served <= sent <= offered = sent + unsent.

The open loop's cost per request is kept close to the closed loop's, so that it
keeps its schedule up to about the rate the closed loop reaches. What costs, on
loopback, is less the request than the wake-ups: a sleeping thread woken (ours
by a timer or a reply, the server's by our send) costs more CPU than a ``send``
to a peer that is awake, and a sleep ends tens of µs after the time asked. So
the loop wakes on a timer, not for each reply, and each wake-up does one pass:
it takes every reply that came (one ``epoll_wait(0)``, one read per connection,
which holds all its replies), sends every slot that is due (the schedule is
arithmetic: a slot counter, slot k at first + k*step; a connection's due
requests in one ``send``), then sleeps until the next slot but not sooner than
``quantum`` after this wake-up began. The quantum starts at OPEN_QUANTUM_NS and
follows the loop's own CPU share, tick by tick (``next_quantum``): at high rates
the cycle grows, so each wake-up carries a larger batch and the wake-ups stay
fewer than the requests. A sleep asks to end early by how late the recent
sleeps ended and finishes on the clock (``_sleep``), with the thread's timer
slack lowered to 1 µs for the run. Only while a due request waits for a reply
(its connection's pipeline is full) does a reply wake the loop. A reply that
waited in its socket is timed by when it came, not when it was read: the kernel
stamps each read (``SO_TIMESTAMPNS``, ``arrival``, converted at each wake-up by
``clock_offset``). Each send's lateness is the clock read just before that send
(one reading per ``send``, not one per wake-up), so the batching shows in
``send_lateness_histogram``, never hidden. Latencies are folded into the
histograms every tick (``histo.Recorder.fold``, one numpy pass), so the loop has
no pause of its own, and the garbage collector is off during the run.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import select
import socket
import struct
import time
from collections import Counter, deque

from conclab.servers.protocol import ERROR, FrameDecoder, ProtocolError

from . import conn as connmod
from .fleet import WorkerSpec
from .histo import Recorder
from .params import LoadParams

RECV_MIN, RECV_MAX = 4_096, 65_536   # one read's buffer: room for a pipeline of replies, never over 64 KiB (an mmap)
TICK_S = 0.1              # publish progress and look at the clock this often
OPEN_LATE_US = 1_000      # an open-loop send this far behind its schedule was not on time
OPEN_QUANTUM_NS = 50_000        # the open loop's shortest cycle (wake-up to wake-up): what falls due meanwhile goes together
OPEN_QUANTUM_MAX_NS = 400_000   # ... and its longest, whatever its CPU share: a send at most this late for it (< OPEN_LATE_US)
OPEN_CPU_HIGH, OPEN_CPU_LOW = 0.85, 0.72   # own CPU share over a tick above which the cycle grows, below which it shrinks
OPEN_EARLY_NS = 30_000          # first guess of how much later than asked a sleep ends (learnt as the run goes)
OPEN_EARLY_MAX_NS = 40_000      # a sleep never asks to end earlier than this before its time (a preemption is no lesson)
OPEN_SPIN_NS = 50_000           # a sleep that ended before the next slot finishes on the clock for at most this long
OPEN_TIMER_SLACK_NS = 1_000   # the kernel's default slack (50 µs) would make every short sleep ~50 µs longer
OPEN_DRAIN_S = 2.0        # after an open-loop run, how long in-flight requests may still answer
EPOLLIN = select.EPOLLIN  # the epoll flags, NS and TICK_S are hold.py's too (imported from here)
EPOLLOUT = select.EPOLLOUT
NS = 1_000_000_000        # nanoseconds per second (perf_counter_ns)
NEVER = 1 << 62           # a time (ns) that never comes


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)   # Linux: stamp each read with the time its data came
ANCILLARY_SIZE = socket.CMSG_SPACE(16)                      # room for one struct timespec
_timespec = struct.Struct("@qq").unpack
OFFSET_PAIR_NS = 2_000                                      # clock_offset's readings are this close, or read again

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_TIMERSLACK, PR_GET_TIMERSLACK = 29, 30       # prctl(2)


@contextlib.contextmanager
def timer_slack(ns: int):
    """Run with this thread's timer slack at ``ns`` (how much later than asked the kernel may end a sleep)."""
    before = _libc.prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0)
    _libc.prctl(PR_SET_TIMERSLACK, ns, 0, 0, 0)
    try:
        yield
    finally:
        _libc.prctl(PR_SET_TIMERSLACK, max(before, 0), 0, 0, 0)   # 0: back to the default


def stamp_replies(conns) -> None:
    """Ask the kernel to stamp every read of these connections with its data's arrival time (SO_TIMESTAMPNS)."""
    for c in conns:
        with contextlib.suppress(OSError):
            c.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


def clock_offset(mono=time.perf_counter_ns, real=time.time_ns) -> int:
    """CLOCK_REALTIME (the kernel's receive stamps) minus perf_counter_ns, now: the realtime reading is
    paired with the middle of two perf_counter readings close together (not split by a preemption)."""
    while True:
        before = mono()
        realtime = real()
        after = mono()
        if after - before < OFFSET_PAIR_NS:
            return realtime - (before + after) // 2


def arrival(ancillary: list, offset: int) -> int:
    """When a read's data came (perf_counter_ns): the kernel's stamp of the read (its ``ancillary`` data),
    on CLOCK_REALTIME, ``offset`` (``clock_offset``, at every wake-up) ahead of perf_counter_ns.

    The stamp is that of the last segment read: replies coalesced into one read (a pipeline) all get
    the last one's time, an overstatement of the earlier ones' latency by at most their spacing.
    """
    seconds, nanoseconds = _timespec(ancillary[0][2])
    return seconds * NS + nanoseconds - offset


def first_slot_at(first: float, step: float, t: int) -> int:
    """The first slot k >= 0 whose time, int(first + k*step) (as the loop computes it), is at or after ``t``.

    The division lands on the right k but for rounding: when t is a slot's exact time (a whole
    number of requests in the warm-up, say), the neighbours are checked with that same expression.
    """
    k = max(0, math.ceil((t - first) / step))
    while k > 0 and int(first + (k - 1) * step) >= t:
        k -= 1
    while int(first + k * step) < t:
        k += 1
    return k


def slots_between(first: float, step: float, start: int, stop: int, every: int = 1, from_slot: int = 0) -> int:
    """How many slots k >= from_slot with k = from_slot (mod every) have their time in [start, stop)."""
    if step <= 0:
        return 0
    lo, hi = max(from_slot, first_slot_at(first, step, start)), first_slot_at(first, step, stop)
    lo += (from_slot - lo) % every                         # the first k of from_slot's residue
    return max(0, -(-(hi - lo) // every))


def next_quantum(quantum: int, cpu_share: float) -> int:
    """The open loop's shortest cycle for the next tick, from its CPU share (0..1) in the last one.

    Each wake-up costs the loop about as much as a couple of requests, whether it sends one or fifty.
    Short cycles send closest to the schedule; when the loop's own CPU share climbs above OPEN_CPU_HIGH (a
    high rate), the cycle grows by half, so the wake-ups grow fewer while the requests grow more and the
    share stays clear of the self-check's limit; it shrinks back when the share falls below OPEN_CPU_LOW.
    Within OPEN_QUANTUM_NS .. OPEN_QUANTUM_MAX_NS. What that costs in punctuality is measured, send by send.
    """
    if cpu_share > OPEN_CPU_HIGH:
        return min(quantum * 3 // 2, OPEN_QUANTUM_MAX_NS)
    if cpu_share < OPEN_CPU_LOW:
        return max(quantum * 7 // 8, OPEN_QUANTUM_NS)
    return quantum


class Conn:
    """One client connection's state; ``sent`` holds send (closed) or scheduled (open) times, ns."""

    __slots__ = (
        "actual",
        "clean",
        "decoder",
        "fd",
        "got",
        "next_at",
        "next_slot",
        "out",
        "raw_got",
        "recv",
        "recvmsg",
        "send",
        "sent",
        "sock",
    )

    def __init__(self, sock, max_frame: int) -> None:
        self.sock, self.fd = sock, sock.fileno()
        self.recv, self.recvmsg, self.send = sock.recv, sock.recvmsg, sock.send
        self.sent: deque[int] = deque()
        self.actual: deque[int] = deque()    # open loop: the real send times (uncorrected latency)
        self.decoder = FrameDecoder(max_frame)
        self.raw_got = 0                     # raw protocol: bytes of the current reply already here
        self.clean = True                    # nothing partial buffered: a read equal to one reply is one reply
        self.out = b""                       # bytes the kernel has not taken yet
        self.next_at = 0                     # open loop: scheduled time of this connection's next request
        self.next_slot = 0                   # open loop: its slot k in the schedule (due at first + k*step)
        self.got = 0                         # replies counted in the measured window (0: never served)


def open_connections(params: LoadParams, count: int, sources: list[str] | None) -> tuple[list, Counter]:
    """Connect ``count`` sockets to the target; return (sockets, failures by kind)."""
    family, address = connmod.resolve(params.target)
    socks, errors = [], Counter()
    for i in range(count):
        source = sources[i % len(sources)] if sources else None
        try:
            socks.append(connmod.connect(family, address, params.connect_timeout, source))
        except OSError as exc:
            errors[connmod.reason_of(exc)] += 1
    return socks, errors


def traffic_worker(spec: WorkerSpec, channel) -> None:
    """One process's closed- or open-loop share (runs here or in a spawned process)."""
    socks, errors = open_connections(spec.params, spec.conns, spec.sources)
    channel.ready({"opened": len(socks), "connect_errors": dict(errors)})
    start = channel.wait_go()
    if start is None:
        for sock in socks:
            sock.close()
        return
    worker = Worker(spec.params, socks, spec.rate, channel.progress, spec.phase, channel.stopped)
    result = worker.run(start)
    result["connect_errors"] = dict(errors)
    channel.result(result)


class Worker:
    """Drives a set of connected sockets in closed or open loop and returns the partial result."""

    def __init__(self, params: LoadParams, socks: list, rate: float | None = None,
                 progress=None, phase: float = 0.0, stopped=None) -> None:
        self.params = params
        self.open = params.mode == "open"
        self.depth = params.pipeline
        self.request, self.reply = params.request_and_reply()
        self.batches = [self.request * k for k in range(self.depth + 1)]
        self.recv_size = min(max(RECV_MIN, 2 * len(self.reply) * self.depth), RECV_MAX)
        self.raw = params.protocol == "raw"
        max_frame = max(len(self.reply), 1 << 20)
        self.reply_op: int | None = None     # framed protocols: the expected reply, decoded (for the slow path)
        self.reply_payload: bytes | None = None
        if not self.raw:
            ((self.reply_op, self.reply_payload),) = FrameDecoder(max_frame).feed(self.reply)
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.order: list[Conn] = []
        for sock in socks:
            c = Conn(sock, max_frame)
            self.conns[c.fd] = c
            self.order.append(c)
            self.ep.register(c.fd, EPOLLIN)
        self.rate = rate
        self.phase = phase                   # open loop: fraction of a slot this process's schedule is shifted
        self.progress = progress or (lambda count: None)
        self.stopped = stopped or (lambda: False)      # asked to end early (Ctrl-C): wind down, still report
        self.latency = Recorder()
        self.uncorrected = Recorder()
        self.lateness = Recorder()           # open loop: actual minus scheduled send time of every request, µs
        self.errors: Counter = Counter()
        self.counts = Counter()              # unsent (open loop), unanswered, lost connections (sent, late: lateness)
        self.max_wait_ns = 0                 # at the end, the age of the oldest request still outstanding
        self.warm = False
        self.ticks = 0
        # the clock (perf_counter_ns), set by run(), _begin_measuring and the loops
        self.warm_ns = 0                     # end of the warm-up
        self.stop_ns = 0                     # end of the run (open loop: of the schedule); earlier when stopped
        self.end_ns = NEVER                  # end of the measured window, set when the loop ends
        self.cpu0, self.wall0 = 0.0, 0       # thread CPU time and wall clock when measuring began
        # open loop: the schedule (set by _schedule)
        self.step = self.interval = 0.0      # ns between two requests of this process / of one connection
        self.first = 0.0                     # when this process's request 0 is due
        self.slot, self.slot_at = 0, NEVER   # the next slot of the schedule, and when it is due
        self.waiting: set[Conn] = set()      # connections with a request due but their pipeline full
        self.ep_list = [self.ep.fileno()]    # for select(): a sub-millisecond wait on the epoll fd
        self.quantum = OPEN_QUANTUM_NS       # the shortest cycle now (``next_quantum``, once per tick)
        self.early = OPEN_EARLY_NS           # how much later than asked a sleep ends, on average lately
        self.cpu_mark = (0.0, 0)             # thread CPU time and wall clock at the last tick (``_adapt``)

    # -- the run -------------------------------------------------------------------------------
    def run(self, start_ns: int | None = None) -> dict:
        """Run from ``start_ns`` (perf_counter_ns; default now) for warmup + duration; return the result."""
        start = start_ns or time.perf_counter_ns()
        while time.perf_counter_ns() < start:
            time.sleep(min((start - time.perf_counter_ns()) / NS, TICK_S))
        self.warm_ns = start + int(self.params.warmup * NS)
        self.stop_ns = self.warm_ns + int(self.params.duration * NS)
        self._begin_measuring(start, force=self.params.warmup == 0)
        collecting = gc.isenabled()
        gc.disable()                         # the loop makes no cycles; spare it the collector's pauses
        try:
            if self.open:
                with timer_slack(OPEN_TIMER_SLACK_NS):
                    self._open_loop(start)
            else:
                self._closed_loop()
        finally:
            end_cpu, end_ns = time.thread_time(), time.perf_counter_ns()
            if collecting:
                gc.enable()
            self.close()
        return self._result(end_cpu, end_ns)

    def _begin_measuring(self, now: int, force: bool = False) -> None:
        """At the end of the warm-up: forget what was recorded, start the CPU and wall clocks.

        The open loop records only the window's requests (scheduled from ``warm_ns`` on), so it has no
        latency to forget; resetting here, at the first tick of the window, would drop what the window's
        first microseconds sent or answered.
        """
        if self.warm or not (force or now >= self.warm_ns):
            return
        self.warm = True
        if not self.open:
            self.latency.reset()
            self.uncorrected.reset()
        self.errors.clear()
        self.counts.clear()
        for c in self.order:
            c.got = 0
        self.cpu0, self.wall0 = time.thread_time(), now

    def _tick(self, now: int) -> bool:
        """Once per TICK_S: fold latencies, adapt the open loop's cycle, publish progress; True when the run is over."""
        self.ticks += 1
        self.latency.fold()
        self.uncorrected.fold()
        self.lateness.fold()
        if self.open:
            self._adapt(now)
        self._begin_measuring(now)
        self.progress(self.latency.count if self.warm else 0)
        if self.stopped() and now < self.stop_ns:
            self.stop_ns = now                         # the schedule ends here: nothing after it is "unsent"
        return now >= self.stop_ns or not self.conns

    # -- closed loop ---------------------------------------------------------------------------
    def _closed_loop(self) -> None:
        now = time.perf_counter_ns
        for c in list(self.order):
            c.sent.extend([now()] * self.depth)
            self._send(c, self.batches[self.depth])
        poll, get, lat = self.ep.poll, self.conns.get, self.latency.values.append
        reply, request, size, recv_size, epollin = self.reply, self.request, len(self.request), self.recv_size, EPOLLIN
        t = now()
        next_tick = self._next_tick(t)
        while True:
            events = poll(max(next_tick - t, 0) / NS)
            if events and now() >= self.stop_ns:       # woke after the window: what came is not the window's
                events = ()        # (another process may have ended already and freed the server meanwhile)
            for fd, ev in events:
                c = get(fd)
                if c is None:
                    continue
                if ev != epollin:
                    self._event(c, ev)
                    continue
                try:
                    data = c.recv(recv_size)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._lose(c, connmod.reason_of(exc))
                    continue
                t = now()
                if data == reply and c.clean and not c.out:        # the hot path: exactly one reply
                    sent = c.sent
                    lat((t - sent.popleft()) // 1000)
                    c.got += 1
                    sent.append(t)
                    try:
                        done = c.send(request)
                    except OSError as exc:
                        self._send_failed(c, request, exc)
                        continue
                    if done != size:
                        self._partial(c, request, done)
                else:
                    self._data(c, data, t)
            t = now()
            if t >= next_tick:
                if self._tick(t):
                    self.end_ns = t
                    self._outstanding(t, all_in_flight=False)
                    return
                next_tick = self._next_tick(t)

    def _next_tick(self, t: int) -> int:
        """The next tick: TICK_S from now, but never past the end of the warm-up or of the run."""
        boundary = self.stop_ns if self.warm else self.warm_ns
        return min(t + int(TICK_S * NS), boundary)

    # -- open loop -----------------------------------------------------------------------------
    def _open_loop(self, start: int) -> None:
        """Wake up, take every reply that came, send every request that is due, sleep until the next one.

        The sleep is a timer, not a wait on the sockets (but see ``_sleep``): a reply does not wake the
        loop (a wake-up costs more than the request), it waits in its socket until the next wake-up, and
        its arrival time is the kernel's receive timestamp (``arrival``), not the time the loop got to it.
        Two wake-ups are at least ``quantum`` apart (``next_quantum``).
        """
        self._schedule(start)
        stamp_replies(self.order)
        now, sleep, poll = time.perf_counter_ns, self._sleep, self.ep.poll
        get, reply, recv_size, epollin = self.conns.get, self.reply, self.recv_size, EPOLLIN
        timespec, stamp_size, ns = _timespec, ANCILLARY_SIZE, NS
        lat, unc, warm, send_due = self.latency.values.append, self.uncorrected.values.append, self.warm_ns, self._send_due
        woke = now()
        next_tick = self._next_tick(woke)
        self.cpu_mark = (time.thread_time(), woke)
        while True:
            offset = clock_offset()                               # CLOCK_REALTIME (the kernel's stamps) - ours
            for fd, ev in poll(0):
                c = get(fd)
                if c is None:
                    continue
                if ev != epollin:
                    self._event(c, ev)
                    continue
                try:
                    data, ancillary, _, _ = c.recvmsg(recv_size, stamp_size)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._lose(c, connmod.reason_of(exc))
                    continue
                if ancillary:                                         # arrival(), inline; no stamp: now
                    seconds, nanoseconds = timespec(ancillary[0][2])
                    came = seconds * ns + nanoseconds - offset
                else:
                    came = now()
                if data == reply and c.clean:                         # the hot path: exactly one reply
                    scheduled, actual = c.sent.popleft(), c.actual.popleft()
                    if scheduled >= warm:                             # served: scheduled inside the window
                        lat((came - scheduled) // 1000)
                        unc((came - actual) // 1000)
                    c.got += 1
                    if c.next_at <= woke:                             # its next request waited for this reply
                        send_due(c, now())
                else:
                    self._data(c, data, came)
            t = now()
            if self.slot_at <= t:
                t = self._send_slots(t, now)
            if t >= next_tick:
                if self._tick(t):
                    break
                next_tick = self._next_tick(t)
            cycle_end = woke + self.quantum
            woke = sleep(min(max(self.slot_at, cycle_end), next_tick), t, cycle_end)
        self.end_ns = self.stop_ns
        self._open_drain()

    def _sleep(self, until: int, t: int, not_before: int = 0) -> int:
        """Until ``until`` (ns, ``t`` is now); return the time it woke.

        A sleep on this kind of machine ends tens of µs later than asked, however short, and costs about
        as much CPU as a couple of requests: so it asks to end ``early`` before its time (``_nap``), and if
        it woke before the next slot is due it finishes on the clock (at most OPEN_SPIN_NS). A wait
        shorter than ``early`` is all on the clock.

        While a due request waits for a reply (its connection's pipeline is full: the server is behind,
        or the loop is), the rest of the wait after ``not_before`` (the end of the cycle) is a ``select``
        on the epoll fd instead, so that reply wakes the loop and the request goes out at once -- but
        not before the cycle ends: a loop that is behind still wakes once per cycle, not once per reply.
        """
        now = time.perf_counter_ns
        entered = now()
        deadline = entered + until - t                      # on this clock (``t`` may be another's, in tests)
        if self.waiting:
            conns, stop = self.conns, self.stop_ns
            self.waiting = {c for c in self.waiting if c.next_at <= t and c.next_at < stop and c.fd in conns}
        if self.waiting:
            cycle_end = min(entered + not_before - t, deadline)
            woke = self._nap(cycle_end, entered) if cycle_end > entered else entered
            if deadline > woke:
                select.select(self.ep_list, (), (), (deadline - woke) / NS)
            return now()
        woke = self._nap(deadline, entered)
        due = min(deadline, entered + self.slot_at - t)     # the next slot (or the tick): nothing to do before
        if due - woke <= OPEN_SPIN_NS:
            while woke < due:
                woke = now()
        return woke

    def _nap(self, deadline: int, now: int) -> int:
        """A timer sleep meant to end at ``deadline``: it asks to end ``early`` (how much later than asked the
        recent sleeps ended, learnt here); none if that leaves nothing to ask. Returns when it woke."""
        ask = deadline - now - self.early
        if ask <= 0:
            return now
        time.sleep(ask / NS)
        woke = time.perf_counter_ns()
        self.early += (min(woke - now - ask, OPEN_EARLY_MAX_NS) - self.early) // 8
        return woke

    def _adapt(self, now: int) -> None:
        """Once per tick: the next tick's shortest cycle, from this one's CPU share (``next_quantum``)."""
        cpu, wall = time.thread_time(), now
        cpu0, wall0 = self.cpu_mark
        self.cpu_mark = (cpu, wall)
        if wall > wall0:
            self.quantum = next_quantum(self.quantum, (cpu - cpu0) * NS / (wall - wall0))

    def _schedule(self, start: int) -> None:
        """Request k of this process is due at first + k*step, on connection k mod n."""
        n = len(self.order)
        self.step = NS / self.rate                               # between two requests of this process, ns
        self.interval = self.step * n                            # between two requests of one connection
        self.first = start + self.phase * self.step
        for i, c in enumerate(self.order):
            c.next_slot, c.next_at = i, int(self.first + i * self.step)
        self.slot, self.slot_at = 0, int(self.first)

    def _send_slots(self, t: int, clock=None) -> int:
        """Every slot that has come by ``t``: its connection sends what is due, as far as its pipeline allows.

        One slot per request, so this is the open loop's hot path: locals only. The common case -- the
        slot's connection has room and this is its only request due -- is sent here; a connection with a
        full pipeline waits (``waiting``); the rest (more than one due, bytes the kernel has not taken yet)
        goes through ``_send_due``.
        A connection whose due requests already went out costs a comparison. With a ``clock``, the time
        is read again after each send, so each send's lateness is that of its own moment and slots that
        fall due meanwhile go out too. Returns the last time read.
        """
        order, conns, send_due, waiting = self.order, self.conns, self._send_due, self.waiting
        if not order:                                            # this process opened no connection
            self.slot_at = NEVER
            return t
        n, first, step, stop, warm = len(order), self.first, self.step, self.stop_ns, self.warm_ns
        depth, request, size, lateness = self.depth, self.request, len(self.request), self.lateness.values.append
        slot, slot_at = self.slot, self.slot_at
        while slot_at <= t:
            if slot_at >= stop:
                slot_at = NEVER                                  # the schedule is over
                break
            c = order[slot % n]
            slot += 1
            slot_at = int(first + slot * step)
            at = c.next_at
            if at > t or at >= stop or c.fd not in conns:
                continue
            if len(c.sent) >= depth:
                waiting.add(c)                                   # due, but its pipeline is full
                continue
            following = int(first + (c.next_slot + n) * step)  # from the slot, not the last time: no drift
            if following > t and not c.out:
                c.sent.append(at)                                # _send_due's loop, once, inline
                c.actual.append(t)
                if at >= warm:                                   # a request of the window (offered)
                    lateness((t - at + 999) // 1000)
                c.next_slot += n
                c.next_at = following
                try:
                    done = c.send(request)
                except OSError as exc:
                    self._send_failed(c, request, exc)
                    continue
                if done != size:
                    self._partial(c, request, done)
            else:
                send_due(c, t)                                   # more than one due, or bytes still queued
            if clock:
                t = clock()
        self.slot, self.slot_at = slot, slot_at
        return t

    def _open_drain(self) -> None:
        """After the schedule ends, let in-flight requests answer (bounded), then count what is left."""
        end = time.perf_counter_ns() + int(OPEN_DRAIN_S * NS)
        while any(c.sent for c in self.conns.values()) and time.perf_counter_ns() < end:
            for fd, ev in self.ep.poll(TICK_S):
                c = self.conns.get(fd)
                if c is not None:
                    self._event(c, ev)
        self.latency.fold()
        self.uncorrected.fold()
        self._outstanding(time.perf_counter_ns(), all_in_flight=True)
        self.counts["unsent"] += sum(self._unsent(c) for c in self.order)

    def _outstanding(self, now: int, all_in_flight: bool) -> None:
        """At the end: count the unanswered requests and the age of the oldest one still outstanding.

        Open loop (after the drain, ``all_in_flight``): every request still in flight is unanswered.
        Closed loop (at the end of the window): a connection always has its pipeline in flight, so only
        the requests of connections that got no reply at all in the window are unanswered (typically the
        one request a starved connection sent and is still waiting for). Requests lost with their
        connection are not here (connections.lost_in_flight). The oldest request still outstanding (any
        connection) has waited at least ``max_wait_ns``: a lower bound on a latency the histogram lacks.
        """
        live = [c for c in self.conns.values() if c.sent]
        if all_in_flight:
            self.counts["unanswered"] += sum(len(c.sent) for c in live)
        else:
            self.counts["unanswered"] += sum(len(c.sent) for c in live if not c.got)
        if live:
            self.max_wait_ns = max(self.max_wait_ns, now - min(min(c.sent) for c in live))

    def _unsent(self, c: Conn) -> int:
        """Requests of this connection scheduled inside the window that never went out."""
        return slots_between(self.first, self.step, self.warm_ns, self.stop_ns, len(self.order), c.next_slot)

    def _send_due(self, c: Conn, t: int) -> int:
        """Send every request of ``c`` that is due at ``t``, as far as the pipeline allows (one ``send`` for all);
        return how many.

        Each request sent records its lateness (whole µs, rounded up): that record is also the count of
        requests sent and, above OPEN_LATE_US, of late ones (``_open_counts``), so nothing else is counted here.
        """
        at, slot, stop, lateness = c.next_at, c.next_slot, self.stop_ns, self.lateness.values.append
        sent, actual, warm, first, step, n = c.sent, c.actual, self.warm_ns, self.first, self.step, len(self.order)
        free = self.depth - len(sent)
        k = 0
        while k < free and at <= t and at < stop:
            sent.append(at)
            actual.append(t)
            if at >= warm:                                       # a request of the window (offered)
                lateness((t - at + 999) // 1000)
            slot += n                                            # from the slot, not the last time: no drift
            at = int(first + slot * step)
            k += 1
        if k:
            c.next_at, c.next_slot = at, slot
            data = self.batches[k]
            if c.out:                                            # _send, inline (once per request)
                c.out += data
                return k
            try:
                done = c.send(data)
            except OSError as exc:
                self._send_failed(c, data, exc)
                return k
            if done != len(data):
                self._partial(c, data, done)
        return k

    # -- the slow path -------------------------------------------------------------------------
    def _readable(self, c: Conn) -> None:
        try:
            data, t = self._receive(c)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lose(c, connmod.reason_of(exc))
            return
        self._data(c, data, t)

    def _receive(self, c: Conn) -> tuple[bytes, int]:
        """One read and when its data came: now (closed loop), the kernel's stamp (open loop, ``arrival``)."""
        if not self.open:
            data = c.recv(self.recv_size)
            return data, time.perf_counter_ns()
        offset = clock_offset()
        data, ancillary, _, _ = c.recvmsg(self.recv_size, ANCILLARY_SIZE)
        return data, arrival(ancillary, offset) if ancillary else time.perf_counter_ns()   # no stamp: now

    def _event(self, c: Conn, ev: int) -> None:
        """Anything but a plain EPOLLIN: writable again, hang-up, error."""
        if ev & EPOLLOUT:
            self._flush(c)
        if ev & ~EPOLLOUT and c.fd in self.conns:
            self._readable(c)

    def _data(self, c: Conn, data: bytes, t: int) -> None:
        """Anything but exactly one clean reply: EOF, partial, coalesced, ERROR, raw bytes."""
        if not data:
            self._lose(c, "closed")
            return
        answered = self._raw_replies(c, data) if self.raw else self._frames(c, data)
        if answered is None:
            return
        lat, unc = self.latency.values.append, self.uncorrected.values.append
        c.got += answered
        for _ in range(answered):
            sent = c.sent.popleft()
            if not self.open:
                lat((t - sent) // 1000)
                continue
            actual = c.actual.popleft()
            if sent >= self.warm_ns:                              # served: scheduled inside the window
                lat((t - sent) // 1000)
                unc((t - actual) // 1000)
        if self.open:
            self._send_due(c, time.perf_counter_ns())            # t is when the data came, not now
        elif answered:
            c.sent.extend([t] * answered)
            self._send(c, self.batches[answered] if answered <= self.depth else self.request * answered)

    def _raw_replies(self, c: Conn, data: bytes) -> int | None:
        got, size = c.raw_got + len(data), len(self.reply)
        answered, c.raw_got = divmod(got, size)
        c.clean = c.raw_got == 0
        if answered > len(c.sent):
            self._lose(c, "protocol")
            return None
        return answered

    def _frames(self, c: Conn, data: bytes) -> int | None:
        """Decode with the codec; count good replies, settle ERROR replies; None if the connection died."""
        try:
            frames = c.decoder.feed(data)
        except ProtocolError:
            self._lose(c, "protocol")
            return None
        c.clean = not c.decoder.mid_frame
        good = 0
        for op, payload in frames:
            if len(c.sent) <= good:
                self._lose(c, "protocol")                      # a reply to nothing we asked
                return None
            if op == self.reply_op and payload == self.reply_payload:
                good += 1
                continue
            reason = connmod.server_reason(payload) if op == ERROR else "protocol"
            if reason != "rate_limited":
                self._lose(c, reason)                          # the server closes after ERROR
                return None
            self.errors[reason] += 1                           # rejected but still open: next request
            self._settle_failed(c, good)
        return good

    def _settle_failed(self, c: Conn, good: int) -> None:
        """Drop the request answered with an ERROR that keeps the connection (it sits after ``good``)."""
        c.sent.rotate(-good)
        c.sent.popleft()
        c.sent.rotate(good)
        if self.open:
            c.actual.rotate(-good)
            c.actual.popleft()
            c.actual.rotate(good)
        else:
            c.sent.append(time.perf_counter_ns())
            self._send(c, self.request)

    # -- sending -------------------------------------------------------------------------------
    def _send(self, c: Conn, data: bytes) -> None:
        if c.out:
            c.out += data
            return
        try:
            sent = c.send(data)
        except OSError as exc:
            self._send_failed(c, data, exc)
            return
        if sent != len(data):
            self._partial(c, data, sent)

    def _send_failed(self, c: Conn, data: bytes, exc: OSError) -> None:
        if isinstance(exc, BlockingIOError):
            self._partial(c, data, 0)
        else:
            self._lose(c, connmod.reason_of(exc))

    def _partial(self, c: Conn, data: bytes, sent: int) -> None:
        """The kernel took only part: keep the rest and wait for EPOLLOUT."""
        c.out = data[sent:]
        self.ep.modify(c.fd, EPOLLIN | EPOLLOUT)

    def _flush(self, c: Conn) -> None:
        try:
            sent = c.send(c.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lose(c, connmod.reason_of(exc))
            return
        c.out = c.out[sent:]
        if not c.out:
            self.ep.modify(c.fd, EPOLLIN)

    # -- endings -------------------------------------------------------------------------------
    def _lose(self, c: Conn, reason: str) -> None:
        """The connection is gone: count why, and what it still had in flight."""
        if self.conns.pop(c.fd, None) is None:
            return
        self.errors[reason] += 1
        self.counts["lost_connections"] += 1
        self.counts["lost_in_flight"] += len(c.sent)
        c.sent.clear()
        c.actual.clear()
        self.ep.unregister(c.fd)
        c.sock.close()

    def close(self) -> None:
        for c in self.conns.values():
            c.sock.close()
        self.conns.clear()
        self.ep.close()

    def _open_counts(self) -> dict:
        """offered / sent / late / unsent / unanswered of the window's requests (those scheduled inside it):
        offered from the schedule, sent and late from the lateness histogram (one value per send)."""
        self.lateness.fold()
        histogram = self.lateness.histogram
        late = sum(item.count_at_value_iterated_to for item in histogram.get_recorded_iterator()
                   if item.value_iterated_to > OPEN_LATE_US)
        offered = slots_between(self.first, self.step, self.warm_ns, self.stop_ns) if self.order else 0
        return {"offered": offered, "sent": histogram.get_total_count(), "late": late,
                "unsent": self.counts["unsent"], "unanswered": self.counts["unanswered"]}

    def _result(self, end_cpu: float, end_ns: int) -> dict:
        self.latency.fold()
        if not self.warm:                                      # ended (all connections lost) inside the warm-up
            self._begin_measuring(end_ns, force=True)
        measured = max(min(self.end_ns, end_ns) - self.wall0, 1) / NS
        result = {
            "requests": self.latency.histogram.get_total_count(),
            "errors": dict(self.errors),
            "histogram": self.latency.encode(),
            "clamped": self.latency.clamped,
            "duration_s": measured,
            "cpu_s": end_cpu - self.cpu0,
            "cpu_wall_s": max(end_ns - self.wall0, 1) / NS,
            "connections": {"opened": len(self.order), "served": sum(1 for c in self.order if c.got),
                            "lost": self.counts["lost_connections"],
                            "lost_in_flight": self.counts["lost_in_flight"]},
            "unanswered": self.counts["unanswered"],
            "max_unanswered_wait_us": self.max_wait_ns // 1000,
        }
        if self.open:
            result["uncorrected_histogram"] = self.uncorrected.encode()
            result["send_lateness_histogram"] = self.lateness.encode()
            result["open_loop"] = self._open_counts()
        return result
