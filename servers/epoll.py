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
With a redis store (docs/ratelimit.md) the loop asks Redis itself, never
blocking: one non-blocking connection to Redis in this same epoll set, calls
pipelined on it (servers/epoll_redis.py); a connection whose next request
waits for its verdict is ``ASKING`` (not read, like a WORK wait) until
``on_verdict``, from the reply or from the call's 50 ms deadline on the heap.

The timer heap holds entries, not connections: a cancelled entry (its
connection closed, or its deadline superseded by a sooner one) keeps its place
as a husk holding nothing, so a closed connection's socket and state are freed
at once, and the heap is rebuilt (filtered, heapified) once husks are more than
half of it. Under connect/close churn with a long --idle-timeout the heap stays
about as big as the connections open, not as the connections of the last
--idle-timeout seconds.

The write policy (docs/protocol.md): a reply that makes no progress for
--idle-timeout ends the connection with a reset (SO_LINGER 0), counted in
``idle_timeouts``; one that makes progress is never cut. Once replies wait,
the deadline check looks at those in flight (``Connection.out`` plus the
bytes the kernel has not sent yet, ``tcpdiag.unsent``) at growing intervals:
any change is progress. (EPOLLOUT alone would miss a slow reader's progress:
the kernel reports a socket writable only once a third of its send buffer is
free.) A connection whose idle deadline passes while its replies still move
is not idle; one that is done closes only once they are delivered, since a
FIN queued behind bytes the peer never reads would leave the socket in
FIN-WAIT-1, holding them, after the server let go of it.

``--cpu-offload process`` (servers/offload.py): a request with cpu_us, its
wait over, is submitted to the process pool instead of burnt here; the
connection waits (``waiting`` is ``COMPUTING``: no reading, its later requests
queue) while the loop serves the others. The future's done-callback runs in the
pool's manager thread, so it only appends the connection to ``computed`` (a
deque: thread-safe appends) and writes to an eventfd in the epoll set; the
loop, woken, replies with ``request.computed`` and goes on with that
connection's queue. The pool is started before ``listening on`` and shut down
once the loop is done, before the eventfd closes (no callback can then write
to a closed fd).

A bug in a connection's step (any exception but OSError) costs that
connection, not the server: ``guarded`` says so on stderr in one line, resets
it and serves on. (An OSError is the peer: a reset, a broken pipe.)
"""
from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import os
import select
import signal
import socket
import struct
import sys
from select import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT
from time import monotonic

from . import offload as cpu_offload
from .base import ACCEPT_BACKOFF, FD_EXHAUSTED, announce, ignore_signals, no_delay, release, stop_signals
from .session import open_session, peer_ip, rejection, shared_limit
from .tcpdiag import unsent

RECV_SIZE = 65536              # one recv per readiness event
MAX_EVENTS = 1024              # events taken from one epoll_wait
ACCEPT_BATCH = 64              # accepts per listener event, so a connect storm cannot starve reads
OUTPUT_CAP = 1 << 20           # stop reading while more than this waits to be sent (+ one read's replies)
FIRST_LOOK = 0.01              # replies in the kernel: look again this soon after they moved...
LAST_LOOK = 1.0                # ...then after as long as they have been stuck, at most this long
LINGER_RESET = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends RST
NO_BYTES = b""                 # an idle connection's out and queue share these: an empty bytearray and an
NO_REQUESTS = ()               # empty list would cost ~110 B per connection (an empty deque ~770 B)
COMPUTING = ("computing",)     # a connection's ``waiting`` while the --cpu-offload pool computes (no timer entry)
ASKING = ("asking",)           # a connection's ``waiting`` while the redis store decides on queue[0] (no timer entry)


class Connection:
    """What a goroutine would keep on its stack: the session, unsent bytes, what we wait for."""

    __slots__ = ("sock", "fd", "session", "out", "mask", "queue", "waiting", "timer", "closed", "expired",
                 "pending", "progress")

    def __init__(self, sock, session) -> None:
        self.sock, self.fd, self.session = sock, sock.fileno(), session
        self.out = NO_BYTES        # reply bytes the kernel has not taken yet (a bytearray once there are any)
        self.mask = EPOLLIN        # the events registered in epoll for this socket
        self.queue = NO_REQUESTS   # requests not yet answered, in order (a list once there are any)
        self.waiting = None        # the timer entry of queue[0]'s wait (WORK's io_s, a rate-limit delay), if any;
        #                            COMPUTING while the --cpu-offload pool computes it
        self.timer = None          # the timer entry of the deadline check, if one is set
        self.closed = False
        self.expired = False       # the session counted its own timeout (idle or frame)
        self.pending = -1          # bytes in the kernel's send queue at the last look (-1: not watching them)
        self.progress = 0.0        # when the replies waiting (in out, or in the kernel) last moved


def serve(listener, config, stats) -> None:
    Loop(listener, config, stats).run()


class Loop:
    """One epoll, one timer heap and every connection: the whole server, in one thread."""

    def __init__(self, listener, config, stats) -> None:
        self.listener, self.config, self.stats = listener, config, stats
        self.epoll = select.epoll()
        self.conns: dict[int, Connection] = {}
        self.timers: list = []                 # heap of [when, seq, callback, connection or None]
        self.cancelled = 0                     # husks in it: entries whose callback and connection are gone
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
        # Bound once: every timer entry refers to one of these (a bound method made per entry is 64 B).
        self.on_deadline, self.on_work_done = self.check_deadline, self.work_done
        self.offload = cpu_offload.start(config, stats)    # --cpu-offload process: the pool, else None
        self.shared = shared_limit(config, stats, redis_store, loop=self)   # a shared rate limit, else None
        self.store = None if self.shared is None else self.shared.store    # a redis store: in this epoll set
        self.computed_fd = -1
        if self.offload is not None:
            self.computed: collections.deque = collections.deque()   # (connection, future), from the pool's thread
            self.computed_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.epoll.register(self.computed_fd, EPOLLIN)

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
            self.close_offload()
            if self.store is not None:
                self.store.close()
            for closable in (self.epoll, self.wake_r, self.wake_w):
                closable.close()

    def close_offload(self) -> None:
        """--cpu-offload: stop the pool (its last callbacks run meanwhile), then close the eventfd they write to."""
        if self.offload is not None:
            self.offload.close()
            os.close(self.computed_fd)
            self.offload = None

    def turn(self) -> None:
        """One epoll_wait, then the I/O it reports, then the timers that are due.

        Per event this is the hot path: ``guarded`` is inlined (a try costs nothing
        until it catches) and a plain EPOLLIN, the usual event, goes straight to ``read``.
        """
        conns, timers = self.conns, self.timers
        for fd, events in self.epoll.poll(self.poll_timeout(), MAX_EVENTS):
            conn = conns.get(fd)
            if conn is None:
                self.on_loop_event(fd, events)
                continue
            try:
                if events == EPOLLIN:
                    self.read(conn)
                else:
                    self.on_event(conn, events)
            except Exception as exc:
                self.failed(conn, exc)
        if self.stop_requested and not self.draining:
            self.begin_drain()
        if timers and timers[0][0] <= monotonic():
            self.run_timers()

    def on_loop_event(self, fd: int, events: int) -> None:
        """The listener, the signal socket, the --cpu-offload eventfd or the redis store's socket is ready."""
        if self.store is not None and fd == self.store.fd:
            self.store.on_event(events)
        elif fd == self.wake_fd:
            with contextlib.suppress(BlockingIOError):
                self.wake_r.recv(4096)         # the signal bytes; the flag is what matters
        elif fd == self.computed_fd:
            self.reply_computed()
        else:
            self.accept()

    def on_signal(self, signum, frame) -> None:
        self.stop_requested = True             # the loop notices after its epoll_wait returns

    def guarded(self, handler, conn, *args) -> None:
        """Run a connection's step; if it raises, ``failed`` decides what that costs."""
        try:
            handler(conn, *args)
        except Exception as exc:
            self.failed(conn, exc)

    def failed(self, conn: Connection, exc: Exception) -> None:
        """A socket error (reset, broken pipe) closes that connection; any other exception is a bug:
        one line on stderr, that connection is reset, and the loop serves on."""
        if isinstance(exc, OSError):
            if not conn.closed:
                self.close(conn)
            return
        print(f"conclab: epoll: a connection failed and was reset: {exc!r}", file=sys.stderr, flush=True)
        if not conn.closed:                    # a bug: it must cost one connection, not the server
            self.reset(conn)

    # -- timers -------------------------------------------------------------------------------
    def call_at(self, when: float, callback, conn=None) -> list:
        """Run ``callback()`` (or ``callback(conn)``, guarded) at ``when``; returns the entry, for ``cancel``."""
        entry = [when, next(self.seq), callback, conn]
        heapq.heappush(self.timers, entry)
        return entry

    def cancel(self, entry: list) -> None:
        """Make a timer entry a husk (no callback, no connection); rebuild the heap once husks are half of it."""
        entry[2] = entry[3] = None
        self.cancelled += 1
        if self.cancelled > len(self.timers) // 2:
            self.timers[:] = [live for live in self.timers if live[2] is not None]
            heapq.heapify(self.timers)
            self.cancelled = 0

    def poll_timeout(self) -> float:
        """Seconds until the next timer is due; -1 (no timers) waits for I/O or a signal."""
        return max(self.timers[0][0] - monotonic(), 0) if self.timers else -1

    def run_timers(self) -> None:
        """Run what is due now; timers pushed meanwhile wait one turn, after fresh I/O is read."""
        now, timers, fresh = monotonic(), self.timers, next(self.seq)
        while timers and timers[0][0] <= now and timers[0][1] < fresh:
            _, _, callback, conn = heapq.heappop(timers)
            if callback is None:
                self.cancelled -= 1
            elif conn is None:
                callback()
            else:
                self.guarded(callback, conn)

    def arm(self, conn: Connection, when: float) -> None:
        """Have ``check_deadline`` run by ``when``: an entry due sooner stays (the check re-arms), a later one goes."""
        timer = conn.timer
        if timer is not None:
            if timer[0] <= when:
                return
            self.cancel(timer)
        conn.timer = self.call_at(when, self.on_deadline, conn)

    def watch_deadline(self, conn: Connection) -> None:
        """Have a check due by the session's deadline (a frame that starts moves it sooner)."""
        if conn.waiting is None and conn.pending < 0:
            self.arm(conn, conn.session.deadline)

    def check_deadline(self, conn: Connection) -> None:
        """The connection's one deadline, lazily: it reads what is due now, and re-arms if that moved.

        A WORK wait is never expired (``work_done`` re-arms). While replies are in
        flight the connection is not idle: ``look`` watches them instead. Past the
        session's deadline with nothing in flight: the idle or frame timeout, told
        with an ERROR. The frame timeout is never deferred.
        """
        conn.timer = None
        if conn.waiting is not None:
            return
        now, session = monotonic(), conn.session
        if conn.pending < 0:
            if not session.expired(now):
                return self.watch_deadline(conn)   # moved later
            if session.closing or frame_expired(session, now) or not unsent(conn.fd):
                if not session.closing:
                    self.expire(conn, now)
                return self.settle(conn)           # closes once the ERROR is out
        elif not session.closing and frame_expired(session, now):
            self.expire(conn, now)                 # behind the replies in flight
        self.look(conn, now)

    def expire(self, conn: Connection, now: float) -> None:
        """The idle or frame timeout: the session counts it and says so (ERROR); the connection is done."""
        conn.expired = True
        self.write(conn, conn.session.expire(now))

    def look(self, conn: Connection, now: float) -> None:
        """Replies in flight (in ``out`` and in the kernel's send queue): have they moved since the last look?

        Their total shrinks as the peer takes them (and grows as new replies come):
        any change is progress. None for --idle-timeout: ``stalled``. All gone: the
        idle clock starts now, and a connection that is done closes. The next look
        comes soon after progress, then after as long as they have been stuck.
        """
        session = conn.session
        pending = len(conn.out) + unsent(conn.fd)
        if pending:
            if pending != conn.pending:
                conn.pending, conn.progress = pending, now
            elif now - conn.progress >= session.idle_timeout:
                return self.stalled(conn)
            wait = min(max(now - conn.progress, FIRST_LOOK), LAST_LOOK)
            return self.arm(conn, min(now + wait, conn.progress + session.idle_timeout))
        conn.pending = -1
        session.replied(now)
        self.settle(conn)                      # closes it if it is done
        if not conn.closed:
            self.watch_deadline(conn)

    def stalled(self, conn: Connection) -> None:
        """A reply made no progress for --idle-timeout: reset the connection, counted as an idle timeout
        (unless the session had timed out already: that was counted)."""
        if not conn.expired:
            self.stats.count("idle_timeouts")
        self.reset(conn)

    # -- connections: accept, read, answer, write -----------------------------------------------
    def accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except OSError as exc:             # EAGAIN: none left; ECONNABORTED & co: reported again
                if exc.errno in FD_EXHAUSTED:
                    self.epoll.modify(self.listener.fileno(), 0)
                    self.call_at(monotonic() + ACCEPT_BACKOFF, self.resume_accept)
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
        shared = self.shared
        conn = Connection(sock, open_session(self.config, self.stats, monotonic(),
                                             peer_ip(sock) if shared else "", shared))
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
        """One recv. The usual outcome, one reply that needs no wait with nothing queued before it, is
        sent here and then skips what would change nothing: the queue, and ``watch_deadline`` and
        ``settle`` while no frame is started and the connection stays as registered (complete frames
        only move the deadline later, and the timer armed for the earlier one re-arms when it fires)."""
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        session = conn.session
        if not data:
            session.eof()                      # EOF: answer what was asked, then close
            return self.pump(conn)
        now = monotonic()
        reply = None if conn.queue else session.echo(data, now)   # whole ECHO frames are their own reply
        if reply is None:
            requests = session.feed(data, now)
            if conn.queue or len(requests) != 1 or requests[0].io_s or requests[0].gated or \
                    (self.offload and requests[0].cpu_us):
                return self.enqueue(conn, requests)
            reply = requests[0].run(now)
        self.write(conn, reply)
        if conn.timer is None or session.frame_started is not None:
            self.watch_deadline(conn)
        if conn.out or session.closing or self.draining or conn.mask != EPOLLIN:
            self.settle(conn)

    def enqueue(self, conn: Connection, requests: list) -> None:
        """Queue requests behind those not yet answered, then answer what can be."""
        if conn.queue:
            conn.queue += requests
        elif requests:
            conn.queue = list(requests)
        self.pump(conn)

    def pump(self, conn: Connection) -> None:
        """Answer queued requests in order (a WORK starts a timer, the rest wait behind it)."""
        queue = conn.queue
        while queue and conn.waiting is None:
            request = queue[0]
            if request.gated:                  # its token is in Redis: ask, and answer once the reply is in
                verdict = self.store.ask(conn, request.key)
                if verdict is None:
                    conn.waiting = ASKING
                    break
                queue[0] = request = conn.session.admit(request, verdict, monotonic())
            if request.io_s:
                conn.waiting = self.call_at(monotonic() + request.io_s, self.on_work_done, conn)
            else:
                self.answer(conn, request)
        self.watch_deadline(conn)
        self.settle(conn)

    def answer(self, conn: Connection, request) -> None:
        """queue[0] waited what it had to: compute (request.run) and reply, or have the pool compute it."""
        if request.cpu_us and self.offload is not None:
            conn.waiting = COMPUTING
            self.offload.submit(request.cpu_us).add_done_callback(lambda future: self.on_computed(conn, future))
            return
        conn.queue.pop(0)
        self.write(conn, request.run(monotonic()))

    def on_verdict(self, conn: Connection, verdict) -> None:
        """The redis store decided on conn's queue[0] (from the store's reply, or its deadline)."""
        if not conn.closed:
            self.guarded(self.admitted, conn, verdict)

    def admitted(self, conn: Connection, verdict) -> None:
        conn.waiting = None
        conn.queue[0] = conn.session.admit(conn.queue[0], verdict, monotonic())
        self.pump(conn)

    def work_done(self, conn: Connection) -> None:
        """A WORK's wait is over: answer it, go on with what queued behind it."""
        conn.waiting = None
        self.answer(conn, conn.queue[0])
        self.pump(conn)

    def on_computed(self, conn: Connection, future) -> None:
        """The pool is done with conn's request (in the pool's manager thread): wake the loop, nothing more."""
        self.computed.append((conn, future))
        os.eventfd_write(self.computed_fd, 1)

    def reply_computed(self) -> None:
        """The eventfd: reply to each computed request (its connection still open), then serve its queue."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.computed_fd)
        while self.computed:
            conn, future = self.computed.popleft()
            if not conn.closed:
                self.guarded(self.computed_reply, conn, future)

    def computed_reply(self, conn: Connection, future) -> None:
        conn.waiting = None
        request = conn.queue.pop(0)
        self.offload.settle(future, request.cpu_us)
        self.write(conn, request.computed(monotonic()))
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
            conn.out = bytearray(memoryview(data)[sent:])
            self.watch_replies(conn)

    def watch_replies(self, conn: Connection) -> None:
        """Replies wait: from now on the deadline check watches them move (``look``)."""
        now = monotonic()
        if conn.pending < 0:
            conn.pending, conn.progress = 0, now
        self.arm(conn, now + FIRST_LOOK)

    def flush(self, conn: Connection) -> None:
        """EPOLLOUT: the kernel has room again; hand it what is queued."""
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            sent = 0
        if sent:
            del conn.out[:sent]
            if not conn.out:
                conn.out = NO_BYTES            # the emptied buffer goes: an idle connection holds none
        self.settle(conn)

    def settle(self, conn: Connection) -> None:
        """Close a connection that is done, else register exactly the events it now waits for.

        It reads only what it can take: not while a request waits (later ones queue
        in the kernel, as behind a sleeping thread), not once closing, and not while
        over OUTPUT_CAP of replies are unsent (a client that never reads costs a bound).
        """
        if conn.waiting is None and not conn.out:
            if conn.session.closing or (self.draining and not has_input(conn.sock)):
                return self.finish(conn)
        reading = conn.waiting is None and not conn.session.closing and len(conn.out) <= OUTPUT_CAP
        mask = (EPOLLIN if reading else 0) | (EPOLLOUT if conn.out else 0)
        if mask != conn.mask:
            self.epoll.modify(conn.fd, mask)
            conn.mask = mask

    def finish(self, conn: Connection) -> None:
        """Close a connection that is done, once the kernel has delivered its replies.

        Closed earlier, its FIN would queue behind them, and a peer that never
        reads would keep the socket in FIN-WAIT-1 with its data, the server
        long gone. So until then the deadline check watches them (and resets
        the connection if they stop moving for --idle-timeout).
        """
        if conn.pending < 0 and not unsent(conn.fd):
            return self.close(conn)
        self.watch_replies(conn)               # look soon: closed once they are out

    def reset(self, conn: Connection) -> None:
        """Close with RST (SO_LINGER 0): the kernel drops what is unsent and keeps nothing of the socket."""
        with contextlib.suppress(OSError):
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.close(conn)

    def close(self, conn: Connection) -> None:
        """Forget the connection and close its socket (a FIN once the kernel has sent what it holds)."""
        conn.closed = True
        self.conns.pop(conn.fd, None)
        with contextlib.suppress(OSError):
            self.epoll.unregister(conn.fd)
        for entry in (conn.timer, conn.waiting):
            if entry is not None and entry is not COMPUTING and entry is not ASKING:
                self.cancel(entry)             # the heap keeps no reference to it
        conn.session.close()                   # its buffer budget back, whatever ended it
        release(conn.sock, conn.session, self.stats)
        conn.sock = conn.session = conn.out = conn.queue = conn.waiting = conn.timer = None

    # -- graceful drain -------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Stop accepting; idle connections close now, the others after their replies."""
        self.draining = True
        self.call_at(monotonic() + self.config.drain_timeout, self.abort_the_rest)
        self.epoll.unregister(self.listener.fileno())
        self.listener.close()
        for conn in list(self.conns.values()):
            self.guarded(self.settle, conn)

    def abort_the_rest(self) -> None:
        """The drain deadline, one more timer: whatever is left is cut (and run() returns)."""
        left = list(self.conns.values())
        for conn in left:
            self.reset(conn)
        self.stats.aborted = len(left)


def frame_expired(session, now: float) -> bool:
    """Whether the frame timeout, not the idle one, has passed (replies in flight do not defer it)."""
    return session.frame_started is not None and now >= session.frame_started + session.frame_timeout


def has_input(sock) -> bool:
    """Bytes wait in the kernel's receive buffer (peeked, not consumed): the drain answers them."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False



def redis_store(*args, **options):
    """The redis store's client for this loop (servers/epoll_redis.py), imported only when one is used:
    a server without it keeps the smaller footprint the lab measures."""
    from .epoll_redis import RedisStore
    return RedisStore(*args, **options)
