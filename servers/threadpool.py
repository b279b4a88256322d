"""Thread pool: a fixed set of ThreadPoolExecutor threads shared by every connection.

``--workers`` bounds the threads (default: ThreadPoolExecutor's own,
``min(32, os.cpu_count() + 4)``), so memory and context switches stay bounded
however many clients come. What a worker is handed, ``--dispatch``, is the lesson:

* ``connection`` (default): the main thread accepts as in threads.py and submits
  each connection; a worker runs threads.py's ``handle`` for its whole life.
  Connections beyond ``workers`` wait in the executor's queue until some
  connection *closes*: head-of-line blocking; a few idle clients starve everyone.
* ``request``: one selector loop (the main thread) reads every connection and
  submits each *request*; a worker waits, computes and moves on. Idle
  connections cost no thread. The price: a thread hand-off per request, and
  bookkeeping for reply order (a connection's requests queue behind its one in the pool).

WORK's wait releases the GIL as in threads.py and is the same
``base.AbortableWait``: Python joins pool threads at exit, so the drain deadline
must be able to end a wait, or a 10 s WORK would outlive the server.

Rate limiting: each connection's token bucket is in its ``Session``. With
connection dispatch one worker owns the connection, bucket included, for its
whole life. With request dispatch the bucket is used only in ``Session.feed``,
which only the selector loop calls; a worker just waits the delay it was
handed (``Request.io_s``) like a WORK wait. One thread per bucket either way:
no lock. A shared bucket (docs/ratelimit.md): scope client with the memory
store is the process's map of client buckets, under a lock; with a redis store
the worker that runs the request (``answer``; with connection dispatch, the
connection's worker in ``threads.handle``) blocks on ``BlockingBucketClient.take``,
the process's one client, then ``SharedSession.admit`` gives the answer.

Writes, request dispatch: a worker never waits for a peer. The connection's
unsent replies (``Connection.out``) belong to the loop, which writes them
non-blocking while the selector reports the socket writable (EVENT_WRITE,
registered only while output is pending). A worker that has a reply for a
connection with nothing pending offers it to the kernel once, without waiting
(``MSG_DONTWAIT``): the usual small reply leaves at once, with no second
hand-off back to the loop; whatever the kernel does not take goes to ``out``
and the loop is woken to write it. So two clients that never read hold no
worker, and reply order holds: a connection's replies come from one worker at a
time, and none is sent directly while earlier ones wait in ``out``.

Limits, request dispatch: the loop stops reading a connection whose queue and
unsent output hold more than ``BACKLOG_CAP`` (replies plus bookkeeping) and reads
it again once they shrink, so a client that pipelines and never reads costs a
bounded amount. The write policy (docs/protocol.md section 3): output that makes
no progress for ``--idle-timeout`` (``base.stuck_for``: the kernel has sent the peer
nothing for that long, as the peer confirms) ends the connection with a reset, counted in ``idle_timeouts``; a
connection whose replies are still reaching a slow reader is never cut, and
a finished one is closed once the kernel has delivered them.

Signals only set a flag and wake the selector (``base.StopSignals``, for both
dispatches). Out of fds, the loop takes the listener out of the selector for
``ACCEPT_BACKOFF`` (connection dispatch uses threads.py's accept loop). A worker
that fails unexpectedly is reported on stderr, one line: with connection dispatch
by its future's done-callback, with request dispatch by the worker itself
(``RequestLoop.answer``, no callback per request), which also aborts that
connection, so nothing stays busy forever.
"""
from __future__ import annotations

import collections
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .base import (ACCEPT_BACKOFF, FD_EXHAUSTED, SENDING_STATES, AbortableWait, ConnectionSet, StopSignals, announce,
                   drain, no_delay, output_stalled, release, stuck_for, warn)
from .base import reset as reset_on_close
from .session import Request, open_session, peer_ip, shared_limit
from .threads import RECV_SIZE, accept_until_signalled, handle, reject

SWEEP_INTERVAL = 0.1       # request mode: how often the loop checks deadlines and stalled output, s
BACKLOG_CAP = 1 << 20      # request mode: stop reading a connection while its queue and output hold more than this
REQUEST_OVERHEAD = 128     # bytes a queued request holds beside its reply (the Request, its slot in the queue)
THREAD_NAME_PREFIX = "conclab-pool"
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


def serve(listener, config, stats) -> None:
    connections, wait = ConnectionSet(), AbortableWait()
    dispatch = serve_requests if config.dispatch == "request" else serve_connections
    shared = shared_limit(config, stats, "BlockingBucketClient")   # a shared rate limit: this process's side
    with ThreadPoolExecutor(config.workers, thread_name_prefix=THREAD_NAME_PREFIX) as pool:
        stats.aborted = dispatch(listener, config, stats, pool, connections, wait, shared)
        wait.abort()                       # leaving the block joins every worker


def serve_connections(listener, config, stats, pool, connections, wait, shared) -> int:
    """A worker per connection: threads.py's accept loop with submit() for Thread().start()."""
    def start(sock):
        future = submit(pool, handle, sock, config, stats, connections, wait, shared)
        if future is not None:
            future.add_done_callback(report)
    accept_until_signalled(listener, config, stats, connections, start)
    return drain(listener, config, connections, wait)


def serve_requests(listener, config, stats, pool, connections, wait, shared) -> int:
    """A worker per request; the main thread runs the selector loop until signalled, then drains."""
    with StopSignals(config) as stop:
        loop = RequestLoop(listener, config, stats, pool, connections, wait, stop, shared)
        with loop.selector:
            announce(listener)
            while not stop.requested:
                loop.poll(SWEEP_INTERVAL)
            loop.stop_accepting()
            return drain(listener, config, connections, wait, sleep=loop.poll,   # the loop keeps serving
                         at_deadline=loop.abort_all)


def submit(pool, fn, *args):
    """pool.submit, or None if it could not start a thread for the work (the process has no more).

    The executor queues the work before it starts a thread for it, so the work
    is not lost: a running worker takes it when it is free. Said once on stderr.
    """
    try:
        return pool.submit(fn, *args)
    except RuntimeError as exc:
        if not submit.warned:
            submit.warned = True
            warn(f"the pool could not start another worker ({exc}); work waits for a running one")
        return None


submit.warned = False


def report(future) -> None:
    """A worker's done-callback: an unexpected failure is one line on stderr (handlers catch socket errors)."""
    if not future.cancelled() and future.exception() is not None:
        exc = future.exception()
        warn(f"a pool worker failed: {type(exc).__name__}: {exc}")


def held(request: Request) -> int:
    """Memory a queued request holds: its reply and its bookkeeping (tiny rate-limited PINGs add up)."""
    return len(request.reply) + REQUEST_OVERHEAD


class Connection:
    """One client in request mode: its session, the requests waiting for its reply order, its unsent output."""

    __slots__ = ("sock", "session", "queue", "backlog", "out", "since", "lock", "busy", "done", "closed",
                 "failed", "counted", "following", "mask")

    def __init__(self, sock, session) -> None:
        self.sock, self.session = sock, session
        self.queue = []                     # requests received, not yet answered (a short list)
        self.backlog = 0                    # bytes queue and out hold (see held)
        self.out = bytearray()              # replies the kernel has not taken yet: the loop writes them
        self.since = 0.0                    # while out is pending: when it last made progress
        self.lock = threading.Lock()        # guards queue, backlog, out, the socket's sends, busy, done, closed
        self.busy = self.done = False       # busy: a worker answers the queue; done: close once all is out
        self.closed = self.failed = False   # failed: its worker died unexpectedly (abort it)
        self.counted = False                # its session counted a timeout already (a stall is not counted twice)
        self.following = False              # replies in the kernel, not yet delivered: the sweep follows them
        self.mask = READ                    # the events registered in the selector (0: not registered)


class RequestLoop:
    """The selector loop: accept, read, feed the session, hand requests to the pool, write what is left."""

    def __init__(self, listener, config, stats, pool, connections, wait, stop, shared=None) -> None:
        self.listener, self.config, self.stats, self.shared = listener, config, stats, shared
        self.pool, self.connections, self.wait, self.stop = pool, connections, wait, stop
        self.selector = selectors.DefaultSelector()
        listener.setblocking(False)
        self.selector.register(listener, READ, self.accept)
        self.selector.register(stop, READ, self.wakeup)
        self.conns: set[Connection] = set()
        self.inbox = collections.deque()       # connections workers want the loop to look at (settle)
        self.woken = False                     # a wake-up byte is on its way: workers need not send another
        self.next_sweep = time.monotonic() + SWEEP_INTERVAL
        self.accept_again = 0.0                # out of fds: when to watch the listener again

    # -- the loop (main thread) ------------------------------------------------------------------
    def poll(self, timeout: float) -> None:
        for key, events in self.selector.select(timeout):
            conn = key.data
            if conn.__class__ is not Connection:
                conn()                         # accept, or wakeup
                continue
            if events & WRITE:
                self.flush(conn)
            if events & READ and not conn.closed:
                self.read(conn)
        inbox = self.inbox
        while inbox:
            self.settle(inbox.popleft())
        now = time.monotonic()
        if now >= self.next_sweep:
            self.sweep(now)
            self.next_sweep = now + SWEEP_INTERVAL

    def wakeup(self) -> None:
        self.stop.check()                      # read the bytes first, then clear the flag: a notify in between
        self.woken = False                     # has its connection in the inbox, read after this; a later one
                                               # sends a byte again

    def notify(self, conn: Connection) -> None:
        """From a worker: have the loop settle conn (output to write, finished, or failed)."""
        self.inbox.append(conn)
        if not self.woken:
            self.woken = True
            self.stop.wake()

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
        no_delay(sock)
        self.connections.add(sock)
        shared = self.shared
        conn = Connection(sock, open_session(self.config, self.stats, time.monotonic(),
                                             peer_ip(sock) if shared else "", shared))
        self.conns.add(conn)
        self.selector.register(sock, READ, conn)

    def stop_accepting(self) -> None:
        if not self.accept_again:                      # else it is out of the selector already (EMFILE)
            self.selector.unregister(self.listener)

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
        if done or conn.backlog > BACKLOG_CAP:      # a client that does not read its replies: stop reading it
            self.settle(conn)

    def deliver(self, conn: Connection, requests: list, done: bool = False) -> None:
        """Queue requests behind conn's and have a worker answer them; done: read no more."""
        with conn.lock:
            conn.queue.extend(requests)
            conn.backlog += sum(map(held, requests))
            if done:
                conn.done = True
            start = not conn.busy and bool(conn.queue)
            if start:
                conn.busy = True
        if start:
            submit(self.pool, self.answer, conn)

    def flush(self, conn: Connection) -> None:
        """EVENT_WRITE: hand the kernel what it takes of conn's output, without waiting."""
        now, broken = time.monotonic(), False
        with conn.lock:
            sent = 0
            if not conn.closed and conn.out:
                try:
                    sent = conn.sock.send(conn.out, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
                except OSError:
                    broken = True                   # reset by the peer
                if sent:
                    del conn.out[:sent]
                    conn.backlog -= sent
                    conn.since = now
            emptied = not conn.out
        if broken:
            return self.close(conn, reset=True)
        if sent and emptied:
            conn.session.replied(now)               # the idle timeout counts from the last reply out
        self.settle(conn)

    def settle(self, conn: Connection) -> None:
        """Close conn once it is finished, else register exactly the events it now waits for."""
        if conn.closed:
            return
        if conn.failed:
            return self.close(conn, reset=True)
        with conn.lock:
            writing = bool(conn.out)
            finished = conn.done and not conn.busy and not conn.queue and not writing
        if finished:
            return self.finish(conn)
        reading = not conn.done and conn.backlog <= BACKLOG_CAP
        self.watch(conn, (READ if reading else 0) | (WRITE if writing else 0))

    def watch(self, conn: Connection, mask: int) -> None:
        if mask == conn.mask:
            return
        if not conn.mask:
            self.selector.register(conn.sock, mask, conn)
        elif not mask:
            self.selector.unregister(conn.sock)
        else:
            self.selector.modify(conn.sock, mask, conn)
        conn.mask = mask

    def finish(self, conn: Connection) -> None:
        """All answered and handed to the kernel: close once the kernel has delivered it (or it stalls)."""
        stalled = output_stalled(conn.sock)
        if stalled is None:
            return self.close(conn)
        if stalled >= conn.session.idle_timeout:
            return self.stalled(conn)
        conn.following = True                       # the sweep looks again
        self.watch(conn, 0)

    def follow(self, conn: Connection, now: float) -> None:
        """Replies the kernel holds for conn: wait until they are delivered (a finished connection then
        closes, an idle one restarts its idle clock), or reset conn once they are stuck for --idle-timeout."""
        stalled = output_stalled(conn.sock)
        if stalled is not None:
            if stalled >= conn.session.idle_timeout:
                self.stalled(conn)
            return
        conn.following = False
        if conn.done:
            self.settle(conn)
        else:
            conn.session.replied(now)

    def stalled(self, conn: Connection) -> None:
        """The write policy: output that made no progress for --idle-timeout ends with a reset, counted idle."""
        if not conn.counted:
            self.stats.count("idle_timeouts")
        self.close(conn, reset=True)

    def close(self, conn: Connection, reset: bool = False) -> None:
        with conn.lock:                             # a worker sends only under this lock, after looking at closed
            if conn.closed:
                return
            conn.closed = True
            conn.queue.clear()
            conn.out.clear()
            conn.backlog = 0
        self.watch(conn, 0)
        self.conns.discard(conn)
        if reset:
            reset_on_close(conn.sock)
        self.connections.discard(conn.sock)
        conn.session.close()                        # its buffer budget back, whatever ended it
        release(conn.sock, conn.session, self.stats)

    def sweep(self, now: float) -> None:
        """Watch the listener again after a backoff; read again from connections whose output caught up;
        judge stalled output; expire idle and slow-frame connections, never one with requests in progress."""
        if self.accept_again and now >= self.accept_again and not self.stop.requested:
            self.selector.register(self.listener, READ, self.accept)
            self.accept_again = 0.0
        for conn in list(self.conns):
            if conn.following:
                self.follow(conn, now)
            elif conn.out:
                if now - conn.since >= conn.session.idle_timeout:
                    self.judge_progress(conn, now)
            elif not conn.busy and not conn.done:
                if not conn.mask & READ:
                    self.settle(conn)               # paused, and caught up: read again
                if now >= conn.session.deadline:
                    self.expire(conn, now)

    def judge_progress(self, conn: Connection, now: float) -> None:
        """conn's output has not moved for --idle-timeout as far as the loop saw; the kernel knows better
        (it reports EVENT_WRITE only once a third of the buffer is free): how long has it been stuck?
        Until it has sent the peer something new, the next sweep asks again."""
        try:
            state, stuck, sent = stuck_for(conn.sock)
        except OSError:
            state, stuck, sent = 0, 0.0, 0.0
        if state not in SENDING_STATES:
            return self.close(conn, reset=True)     # the peer is gone
        if stuck >= conn.session.idle_timeout:
            return self.stalled(conn)
        conn.since = max(conn.since, now - sent)

    def expire(self, conn: Connection, now: float) -> None:
        """The session's deadline passed. Replies the kernel has not delivered yet are a reply in progress:
        follow them (stuck, it is a stall). Else ERROR, then close."""
        stalled = output_stalled(conn.sock)
        if stalled is not None:
            if stalled >= conn.session.idle_timeout:
                return self.stalled(conn)
            conn.following = True
            return
        conn.counted = True
        self.deliver(conn, [Request(conn.session.expire(now))], done=True)
        self.settle(conn)

    def abort_all(self) -> None:
        """The drain deadline (after ConnectionSet counted and aborted the sockets): close every connection."""
        for conn in list(self.conns):
            self.close(conn, reset=True)

    # -- the workers -------------------------------------------------------------------------------
    def answer(self, conn: Connection) -> None:
        """In a worker: answer conn's queue in order, offering each reply to the kernel (see send_locked).

        One lock hold per request: the reply to one goes out and the next is taken
        together. An unexpected failure is reported as a future's done-callback
        would (one line on stderr) and aborts conn, which would otherwise stay busy
        forever. It is caught here rather than by a callback on every request's
        future, which would add a call and two lock round trips to each request.
        """
        queue, lock, wait = conn.queue, conn.lock, self.wait
        request = reply = None
        try:
            while True:
                with lock:
                    pending = request is not None and self.send_locked(conn, request, reply)
                    if conn.closed or not queue:
                        conn.busy = False
                        tell = pending or conn.done or not conn.mask & READ   # write, close, or read again
                        break
                    request = queue.pop(0)
                if pending:
                    self.notify(conn)               # output pending: the loop writes it
                answered = request                  # (queued as it is: what send_locked gives back for it)
                if request.gated:                   # its token is in Redis: the worker blocks on the round trip
                    answered = conn.session.admit(request, self.shared.store.take(request.key), time.monotonic())
                if answered.io_s:
                    wait(answered.io_s)
                reply = answered.run(time.monotonic())
        except ConnectionAbortedError:              # the drain deadline ended a wait: the loop closes everything
            with lock:
                queue.clear()
                conn.busy = False
            return
        except Exception as exc:                    # noqa: BLE001 (anything: a bug must not leave conn busy)
            return self.failed(conn, exc)
        if tell:
            self.notify(conn)

    def send_locked(self, conn: Connection, request: Request, reply: bytes) -> bool:
        """Under conn.lock: send reply if nothing is pending before it, never waiting; keep the rest in
        conn.out. True if conn.out just became non-empty (the loop must start writing)."""
        conn.backlog -= held(request)
        if conn.closed:
            return False
        if conn.out:                                # the loop is writing earlier replies: queue behind them
            conn.out += reply
            conn.backlog += len(reply)
            return False
        try:
            sent = conn.sock.send(reply, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:                             # the peer is gone: answer nothing more, let the loop close
            conn.queue.clear()
            conn.backlog = 0
            conn.done = True
            return False
        if sent == len(reply):
            return False
        conn.out += memoryview(reply)[sent:]
        conn.backlog += len(reply) - sent
        conn.since = time.monotonic()
        return True

    def failed(self, conn: Connection, exc: BaseException) -> None:
        """A worker failed unexpectedly: one line on stderr, and conn is aborted."""
        warn(f"a pool worker failed answering a connection, which is aborted: {type(exc).__name__}: {exc}")
        with conn.lock:
            conn.failed = True
            conn.busy = False
            conn.queue.clear()
        self.notify(conn)
