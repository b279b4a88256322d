"""Thread pool: a fixed set of ThreadPoolExecutor threads shared by every connection.

``--workers`` bounds the threads (default: ThreadPoolExecutor's own,
``min(32, os.cpu_count() + 4)``), so memory and context switches stay bounded
however many clients come. What a worker is handed, ``--dispatch``, is the lesson:

* ``connection`` (default): the main thread accepts as in threads.py and submits
  each connection; a worker runs threads.py's ``handle`` for its whole life.
  Connections beyond ``workers`` wait in the executor's queue until some
  connection *closes*: head-of-line blocking; a few idle clients starve everyone.
* ``request``: one selector loop (the main thread) reads every connection and
  submits each *request*; a worker waits, computes, replies and moves on. Idle
  connections cost no thread. The price: a thread hand-off per request, and
  bookkeeping for reply order (a connection's requests queue behind its one in the pool).

WORK's wait releases the GIL as in threads.py but is an Event wait, not
``time.sleep``: Python joins pool threads at exit, so the drain deadline must
be able to end a wait, or a 10 s WORK would outlive the server.

Rate limiting: each connection's token bucket is in its ``Session``. With
connection dispatch one worker owns the connection, bucket included, for its
whole life. With request dispatch the bucket is used only in ``Session.feed``,
which only the selector loop calls; a worker just waits the delay it was
handed (``Request.io_s``) like a WORK wait. One thread per bucket either way:
no lock.

Limits, request dispatch: the loop stops reading a connection whose queue holds
more than ``BACKLOG_CAP`` (replies plus bookkeeping) and reads it again once its
worker catches up, so a client that pipelines and never reads costs a bounded
amount; the worker's blocking ``sendall`` times out (SO_SNDTIMEO) after
``--idle-timeout`` without progress. Out of fds,
the loop takes the listener out of the selector for ``ACCEPT_BACKOFF``
(connection dispatch uses threads.py's accept loop, which sleeps).
"""
from __future__ import annotations

import selectors
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .base import (ACCEPT_BACKOFF, FD_EXHAUSTED, ConnectionSet, abort, announce, ignore_signals, no_delay, release,
                   send_timeout, stop_signals)
from .session import Request, open_session
from .threads import RECV_SIZE, accept_until_signalled, handle, reject

SWEEP_INTERVAL = 0.1       # request mode: how often the loop checks deadlines and the stop flag, s
BACKLOG_CAP = 1 << 20      # request mode: stop reading a connection while its queue holds more bytes than this
REQUEST_OVERHEAD = 128     # bytes a queued request holds beside its reply (the Request, its slot in the queue)
THREAD_NAME_PREFIX = "conclab-pool"


class AbortableWait(threading.Event):
    """WORK's wait in a pool thread: a sleep (GIL released) that ``abort()`` at the drain deadline ends."""

    abort = threading.Event.set

    def __call__(self, seconds: float) -> None:
        if self.wait(seconds):
            raise ConnectionAbortedError("aborted at the drain deadline")


def serve(listener, config, stats) -> None:
    connections, wait = ConnectionSet(), AbortableWait()
    dispatch = serve_requests if config.dispatch == "request" else serve_connections
    with ThreadPoolExecutor(config.workers, thread_name_prefix=THREAD_NAME_PREFIX) as pool:
        stats.aborted = dispatch(listener, config, stats, pool, connections, wait)
        wait.abort()                       # leaving the block joins every worker


def serve_connections(listener, config, stats, pool, connections, wait) -> int:
    """A worker per connection: threads.py's accept loop with submit() for Thread().start()."""
    accept_until_signalled(listener, config, stats, connections,
                           lambda sock: pool.submit(handle, sock, config, stats, connections, wait))
    return drain(listener, config, connections, wait)


def serve_requests(listener, config, stats, pool, connections, wait) -> int:
    """A worker per request; the main thread runs the selector loop until signalled, then drains."""
    loop = RequestLoop(listener, config, stats, pool, connections, wait)
    for sig in stop_signals(config):
        signal.signal(sig, loop.stop)
    announce(listener)
    while not loop.stopping:
        loop.poll(SWEEP_INTERVAL)
    if not loop.accept_again:                      # else it is out of the selector already (EMFILE)
        loop.selector.unregister(listener)
    with loop.selector:
        return drain(listener, config, connections, wait, sleep=loop.poll)   # the loop keeps serving


def drain(listener, config, connections, wait, sleep=time.sleep) -> int:
    """Section 4 on the pool: ConnectionSet's drain, whose deadline also ends every WORK wait."""
    ignore_signals()
    listener.close()
    deadline = time.monotonic() + config.drain_timeout
    def pause(seconds: float) -> None:
        sleep(seconds)
        if time.monotonic() >= deadline:
            wait.abort()
    return connections.drain(config.drain_timeout, sleep=pause)


def held(request: Request) -> int:
    """Memory a queued request holds: its reply and its bookkeeping (tiny rate-limited PINGs add up)."""
    return len(request.reply) + REQUEST_OVERHEAD


class Connection:
    """One client in request mode: its session and the requests waiting for its reply order."""

    __slots__ = ("sock", "session", "queue", "backlog", "lock", "busy", "done")

    def __init__(self, sock, session) -> None:
        self.sock, self.session = sock, session
        self.queue = []                     # requests received, not yet answered (a short list)
        self.backlog = 0                    # bytes they hold (see held)
        self.lock = threading.Lock()        # guards queue, backlog, busy and done between loop and worker
        self.busy = self.done = False       # busy: a worker answers the queue; done: close once it is empty


class RequestLoop:
    """The selector loop: accept, read, feed the session, hand requests to the pool."""

    def __init__(self, listener, config, stats, pool, connections, wait) -> None:
        self.listener, self.config, self.stats = listener, config, stats
        self.pool, self.connections, self.wait = pool, connections, wait
        self.selector = selectors.DefaultSelector()
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ)
        self.next_sweep, self.stopping = time.monotonic() + SWEEP_INTERVAL, False
        self.paused: set[Connection] = set()   # not read until their worker catches up (BACKLOG_CAP)
        self.accept_again = 0.0                # out of fds: when to watch the listener again

    def stop(self, signum, frame) -> None:
        # Only a flag: a Shutdown raised mid-dispatch could strand a half-handed-over connection.
        self.stopping = True

    def poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                self.accept()
            else:
                self.read(key.data)
        now = time.monotonic()
        if now >= self.next_sweep:
            self.sweep(now)
            self.next_sweep = now + SWEEP_INTERVAL

    def accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno not in FD_EXHAUSTED:
                raise
            self.selector.unregister(self.listener)   # it stays readable: selecting it now would spin
            self.accept_again = time.monotonic() + ACCEPT_BACKOFF
            return
        if not self.stats.try_open():
            reject(sock, self.config)
            return
        send_timeout(sock, self.config.idle_timeout)   # bounds a worker's sendall to a client that never reads
        no_delay(sock)
        self.connections.add(sock)
        session = open_session(self.config, self.stats, time.monotonic())
        self.selector.register(sock, selectors.EVENT_READ, Connection(sock, session))

    def read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)   # readable; never block the loop anyway
        except BlockingIOError:
            return                                  # a spurious wake-up: nothing to read after all
        except OSError:
            data = b""                              # reset by the peer, or aborted by the drain
        if not data:
            conn.session.eof()
        requests = conn.session.feed(data, time.monotonic()) if data else []
        done = not data or conn.session.closing
        self.deliver(conn, requests, done)          # closing: ERROR is last
        if not done and conn.backlog > BACKLOG_CAP: # a client that does not read its replies: stop reading it
            self.selector.unregister(conn.sock)
            self.paused.add(conn)

    def sweep(self, now: float) -> None:
        """Read again from paused connections whose worker caught up; expire idle and slow-frame
        connections, never one with requests in progress."""
        if self.accept_again and now >= self.accept_again and not self.stopping:
            self.selector.register(self.listener, selectors.EVENT_READ)
            self.accept_again = 0.0
        for conn in [conn for conn in self.paused if conn.backlog <= BACKLOG_CAP]:
            self.paused.discard(conn)
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)
        for conn in [key.data for key in self.selector.get_map().values() if key.data is not None]:
            if not conn.busy and now >= conn.session.deadline:
                self.deliver(conn, [Request(conn.session.expire(now))], done=True)

    def deliver(self, conn: Connection, requests: list, done: bool = False) -> None:
        """Queue requests behind conn's; if done, read no more and close once all are answered."""
        if done:
            self.selector.unregister(conn.sock)
        with conn.lock:
            conn.queue.extend(requests)
            conn.backlog += sum(map(held, requests))
            conn.done = done
            if conn.busy:                           # the worker answering conn takes these too
                return
            conn.busy = start = bool(conn.queue)
        if start:
            self.pool.submit(self.answer, conn)
        elif done:
            self.close(conn)

    def answer(self, conn: Connection) -> None:
        """In a worker: answer conn's queue in order, then give conn back (or close it)."""
        sock, queue, lock, wait = conn.sock, conn.queue, conn.lock, self.wait
        while True:
            with lock:
                if not queue:
                    conn.busy, done = False, conn.done
                    break
                request = queue.pop(0)
                conn.backlog -= held(request)
            try:
                if request.io_s:
                    wait(request.io_s)
                sock.sendall(request.run(time.monotonic()))
            except OSError:                         # reset, unread for too long, or aborted
                with lock:
                    queue.clear()
                    conn.backlog = 0
                abort(sock)                         # the loop then reads EOF: done
        if done:
            self.close(conn)

    def close(self, conn: Connection) -> None:
        self.connections.discard(conn.sock)
        release(conn.sock, conn.session, self.stats)
