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
waits like a WORK, in ``gevent.sleep``, parking only its own greenlet.

Out of fds (EMFILE), gevent's StreamServer stops accepting and retries after
10 ms, doubling up to 1 s (printing each error to stderr): no busy loop.
"""
from __future__ import annotations

import contextlib
import math
import socket
import time

import gevent
from gevent.event import Event
from gevent.pool import Group
from gevent.server import StreamServer

from .base import ConnectionSet, abort, announce, ignore_signals, stop_signals
from .threads import handle, reject

KILL_GRACE = 1.0     # after the drain deadline, how long killed greenlets get to close their sockets


def serve(listener, config, stats) -> None:
    connections, greenlets, stop = ConnectionSet(), Group(), Event()

    def admit(sock, _address):                 # runs in the connection's own greenlet
        if stats.try_open():
            connections.add(sock)
            handle(sock, config, stats, connections, sleep=gevent.sleep, deadlines=HubDeadlines)   # threads.py's
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
        for watcher in watchers:               # a second signal during the drain only re-set stop
            watcher.cancel()
        ignore_signals()
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
    """

    __slots__ = ("sock", "session", "greenlet", "timer", "due", "waiting")

    def __init__(self, sock, session) -> None:
        self.sock, self.session, self.greenlet = sock, session, gevent.getcurrent()
        self.timer, self.due, self.waiting = None, math.inf, False

    def recv(self, size: int) -> bytes:
        self._arm()
        self.waiting = True
        try:
            return self.sock.recv(size)
        finally:
            self.waiting = False

    def sendall(self, data: bytes) -> None:
        self._arm()
        self.waiting = True
        try:
            sent = self.sock.send(data)        # the usual small reply leaves in one call
            if sent < len(data):
                self.sock.sendall(memoryview(data)[sent:])
        finally:
            self.waiting = False

    def close(self) -> None:
        if self.timer is not None:
            self.timer.close()

    def _arm(self) -> None:
        deadline = self.session.deadline
        if deadline < self.due:                # sooner than the timer (a frame started): set it again
            self.close()
            self.timer = gevent.get_hub().loop.timer(max(deadline - time.monotonic(), 0.0))
            self.timer.start(self._fire)
            self.due = deadline

    def _fire(self) -> None:                   # in the hub
        self.due = math.inf
        if not self.waiting:
            return                             # busy (WORK): its next recv or send sets the timer again
        if self.session.expired(time.monotonic()):
            self.greenlet.throw(TimeoutError("deadline passed"))
        else:
            self._arm()                        # requests moved the deadline: wait for the new one


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


