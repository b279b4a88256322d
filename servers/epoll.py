"""A hand-written ``select.epoll`` loop: the "netpoll" that Go hides under goroutines.

Readiness, not completion: ``epoll_wait`` moves no bytes, it says which sockets
*can* be read or written now; the loop then calls ``recv``/``send`` itself on
non-blocking sockets, which never wait. (Completion APIs, io_uring or Windows
IOCP, work the other way: hand the kernel a buffer, hear when the I/O is done.)

Level-triggered: epoll reports a socket for as long as it is ready, so one
``recv`` per event is safe (what is left is reported next turn) and fair (a
chatty client cannot starve the rest); edge-triggered mode reports changes only
and each event must be drained to EAGAIN. We register EPOLLIN to read, and
EPOLLOUT only while replies wait: a socket with buffer room is always writable.

One thread holds 10,000 connections because a waiting connection costs a socket
and a small ``Connection``, not a thread and its stack, and ``epoll_wait`` costs
what is *ready*, not what is registered (``select``/``poll`` rescan every fd).

Go does exactly this under ``conn.Read``: the fd is non-blocking and in one
epoll (edge-triggered); a read that would block parks the goroutine; the
scheduler's ``netpoll`` calls ``epoll_wait`` and makes ready goroutines runnable.
Go keeps a connection's state on its goroutine's stack; here it is a
``Connection``, and what follows a blocking call is a method the loop calls when
the socket is ready. Waits (WORK's io_us, idle/frame/drain deadlines) are a timer
heap whose next entry is the ``epoll_wait`` timeout. WORK's cpu_us runs in this
one thread and stalls every connection: what the lab measures.

Rate limiting: the token bucket is in each connection's Session, and this one
thread is the only code that ever runs: no lock. A delayed request is a timer on
the heap, like WORK's wait, and the connection is not read until it fires.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import select
import signal
import socket
import time
from select import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT

from .base import ACCEPT_BACKOFF, FD_EXHAUSTED, abort, announce, ignore_signals, no_delay, release, stop_signals
from .session import open_session, rejection

RECV_SIZE = 65536              # one recv per readiness event
MAX_EVENTS = 1024              # events taken from one epoll_wait
ACCEPT_BATCH = 64              # accepts per listener event, so a connect storm cannot starve reads
OUTPUT_CAP = 1 << 20           # stop reading while more than this waits to be sent (+ one read's replies)


class Connection:
    """What a goroutine would keep on its stack: the session, unsent bytes, what we wait for."""

    __slots__ = ("sock", "fd", "session", "out", "mask", "queue", "waiting", "armed", "closed")

    def __init__(self, sock, session) -> None:
        self.sock, self.fd, self.session = sock, sock.fileno(), session
        self.out = bytearray()     # reply bytes the kernel has not taken yet
        self.mask = EPOLLIN        # the events registered in epoll for this socket
        self.queue = []            # requests behind a waiting WORK (a list: an empty deque costs ~770 B)
        self.waiting = None        # the request whose wait (io_s) is on the timer heap, if any
        self.armed = math.inf      # when the deadline check in the timer heap is due
        self.closed = False


def serve(listener, config, stats) -> None:
    Loop(listener, config, stats).run()


class Loop:
    """One epoll, one timer heap and every connection: the whole server, in one thread."""

    def __init__(self, listener, config, stats) -> None:
        self.listener, self.config, self.stats = listener, config, stats
        self.epoll = select.epoll()
        self.conns: dict[int, Connection] = {}
        self.timers: list = []                 # heap of (when, seq, callback, connection or None)
        self.seq = itertools.count()           # ties in `when` never compare the callbacks
        self.stop_requested = self.draining = False
        listener.setblocking(False)
        self.epoll.register(listener.fileno(), EPOLLIN)
        # Signals: the C handler writes a byte to this socketpair, which wakes epoll_wait.
        self.wake_r, self.wake_w = socket.socketpair()
        for sock in (self.wake_r, self.wake_w):
            sock.setblocking(False)
        self.wake_fd = self.wake_r.fileno()
        self.epoll.register(self.wake_fd, EPOLLIN)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        previous_fd = signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for sig in stop_signals(self.config):
            signal.signal(sig, self.on_signal)
        announce(self.listener)                # only now: a signal from here on drains cleanly
        try:
            while self.conns or not self.draining:
                self.turn()
        finally:
            ignore_signals()                   # a late second SIGTERM must not kill the exit with -15
            signal.set_wakeup_fd(previous_fd)
            for closable in (self.epoll, self.wake_r, self.wake_w):
                closable.close()

    def turn(self) -> None:
        """One epoll_wait, then the I/O it reports, then the timers that are due."""
        conns = self.conns
        for fd, events in self.epoll.poll(self.poll_timeout(), MAX_EVENTS):
            conn = conns.get(fd)
            if conn is not None:
                self.guarded(self.on_event, conn, events)
            elif fd == self.wake_fd:
                with contextlib.suppress(BlockingIOError):
                    self.wake_r.recv(4096)     # the signal bytes; the flag is what matters
            else:
                self.accept()
        if self.stop_requested and not self.draining:
            self.begin_drain()
        self.run_timers()

    def on_signal(self, signum, frame) -> None:
        self.stop_requested = True             # the loop notices after its epoll_wait returns

    def guarded(self, handler, conn, *args) -> None:
        """Run a connection's step; a socket error (reset, broken pipe) just closes it."""
        try:
            handler(conn, *args)
        except OSError:
            if not conn.closed:
                self.close(conn)

    # -- timers -------------------------------------------------------------------------------
    def call_at(self, when: float, callback, conn=None) -> None:
        heapq.heappush(self.timers, (when, next(self.seq), callback, conn))

    def poll_timeout(self) -> float:
        """Seconds until the next timer is due; -1 (no timers) waits for I/O or a signal."""
        return max(self.timers[0][0] - time.monotonic(), 0) if self.timers else -1

    def run_timers(self) -> None:
        """Run what is due now; timers pushed meanwhile wait one turn, after fresh I/O is read."""
        now, due = time.monotonic(), []
        while self.timers and self.timers[0][0] <= now:
            due.append(heapq.heappop(self.timers))
        for _, _, callback, conn in due:
            if conn is None:
                callback()
            elif not conn.closed:
                self.guarded(callback, conn)

    def watch_deadline(self, conn: Connection) -> None:
        """Have a check due by the session's deadline (a frame that starts moves it sooner)."""
        if not conn.waiting and conn.session.deadline < conn.armed:
            conn.armed = conn.session.deadline
            self.call_at(conn.armed, self.check_deadline, conn)

    def check_deadline(self, conn: Connection) -> None:
        """Lazy deadline: re-read the session's current deadline, expire only if it really passed."""
        now = time.monotonic()
        if conn.armed > now:                   # a superseded entry: the live one is still ahead
            return
        conn.armed = math.inf
        if conn.waiting or conn.session.deadline > now:
            return self.watch_deadline(conn)   # moved later; or busy, never expired: work_done re-arms
        if not conn.session.closing:           # else already told (ERROR, EOF) but never read it
            self.write(conn, conn.session.expire(now))
        self.close(conn)                       # a client that reads nothing loses the ERROR too

    # -- connections: accept, read, answer, write -----------------------------------------------
    def accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except OSError as exc:             # EAGAIN: none left; ECONNABORTED & co: reported again
                if exc.errno in FD_EXHAUSTED:
                    self.epoll.modify(self.listener.fileno(), 0)
                    self.call_at(time.monotonic() + ACCEPT_BACKOFF, self.resume_accept)
                return
            self.admit(sock)

    def resume_accept(self) -> None:
        if not self.draining:
            self.epoll.modify(self.listener.fileno(), EPOLLIN)

    def admit(self, sock) -> None:
        sock.setblocking(False)
        if not self.stats.try_open():
            with contextlib.suppress(OSError), sock:
                sock.send(rejection(self.config))      # a few bytes: an empty send buffer takes them
            return
        no_delay(sock)
        conn = Connection(sock, open_session(self.config, self.stats, time.monotonic()))
        self.conns[conn.fd] = conn
        self.epoll.register(conn.fd, EPOLLIN)
        self.watch_deadline(conn)

    def on_event(self, conn: Connection, events: int) -> None:
        if events & EPOLLOUT:
            self.flush(conn)
        if conn.closed:
            return
        if events & EPOLLIN:
            self.read(conn)
        elif events & (EPOLLHUP | EPOLLERR):   # reported even when not asked for: the peer is gone
            self.close(conn)

    def read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        if data:
            conn.queue.extend(conn.session.feed(data, time.monotonic()))
        else:
            conn.session.eof()                 # EOF: answer what was asked, then close
        self.pump(conn)

    def pump(self, conn: Connection) -> None:
        """Answer queued requests in order (a WORK starts a timer, the rest wait behind it)."""
        while conn.queue and not conn.waiting:
            request = conn.queue.pop(0)
            if request.io_s:
                conn.waiting = request
                self.call_at(time.monotonic() + request.io_s, self.work_done, conn)
            else:
                self.write(conn, request.run(time.monotonic()))
        self.watch_deadline(conn)
        self.settle(conn)

    def work_done(self, conn: Connection) -> None:
        """A WORK's wait is over: compute (request.run), reply, go on with what queued behind it."""
        request, conn.waiting = conn.waiting, None
        self.write(conn, request.run(time.monotonic()))
        self.pump(conn)

    def write(self, conn: Connection, data: bytes) -> None:
        """Send at once if nothing is queued before it; keep what the kernel did not take."""
        if conn.out:
            conn.out += data
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            conn.out += memoryview(data)[sent:]

    def flush(self, conn: Connection) -> None:
        """EPOLLOUT: the kernel has room again; hand it what is queued."""
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            sent = 0
        del conn.out[:sent]
        self.settle(conn)

    def settle(self, conn: Connection) -> None:
        """Close a connection that is done, else register exactly the events it now waits for.

        It reads only what it can take: not while a request waits (later ones queue
        in the kernel, as behind a sleeping thread), not once closing, and not while
        over OUTPUT_CAP of replies are unsent (a client that never reads costs a bound).
        """
        if not conn.waiting and not conn.out:
            if conn.session.closing or (self.draining and not has_input(conn.sock)):
                return self.close(conn)
        reading = not conn.waiting and not conn.session.closing and len(conn.out) <= OUTPUT_CAP
        mask = (EPOLLIN if reading else 0) | (EPOLLOUT if conn.out else 0)
        if mask != conn.mask:
            self.epoll.modify(conn.fd, mask)
            conn.mask = mask

    def close(self, conn: Connection) -> None:
        conn.closed = True
        del self.conns[conn.fd]
        self.epoll.unregister(conn.fd)
        release(conn.sock, conn.session, self.stats)
        conn.session = conn.out = conn.queue = conn.waiting = None   # a stale timer pins only a husk

    # -- graceful drain -------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Stop accepting; idle connections close now, the others after their replies."""
        self.draining = True
        self.call_at(time.monotonic() + self.config.drain_timeout, self.abort_the_rest)
        self.epoll.unregister(self.listener.fileno())
        self.listener.close()
        for conn in list(self.conns.values()):
            self.guarded(self.settle, conn)

    def abort_the_rest(self) -> None:
        """The drain deadline, one more timer: whatever is left is cut (and run() returns)."""
        left = list(self.conns.values())
        for conn in left:
            abort(conn.sock)                   # SO_LINGER 0: close sends RST
            self.close(conn)
        self.stats.aborted = len(left)


def has_input(sock) -> bool:
    """Bytes wait in the kernel's receive buffer (peeked, not consumed): the drain answers them."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
