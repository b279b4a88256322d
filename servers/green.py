"""A greenlet per connection (gevent): code that reads like threads, scheduled like an event loop.

A *greenlet* is a coroutine with its own small stack: switching to another is a
jump in user space, no kernel and no GIL hand-off, so 10,000 of them cost a few
KiB each. One special greenlet, the *hub*, runs the event loop (libev by
default, libuv with GEVENT_LOOP=libuv): it waits in epoll for ready sockets
and expired timers and switches to the greenlet waiting on each. Each
connection runs ``threads.handle`` itself, given gevent's sleep and a hub timer
for its deadlines (``HubDeadlines``): only what its blocking calls do differs.
``sock.recv`` on a gevent socket tries the syscall, and on EWOULDBLOCK parks
the greenlet on an I/O watcher and switches to the hub; ``gevent.sleep``
parks it on a timer. Switching is *cooperative*: it happens only there.

So a CPU loop (WORK's ``cpu_us``) never switches: while it burns, the hub
does not run, and every other connection, the accept loop and every timeout
waits behind it. Threads are preempted (the GIL changes hands every 5 ms);
greenlets are not.

Nor does a read that finds data switch: gevent's ``recv`` goes to the hub only
when it would block. A client that pipelines without pause keeps its socket
readable (and its replies writable), so its greenlet would read, answer and
read again without ever giving the hub a turn: other connections' requests,
new connections and every deadline would wait as long as it keeps going.
Hence the explicit yield in ``HubDeadlines.recv``: after ``YIELD_READS`` reads
(or ``YIELD_BYTES`` bytes) in a row with no hub turn between them, the
greenlet waits for the hub's next loop iteration (``gevent.idle`` at the
highest priority: the hub polls without blocking, then switches back to it
before the rest of what that poll reported). Whether the hub ran meanwhile
costs an integer compare per read (libev's loop iteration count; libuv keeps
none, so there every run of reads counts, and a greenlet that did wait yields
once more than needed); a yield costs a hub turn per that many reads of a
client that never waits.

No monkey-patching: ``gevent.monkey.patch_all()`` would swap the stdlib's
socket, time and threading for gevent's across the whole process. Here only
the objects this module makes (StreamServer's accepted sockets,
``gevent.sleep``) yield, so the hub stays on this thread and a metrics
thread stays a real OS thread. The shared ``Stats`` keeps its plain
``threading.Lock``: no greenlet switch happens while it is held, so
greenlets never contend for it, and a real thread beside the hub still can.

Rate limiting: the token bucket is in the Session of one connection, used by
that connection's greenlet only, and a greenlet is never switched out in the
middle of its arithmetic (there is no I/O in it): no lock. A delayed request
waits like a WORK, in ``gevent.sleep``, parking only its own greenlet. A shared
bucket (docs/ratelimit.md): scope client with the memory store is the
process's map of client buckets (no lock either, for the same reason); with a
redis store the greenlet calls threads.py's blocking ``BlockingBucketClient.take``,
made with gevent's socket module and semaphores, so the round trip parks the
greenlet on the hub and the others run.

``--cpu-offload process`` (servers/offload.py): the greenlet hands WORK's CPU
part to the process pool and parks until it is done, while the hub serves the
others (``PoolWaits``). The future's done-callback runs in the pool's manager
thread, where no gevent object may be touched; it queues the greenlet's
``Waiter`` and wakes the hub through an async watcher (``loop.async_()``,
libev's ev_async: the one watcher another thread may ``send`` to), whose
callback, in the hub, switches to each waiting greenlet. Never
``future.result()`` in a greenlet: that blocks the hub's thread, and every
connection with it. ``threads.handle`` calls ``request.run``; the session's
``compute`` (set by ``PoolWaits.deadlines``, the connection's first step) has
``run`` wait this way instead of burning. The pool starts before
``listening on``; after the drain it is shut down, then the watcher closed.

Out of fds (EMFILE), gevent's StreamServer stops accepting and retries after
10 ms, doubling up to 1 s (printing each error to stderr): no busy loop.
"""
from __future__ import annotations

import collections
import contextlib
import math
import socket
import time

import gevent
import gevent.lock
import gevent.socket
from gevent.event import Event
from gevent.hub import Waiter
from gevent.pool import Group
from gevent.server import StreamServer

from . import offload as cpu_offload
from .base import (ConnectionSet, WriteStalled, abort, announce, output_stalled, stop_signals,
                   then_ignore_signals)
from .session import shared_limit
from .threads import handle, reject

KILL_GRACE = 1.0     # after the drain deadline, how long killed greenlets get to close their sockets
YIELD_READS = 16     # reads in a row without a hub turn, then the greenlet yields to the hub...
YIELD_BYTES = 256 << 10   # ...or after this many bytes read in a row, whichever comes first
IDLE, READING, WRITING = 0, 1, 2          # what a HubDeadlines' greenlet is waiting for


def serve(listener, config, stats) -> None:
    connections, greenlets, stop = ConnectionSet(), Group(), Event()
    offload = cpu_offload.start(config, stats)
    waits = None if offload is None else PoolWaits(offload)
    deadlines = HubDeadlines if waits is None else waits.deadlines
    shared = shared_limit(config, stats, "BlockingBucketClient", sockets=gevent.socket,
                          semaphore=gevent.lock.BoundedSemaphore)   # a redis store: waits park on the hub

    def admit(sock, _address):                 # runs in the connection's own greenlet
        if stats.try_open():
            connections.add(sock)
            handle(sock, config, stats, connections, sleep=gevent.sleep, shared=shared,
                   deadlines=deadlines)   # threads.py's
        else:
            reject(sock, config)

    listener.setblocking(False)                # StreamServer accepts until EWOULDBLOCK
    server = StreamServer(listener, admit, spawn=greenlets.spawn)
    watchers = [gevent.signal_handler(sig, stop.set) for sig in stop_signals(config)]
    try:
        server.start()
        announce(listener)
        stop.wait()                            # the hub serves everyone meanwhile
        server.close()                         # stop accepting at once: closes the listener
        stats.aborted = drain(connections, greenlets, config.drain_timeout)
    finally:
        greenlets.kill(timeout=KILL_GRACE)     # none outlives serve, even if it failed
        if waits is not None:
            waits.close()
        with then_ignore_signals():            # until here a second signal only re-set stop
            for watcher in watchers:
                watcher.cancel()
        gevent.get_hub().destroy(destroy_loop=True)   # like asyncio.run closing its loop: epoll fd and all


class HubDeadlines:
    """A gevent socket's recv and sendall, with the session's deadline kept by one lazy hub timer.

    gevent's own socket timeout makes a ``Timeout`` (an object and a timer) for
    every wait, and its ``sendall`` asks the kernel for the send buffer size on
    every call: together about as much as the rest of a request. Here one timer
    per connection is set for the session's deadline and left alone while
    requests move the deadline later; when it fires it looks again: a deadline
    that moved re-arms it, one that passed throws ``TimeoutError`` into the
    greenlet, but only while it waits for its peer (never into a WORK wait).
    (A kernel timeout cannot serve: gevent's sockets are non-blocking
    underneath, and the kernel ignores SO_RCVTIMEO on those.)

    While the greenlet waits to send, the write policy applies instead: the
    timer asks the kernel how long it has sent the peer nothing
    (``base.output_stalled``) and throws ``WriteStalled`` once that reaches
    --idle-timeout, else looks again when it could; a slow reader whose replies
    still move is never cut, however long the send takes. (The greenlet's own
    wake-ups say little: the kernel reports a socket writable only once a third
    of its send buffer is free.) ``threads.handle`` resets and counts it.

    ``recv`` also yields to the hub after a run of reads that never waited
    (``YIELD_READS``, ``YIELD_BYTES``): see the module's docstring.
    """

    __slots__ = ("sock", "session", "greenlet", "loop", "timer", "due", "waiting", "counted", "turn", "reads",
                 "taken")

    def __init__(self, sock, session) -> None:
        self.sock, self.session, self.greenlet = sock, session, gevent.getcurrent()
        self.loop = gevent.get_hub().loop
        self.timer, self.due, self.waiting = None, math.inf, IDLE
        self.counted = hasattr(self.loop, "iteration")   # libev counts its loop iterations; libuv does not
        self.turn, self.reads, self.taken = -1, 0, 0     # the hub's iteration at the last read; the run so far

    def recv(self, size: int) -> bytes:
        if self.reads >= YIELD_READS or self.taken >= YIELD_BYTES:
            self.reads = self.taken = 0
            gevent.idle(self.loop.MAXPRI)    # the hub polls, serves what is ready, and comes back first
        self._arm(self.session.deadline)
        self.waiting = READING
        try:
            data = self.sock.recv(size)
        finally:
            self.waiting = IDLE
        turn = self.loop.iteration if self.counted else 0
        if turn != self.turn:                # the hub ran since the last read (this one waited, or a send did)
            self.turn, self.reads, self.taken = turn, 0, 0
        self.reads += 1
        self.taken += len(data)
        return data

    def sendall(self, data: bytes) -> None:
        self._arm(self.session.deadline)
        self.waiting = WRITING
        try:
            sent = self.sock.send(data)        # the usual small reply leaves in one call
            if sent < len(data):
                self.sock.sendall(memoryview(data)[sent:])
        finally:
            self.waiting = IDLE

    def close(self) -> None:
        if self.timer is not None:
            self.timer.close()

    def _arm(self, deadline: float) -> None:
        if deadline < self.due:                # sooner than the timer (a frame started): set it again
            self.close()
            self.timer = self.loop.timer(max(deadline - time.monotonic(), 0.0))
            self.timer.start(self._fire)
            self.due = deadline

    def _fire(self) -> None:                   # in the hub
        self.due = math.inf
        now = time.monotonic()
        if self.waiting == WRITING:
            quiet = output_stalled(self.sock) or 0.0       # None: the kernel holds nothing, the send is about to go
            idle = self.session.idle_timeout
            if quiet >= idle:
                self.greenlet.throw(WriteStalled("no reply bytes reached the peer for --idle-timeout"))
            else:
                self._arm(now + idle - quiet)  # the soonest it could have stalled that long
        elif self.waiting == READING:
            if self.session.expired(now):
                self.greenlet.throw(TimeoutError("deadline passed"))
            else:
                self._arm(self.session.deadline)   # requests moved the deadline: wait for the new one
        # IDLE: busy (WORK): its next recv or send sets the timer again


class PoolWaits:
    """--cpu-offload: greenlets waiting for the process pool, woken by one async watcher of the hub."""

    def __init__(self, offload) -> None:
        self.offload = offload
        self.hub = gevent.get_hub()
        self.ready: collections.deque = collections.deque()   # Waiters whose computation is done (any thread appends)
        self.watcher = self.hub.loop.async_()
        self.watcher.start(self._wake)

    def deadlines(self, sock, session) -> HubDeadlines:
        """``handle``'s ``deadlines`` under --cpu-offload: the session computes through ``compute``."""
        session.compute = self.compute
        return HubDeadlines(sock, session)

    def compute(self, cpu_us: int) -> float:
        """In a connection's greenlet: the pool computes cpu_us while the hub serves the others; returns when it
        ended (monotonic). offload.settle counts it, or computes it here if the pool failed."""
        waiter = Waiter(self.hub)
        future = self.offload.submit(cpu_us)
        future.add_done_callback(lambda _: self._done(waiter))
        waiter.get()
        self.offload.settle(future, cpu_us)
        return time.monotonic()

    def _done(self, waiter) -> None:           # the pool's manager thread (or this one, for a failed submit)
        self.ready.append(waiter)
        self.watcher.send()

    def _wake(self) -> None:                   # in the hub
        while self.ready:
            self.ready.popleft().switch(None)  # a greenlet killed meanwhile: the Waiter just keeps the value

    def close(self) -> None:
        """Shut the pool down (its last callbacks run meanwhile), then the watcher they send to."""
        self.offload.close()
        self.watcher.close()


def drain(connections, greenlets, timeout: float) -> int:
    """Graceful shutdown (docs/protocol.md section 4); returns how many connections were aborted.

    The plain sockets are shut, not gevent's wrappers: gevent's ``shutdown(SHUT_RD)``
    throws EBADF into a greenlet waiting in recv at once, dropping a request the
    kernel already holds; the plain one wakes it through epoll, buffered bytes first,
    then EOF, as in the threads backend. Leftovers are killed, not waited for:
    unlike a thread, a greenlet parked in ``gevent.sleep`` can be cancelled.
    """
    gevent.sleep(0)                            # greenlets from the last accepts reach their first recv
    for sock in connections.snapshot():
        with contextlib.suppress(OSError):
            sock._sock.shutdown(socket.SHUT_RD)  # the stdlib-level socket under gevent's wrapper
    if greenlets.join(timeout):
        return 0
    left = connections.snapshot()
    for sock in left:
        abort(sock)
    greenlets.kill(timeout=KILL_GRACE)         # GreenletExit at their switch point; finally closes
    return len(left)


