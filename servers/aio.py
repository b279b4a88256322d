"""asyncio event loop with Protocols: one thread, many connections, waits that cost nothing.

One OS thread runs an event loop. The kernel says which sockets are ready
(epoll; libuv on uvloop) and the loop calls into Python: ``buffer_updated``
when bytes arrived, a timer callback when a deadline passes. Python code
runs until it returns or reaches an ``await``: scheduling is *cooperative*.
Nothing runs in parallel, so nothing takes a lock, and the GIL plays no part:
there is one thread, and it waits for I/O in epoll_wait, not in Python.

A connection is an object and an fd, not a thread and a stack: ten thousand
idle clients are cheap. WORK's wait, ``await asyncio.sleep``, is a timer, free
while pending, so all waits overlap. But whatever does not yield (WORK's cpu_us
busy loop, a ``time.sleep``, any blocking call) stalls *every* connection.

Protocols, not streams: ``asyncio.start_server`` gives each connection a task
awaiting a StreamReader, so each read is copied into its buffer, wakes a future
and resumes a coroutine a loop turn later. A Protocol answers ECHO/PING inside
the callback, one ``transport.write`` per read, with a task only while a WORK
waits: less CPU per request and less memory per idle connection than streams
(docs/performance.md, "asyncio: Protocols, not streams", has the comparison).

A *buffered* Protocol: the transport reads into a buffer we lend it
(``get_buffer``, then ``buffer_updated``). A plain Protocol's transport makes a
new 256 KiB bytes object for every recv() and shrinks it to what arrived; glibc
hands a block that large out by mmap unless its adaptive threshold has risen,
which depends on the process's past, so each request could cost an mmap, an
mremap and a munmap besides its recv and send. All connections share one read
buffer (``Hub.read_buffer``): the loop has one thread, and each read is copied
out (a small bytes object, what the session keeps) before the next one starts,
so an idle connection holds no buffer at all.

While a WORK waits, reading is paused and one task answers the queue in order;
while the write buffer is over its high-water mark (``pause_writing``) reading
stops too, so a client that never reads holds that buffer plus one read of
replies. One lazy deadline per connection keeps its timeouts; it never expires
a connection whose request is in progress, nor one whose replies are in flight.
The deadlines are entries in one heap under one loop timer (``Deadlines``), not
a loop timer each: on uvloop a timer (TimerHandle, UVTimer, uv_timer_t) costs
about 0.6 KiB per idle connection, a heap entry about 0.1 KiB.

The write policy (docs/protocol.md): a reply that makes no progress for
--idle-timeout ends the connection with a reset (SO_LINGER 0, then
``transport.abort()``, which alone would send a FIN behind the unsent bytes),
counted in ``idle_timeouts``; one that makes progress is never cut. The
transport reports only its buffer crossing the high-water mark, so the same
timer *looks* at the replies in flight (the transport's buffer plus the
kernel's unsent bytes, ``tcpdiag.unsent``) at growing intervals: any change is
progress. It starts when writing pauses, when the idle deadline passes with
replies still in flight, and when the connection is done: a connection closes
(``transport.close()``) only once its replies are delivered, since a FIN queued
behind bytes a peer never reads would leave the socket in FIN-WAIT-1 holding
them, and a transport closing with a full buffer would never expire at all.

SIGTERM/SIGINT: the listener closes and every read side is shut (as in the
threads backend), so reads return what the kernel holds, then EOF: idle
connections close at once, busy ones after their replies, and what is left is
reset at --drain-timeout. uvloop (libuv, in C) runs this very code.

Rate limiting: the token bucket is in each connection's Session, and every
callback runs on the loop's one thread, one at a time, with no ``await`` inside
the bucket's arithmetic: no lock. A delayed request waits like a WORK, in the
connection's worker task (``asyncio.sleep``), with reading paused meanwhile.
With a redis store (docs/ratelimit.md) that task first awaits
``AsyncBucketClient.take``: one connection to Redis per process, every call
pipelined on it, so a thousand waiting requests need no thousand connections.

``--cpu-offload process`` (servers/offload.py): a request with cpu_us goes to
the connection's worker task like a WORK wait, which submits the computation
to the process pool and awaits it (``asyncio.wrap_future``, what
``loop.run_in_executor`` does), then replies with ``request.computed``: the
loop serves every other connection meanwhile, and this one reads nothing more
until the reply is out, so its replies keep their order. The pool is started
before ``listening on`` and shut down after the drain.

Out of fds (EMFILE) the stdlib loop retries accept() after 1 s; ``Listener``
fixes the busy loop CPython 3.11's accept batch makes of that (gh-151615).
uvloop (libuv) instead accepts and closes what it cannot hold.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import itertools
import math
import socket
import struct
import time

from . import offload as cpu_offload
from .base import (ABORT_GRACE, DRAIN_POLL_INTERVAL, FD_EXHAUSTED, LEAKED, LISTEN_BACKLOG, announce, stop_signals,
                   then_ignore_signals)
from .session import open_session, rejection, shared_limit
from .tcpdiag import unsent

FIRST_LOOK = 0.01              # replies in flight: look again this soon after they moved...
LAST_LOOK = 1.0                # ...then after as long as they have been stuck, at most this long
LINGER_RESET = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends RST and drops what is unsent
READ_SIZE = 256 * 1024        # the most one read takes: the stdlib transport's own recv size (max_size)
TCP_CLOSE = 7                  # include/net/tcp_states.h: tcp_info's first byte once a reset closed the socket


def serve(listener, config, stats) -> None:
    """The standard library's loop (selectors over epoll)."""
    _run(Listener(fileno=listener.detach()), config, stats, asyncio.new_event_loop)


def serve_uvloop(listener, config, stats) -> None:
    """The same server on uvloop's libuv-based loop."""
    import uvloop
    _run(listener, config, stats, uvloop.new_event_loop)


def _run(listener, config, stats, loop_factory) -> None:
    runner = asyncio.Runner(loop_factory=loop_factory)
    try:
        runner.run(_serve(listener, config, stats))
    finally:
        with then_ignore_signals():        # closing the loop takes its signal handlers away
            runner.close()


class Listener(socket.socket):
    """The listening socket, with one fix for the stdlib loop's accept (CPython gh-151615, fixed upstream).

    Out of fds (EMFILE), asyncio stops watching the listener and retries in 1 s,
    as it should, but then carries on with its accept batch: up to ``backlog``
    (4096) more accept() calls that fail at once, each logged with a traceback
    and each scheduling one more retry: a busy loop, just when the process is
    short of everything. After one such failure this accept() answers "nothing
    to accept", which ends the batch. (uvloop's libuv has its own answer: it
    accepts and closes what it cannot hold.)
    """

    exhausted = False

    def accept(self):
        if self.exhausted:
            self.exhausted = False
            raise BlockingIOError(errno.EAGAIN, "out of file descriptors: retry later")
        try:
            return super().accept()
        except OSError as exc:
            self.exhausted = exc.errno in FD_EXHAUSTED
            raise


async def _serve(listener, config, stats) -> None:
    loop = asyncio.get_running_loop()
    hub = Hub(loop, config, stats, cpu_offload.start(config, stats))
    hub.shared = shared_limit(config, stats, "AsyncBucketClient")   # a redis store: calls pipelined, awaited
    try:
        await _serve_until_drained(listener, config, stats, loop, hub)
    finally:
        if hub.offload is not None:
            hub.offload.close()


async def _serve_until_drained(listener, config, stats, loop, hub) -> None:
    # create_server calls listen() again: pass the backlog, or it drops to asyncio's 100
    server = await loop.create_server(lambda: Connection(hub), sock=listener, backlog=LISTEN_BACKLOG)
    stop = asyncio.Event()
    for sig in stop_signals(config):
        loop.add_signal_handler(sig, stop.set)   # a second signal during the drain changes nothing
    announce(listener)
    await stop.wait()
    server.close()
    stats.aborted = await hub.drain(config.drain_timeout)


class Hub:
    """What the connections of one server share: the loop, settings, counters, the drain."""

    def __init__(self, loop, config, stats, offload=None) -> None:
        self.loop, self.config, self.stats = loop, config, stats
        self.offload = offload                # --cpu-offload process: the process pool, else None
        self.shared = None                    # a shared rate limit: this process's side (session.shared_limit)
        self.connections: set[Connection] = set()
        self.draining = False
        self.read_buffer = memoryview(bytearray(READ_SIZE))   # lent to every read in turn (Connection.get_buffer)
        self.deadlines = Deadlines(loop)

    async def drain(self, timeout: float) -> int:
        """Shut every read side, abort what is left at the deadline; return how many were aborted."""
        self.draining = True
        for connection in list(self.connections):
            connection.shut_read()
        if await self._wait_empty(timeout):
            return 0
        left = list(self.connections)
        for connection in left:
            connection.reset()
        await self._wait_empty(ABORT_GRACE)
        return len(left)

    async def _wait_empty(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while self.connections and time.monotonic() < end:
            await asyncio.sleep(DRAIN_POLL_INTERVAL)
        return not self.connections


class Deadlines:
    """Every connection's deadline, in one heap of ``[when, seq, connection]`` under one loop timer.

    As in the epoll backend, a cancelled entry (its connection closed, or its
    deadline superseded by a sooner one) stays in place as a husk holding no
    connection, so a closed connection is freed at once; the heap is rebuilt
    once husks are more than half of it. The loop timer is due by the first
    entry; it runs what is due, each connection's ``_on_deadline``, and
    schedules itself for the next.
    """

    def __init__(self, loop) -> None:
        self.loop = loop
        self.heap: list = []
        self.seq = itertools.count()          # ties are taken in order (and connections are never compared)
        self.husks = 0
        self.timer, self.due = None, math.inf  # the loop timer, and when it fires (time.monotonic())

    def add(self, when: float, connection) -> list:
        """Have ``connection._on_deadline()`` run at ``when`` (monotonic); returns the entry, for ``cancel``."""
        entry = [when, next(self.seq), connection]
        heapq.heappush(self.heap, entry)
        if when < self.due:
            self._schedule(when)
        return entry

    def cancel(self, entry: list) -> None:
        """Make an entry a husk (a loop timer then due too early finds nothing due and schedules the next)."""
        entry[2] = None
        self.husks += 1
        if self.husks > len(self.heap) // 2:
            self.heap[:] = [live for live in self.heap if live[2] is not None]
            heapq.heapify(self.heap)
            self.husks = 0

    def _schedule(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.due = when
        # call_later, not call_at: the Session counts in time.monotonic(), libuv in its own clock
        self.timer = self.loop.call_later(max(when - time.monotonic(), 0.001), self._run)

    def _run(self) -> None:
        """Run what is due; entries added meanwhile wait for the next turn. Whatever a connection raises (the
        loop reports it), the timer is scheduled for what is left."""
        self.timer, self.due = None, math.inf
        heap, now, fresh = self.heap, time.monotonic(), next(self.seq)
        try:
            while heap and heap[0][0] <= now and heap[0][1] < fresh:
                connection = heapq.heappop(heap)[2]
                if connection is None:
                    self.husks -= 1
                else:
                    connection._on_deadline()
        finally:
            if heap and heap[0][0] < self.due:
                self._schedule(heap[0][0])


class Connection(asyncio.BufferedProtocol):
    """One client. The loop calls these methods; the Session decides what to answer."""

    # Watching replies in flight: class defaults, so a connection that never needs them carries none.
    pending = -1                              # bytes in flight at the last look (-1: not watching)
    progress = 0.0                            # when they last moved (time.monotonic())
    finishing = False                         # the session is done: close once they are delivered
    expired = False                           # the session counted its own timeout (idle or frame)

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transport = self.session = None  # the session stays None for a connection turned away
        self.queue = None                     # requests behind a waiting WORK, in order (a list, once needed)
        self.worker = None                    # the task answering self.queue
        self.timer = None                     # the deadline's entry in hub.deadlines
        self.write_paused = False

    def connection_made(self, transport) -> None:
        self.transport, hub = transport, self.hub
        if not hub.stats.try_open():
            transport.write(rejection(hub.config))
            transport.close()
            return
        shared = hub.shared
        self.session = open_session(hub.config, hub.stats, time.monotonic(),
                                    (transport.get_extra_info("peername") or ("",))[0] if shared else "", shared)
        hub.connections.add(self)
        self._arm(self.session.deadline)
        if hub.draining:                      # accepted just as the listener closed
            self.shut_read()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the transport reads to: the hub's one buffer (``buffer_updated`` copies out what arrived)."""
        return self.hub.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        """The transport read nbytes into the shared buffer: copy them out before the next read overwrites them.

        The hot path: with no WORK waiting (whose replies must keep their order),
        a read of whole ECHO frames is answered at once with ``Session.echo``, the
        read itself, with no Request, no list and no second clock read."""
        data = self.hub.read_buffer[:nbytes].tobytes()
        if self.worker is None:
            reply = self.session.echo(data, time.monotonic())
            if reply is not None:
                self.transport.write(reply)
                return
        self._received(data)

    def _received(self, data: bytes) -> None:
        session = self.session
        requests = session.feed(data, time.monotonic())
        if session.frame_started is not None:
            self._watch_deadline()            # a frame began: its timeout may come before the timer
        if self.worker is not None:           # a WORK is waiting: replies must keep their order
            self.queue.extend(requests)
            return
        for n, request in enumerate(requests):
            if request.io_s or request.gated or (request.cpu_us and self.hub.offload is not None):
                self._start_worker(requests[n:])
                return
            self.transport.write(request.run(time.monotonic()))
        if session.closing:
            self._finish()

    def eof_received(self):
        """The peer closed its side: answer what was asked, then close (``_finish``). True keeps the
        transport open meanwhile (None would let it close as soon as its buffer is flushed)."""
        if self.session is None:
            return None
        self.session.eof()
        if self.session.forget_to_close:      # --fault leak: keep it open, forgotten (see base.release)
            self.hub.connections.discard(self)
            if self.timer is not None:
                self.hub.deadlines.cancel(self.timer)
            LEAKED.append(self.transport)
            return True
        if self.worker is None:
            self._finish()                    # else the worker finishes once the queue is answered
        return True

    def connection_lost(self, exc) -> None:
        if self.session is None:
            return
        self.hub.connections.discard(self)
        if self.timer is not None:
            self.hub.deadlines.cancel(self.timer)
        if self.worker is not None:
            self.worker.cancel()
        self.session.close()                  # its buffer budget back, whatever ended it
        self.hub.stats.closed()

    def reset(self) -> None:
        """End the connection with RST at once, dropping whatever is unsent (transport.abort alone: a FIN)."""
        with contextlib.suppress(OSError):
            self.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.transport.abort()

    def shut_read(self) -> None:
        """Drain: reads still get what the kernel holds, then EOF closes us (after any reply)."""
        with contextlib.suppress(OSError):    # a dup, as uvloop's transport socket refuses shutdown()
            with self.transport.get_extra_info("socket").dup() as sock:
                sock.shutdown(socket.SHUT_RD)

    def _start_worker(self, requests) -> None:
        self.queue = list(requests)
        self.worker = self.hub.loop.create_task(self._answer_queue())
        self._flow()

    async def _answer_queue(self) -> None:
        """One task per busy connection (none for the others): answer the queue in order."""
        queue, transport, offload = self.queue, self.transport, self.hub.offload
        while queue:
            request = queue.pop(0)
            if request.gated:                 # its token is in Redis: await the (pipelined) call
                verdict = await self.hub.shared.store.take(request.key)
                request = self.session.admit(request, verdict, time.monotonic())
            if request.io_s:
                await asyncio.sleep(request.io_s)
            if request.cpu_us and offload is not None:
                await self._compute_elsewhere(offload, request.cpu_us)
                transport.write(request.computed(time.monotonic()))
            else:
                transport.write(request.run(time.monotonic()))
        self.worker = None
        if self.session.closing:
            self._finish()
        else:
            self._flow()
            self._watch_deadline()

    @staticmethod
    async def _compute_elsewhere(offload, cpu_us: int) -> None:
        """--cpu-offload: the pool computes cpu_us while the loop serves the others (offload.settle counts it,
        or computes it here if the pool failed)."""
        future = offload.submit(cpu_us)
        with contextlib.suppress(Exception):    # a failed computation is settle's to handle
            await asyncio.wrap_future(future)
        offload.settle(future, cpu_us)

    def pause_writing(self) -> None:             # the transport's write buffer passed its high-water mark
        self.write_paused = True
        self._flow()
        self._watch_replies()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._flow()

    def _flow(self) -> None:
        """Read only while no WORK is waiting, the peer keeps up with our replies, and the session goes on."""
        if self.worker is None and not self.write_paused and not self.finishing:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def _finish(self) -> None:
        """The session is done: close, but only once its replies are delivered (watched until then)."""
        self.finishing = True
        self._flow()
        if self.pending < 0 and not self._in_flight():
            self.transport.close()
        else:
            self._watch_replies()

    def _in_flight(self) -> int:
        """Reply bytes not yet taken by the peer: the transport's buffer, and what the kernel cannot send yet.
        Nothing once a reset has closed the socket: its unsent count stays stale, and libuv may have told the reset
        as an EOF (data and POLLHUP in one wakeup), so no read or write would ever fail to end the connection."""
        sock = self.transport.get_extra_info("socket")
        pending = self.transport.get_write_buffer_size() + unsent(sock.fileno())
        return 0 if pending and reset_by_peer(sock) else pending

    def _arm(self, when: float) -> None:
        """Have ``_on_deadline`` run by ``when`` (monotonic): a timer due sooner stays, a later one is replaced."""
        timer = self.timer
        if timer is not None:
            if timer[0] <= when:
                return
            self.hub.deadlines.cancel(timer)
        self.timer = self.hub.deadlines.add(when, self)

    def _watch_deadline(self) -> None:
        """Idle/frame deadlines: the timer is due by the Session's deadline (unless replies are watched)."""
        if self.pending < 0:
            self._arm(self.session.deadline)

    def _watch_replies(self) -> None:
        """Replies wait: from now on the timer looks whether they move (``_look``)."""
        now = time.monotonic()
        if self.pending < 0:
            self.pending, self.progress = 0, now
        self._arm(now + FIRST_LOOK)

    def _on_deadline(self) -> None:
        """The connection's one deadline (``Deadlines`` runs it). A WORK wait is never expired (the worker
        re-arms); replies in flight are looked at (``_look``); else, past the Session's deadline, the idle or
        frame timeout is told with an ERROR. The frame timeout is never deferred by replies in flight."""
        self.timer = None
        if self.worker is not None or self.transport.is_closing():
            return
        now, session = time.monotonic(), self.session
        if self.pending < 0:
            if not session.expired(now):
                return self._arm(session.deadline)    # data arrived meanwhile and moved the deadline
            if session.closing or frame_expired(session, now) or not self._in_flight():
                if not session.closing:
                    self._expire(now)
                return self._finish()
        elif not session.closing and frame_expired(session, now):
            self._expire(now)                             # behind the replies in flight
            return self._finish()
        self._look(now)

    def _expire(self, now: float) -> None:
        """The idle or frame timeout: the session counts it and says so (ERROR)."""
        self.expired = True
        self.transport.write(self.session.expire(now))

    def _look(self, now: float) -> None:
        """Replies in flight: any change since the last look is progress (they shrink as the peer reads, grow as
        replies are added). None for --idle-timeout: reset, counted as an idle timeout. All delivered: close
        if finishing, else the idle clock starts now. The next look comes soon after progress, then after as
        long as they have been stuck."""
        session = self.session
        pending = self._in_flight()
        if pending:
            if pending != self.pending:
                self.pending, self.progress = pending, now
            elif now - self.progress >= session.idle_timeout:
                if not self.expired:              # (a timed-out session counted itself)
                    self.hub.stats.count("idle_timeouts")
                return self.reset()
            wait = min(max(now - self.progress, FIRST_LOOK), LAST_LOOK)
            return self._arm(min(now + wait, self.progress + session.idle_timeout))
        self.pending = -1
        if self.finishing:
            return self.transport.close()
        session.replied(now)
        self._flow()
        self._arm(session.deadline)


def reset_by_peer(sock) -> bool:
    """Whether the kernel has closed this connection's socket (TCP state CLOSE, which a reset leaves)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE
    except OSError:
        return False


def frame_expired(session, now: float) -> bool:
    """Whether the frame timeout, not the idle one, has passed."""
    return session.frame_started is not None and now >= session.frame_started + session.frame_timeout
