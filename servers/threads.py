"""Thread per connection: the simplest model, and the one the others are measured against.

The main thread accepts; every connection gets its own OS thread that reads,
waits and writes with plain blocking calls. The code is as straightforward as
concurrency gets, and the kernel does all the scheduling. The costs are what
the lab measures: a stack per thread (8 MiB of *virtual* memory by default,
a few KiB resident), a kernel context switch per hand-off, and, in CPython,
one GIL that lets only one thread compute at a time.

WORK's wait releases the GIL, so other connections are served meanwhile. It is
a ``base.AbortableWait`` rather than ``time.sleep``: a thread cannot be
cancelled, and the drain deadline must be able to end a 10 s WORK.

Rate limiting (``--rate-limit``): the token bucket is in the connection's
``Session``, and only that connection's thread ever calls into it, so it needs
no lock: the state is per connection, and the connection is per thread. A
delayed request waits like WORK, holding only its own thread. A shared bucket
(docs/ratelimit.md): scope client with the memory store is a map of client
buckets per process under a lock; with a redis store the connection's thread
makes the round trip itself, blocking on ``BlockingBucketClient.take`` (a small
pool of connections per process, so one slow call holds up only its thread).

Deadlines are the kernel's (``base.KernelDeadlines``: SO_RCVTIMEO and
SO_SNDTIMEO), not Python's socket timeout, which would poll before every recv
and send and hand the GIL around twice more per request.

The write policy (docs/protocol.md section 3): a reply that makes no progress
for ``--idle-timeout`` ends the connection with a reset, counted in
``idle_timeouts``; one that makes progress is never cut. A client that stops
reading holds one read's replies and its thread until then. Replies the kernel
already took count too: a connection whose idle deadline passes while the
kernel still holds some waits for them as a blocked send would (the idle clock
restarts once they are out; stuck, it is reset), and a finished connection is
closed only once they are out (``base.deliver_or_reset``), so no socket outlives
its thread holding data for a peer that never reads.

The accept loop waits in a selector on the listener and on ``StopSignals``:
SIGTERM only sets a flag and wakes it, so no exception can interrupt a
connection half-handed to its thread. Out of fds (EMFILE), the listener leaves
the selector for ``ACCEPT_BACKOFF``: it stays readable, and retrying would spin
until a connection closes. Out of threads (``can't start new thread``, e.g.
under an address-space limit), the connection is shed ("server busy", counted
in ``connections_rejected``) and accepting pauses for ``THREAD_BACKOFF``, until
some connection's thread has ended.
"""
from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time

from .base import (ACCEPT_BACKOFF, FD_EXHAUSTED, TIMED_OUT, AbortableWait, ConnectionSet, KernelDeadlines,
                   StopSignals, announce, deliver_or_reset, drain, no_delay, release, reset, shed)
from .session import open_session, peer_ip, rejection, shared_limit

RECV_SIZE = 65536
ACCEPT_BATCH = 64              # accepts per wake-up of the accept loop, then the stop flag is looked at again
THREAD_BACKOFF = 0.05          # no thread to be had: stop accepting this long (a thread must end first)
NO_THREAD = (RuntimeError, MemoryError)   # what Thread.start() raises when the process cannot have one more


def serve(listener, config, stats) -> None:
    connections, wait = ConnectionSet(), AbortableWait()
    shared = shared_limit(config, stats, "BlockingBucketClient")   # a shared rate limit: this process's side

    def start(sock):
        threading.Thread(target=handle, args=(sock, config, stats, connections, wait, shared), daemon=True).start()

    accept_until_signalled(listener, config, stats, connections, start)
    stats.aborted = drain(listener, config, connections, wait)


def accept_until_signalled(listener, config, stats, connections, start) -> None:
    """Accept each connection and ``start`` its handler, until SIGTERM or SIGINT.

    ``start`` raising one of NO_THREAD means it could not take the connection:
    it is shed, and accepting pauses for THREAD_BACKOFF.
    """
    listener.setblocking(False)
    with StopSignals(config) as stop, selectors.DefaultSelector() as selector:
        selector.register(stop, selectors.EVENT_READ)
        selector.register(listener, selectors.EVENT_READ)
        announce(listener)                     # only now: a signal from here on stops the loop cleanly
        resume_at = 0.0                        # while not accepting: when to watch the listener again
        while True:
            timeout = max(resume_at - time.monotonic(), 0.0) if resume_at else None
            woken = selector.select(timeout)
            if any(key.fileobj is stop for key, _ in woken):
                stop.check()
            if stop.requested:
                return
            if resume_at:
                if time.monotonic() < resume_at:
                    continue
                selector.register(listener, selectors.EVENT_READ)
                resume_at = 0.0
            pause = accept_batch(listener, config, stats, connections, start, stop)
            if pause:
                selector.unregister(listener)  # it stays readable: selecting it now would spin
                resume_at = time.monotonic() + pause


def accept_batch(listener, config, stats, connections, start, stop) -> float:
    """Accept what is waiting (at most ACCEPT_BATCH); returns how long to stop accepting, or 0."""
    for _ in range(ACCEPT_BATCH):
        if stop.requested:
            return 0.0
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return 0.0
        except ConnectionAbortedError:
            continue                           # reset while it waited in the backlog
        except OSError as exc:
            if exc.errno not in FD_EXHAUSTED:
                raise
            return ACCEPT_BACKOFF              # out of fds: until a connection closes, a retry fails at once
        if not stats.try_open():
            reject(sock, config)
            continue
        connections.add(sock)
        try:
            start(sock)
        except NO_THREAD:
            connections.discard(sock)
            shed(sock, config, stats)
            return THREAD_BACKOFF
    return 0.0


def reject(sock, config) -> None:
    """Over the cap: "server busy", never waiting on the peer, and close."""
    with contextlib.suppress(OSError), sock:
        sock.send(rejection(config), socket.MSG_DONTWAIT)


def handle(sock, config, stats, connections, sleep=time.sleep, shared=None, deadlines=KernelDeadlines) -> None:
    """Serve one connection until it closes. ``sleep`` is the model's wait for WORK and rate-limit delays
    (threads: an AbortableWait; gevent: gevent.sleep); ``shared``: the process's side of a shared rate
    limit (session.shared_limit), whose redis store the thread asks itself, blocking; ``deadlines`` wraps
    sock's recv and sendall so they give up at the session's deadline (threads: the kernel's timers;
    gevent: a hub timer)."""
    session = open_session(config, stats, time.monotonic(), peer_ip(sock) if shared else "", shared)
    peer = deadlines(sock, session)            # sock's recv and sendall, giving up at the session's deadline
    no_delay(sock)
    expired = False                            # the session counted its own timeout
    # Read once per read with the GIL held: a local, not a module attribute. (Binding peer's and
    # session's methods too would save a little more, but costs ~200 B per idle connection.)
    monotonic = time.monotonic
    try:
        while not session.closing:
            try:
                data = peer.recv(RECV_SIZE)
            except TIMED_OUT:
                now = time.monotonic()
                if not session.expired(now) or still_delivering(sock, session, sleep):
                    continue                   # woken early, or it waited for replies still in the kernel
                expired = True
                peer.sendall(session.expire(now))
                break
            if not data:
                session.eof()
                break
            now = monotonic()
            reply = session.echo(data, now)    # the hot path: whole ECHO frames are their own reply
            if reply is not None:
                peer.sendall(reply)
            else:
                for request in session.feed(data, now):
                    if request.gated:          # its token is in Redis: a blocking round trip, in this thread
                        request = session.admit(request, shared.store.take(request.key), monotonic())
                    if request.io_s:
                        sleep(request.io_s)
                    peer.sendall(request.run(monotonic()))
            data = request = reply = None      # an idle connection keeps no reply (nor read) alive while it waits
        deliver_or_reset(sock, session.idle_timeout, sleep)   # close only once the replies are out
    except TIMED_OUT:                          # a reply made no progress for --idle-timeout (WriteStalled)
        if not expired:
            stats.count("idle_timeouts")
        reset(sock)
    except ConnectionAbortedError:             # the drain deadline ended a wait: nothing may linger
        reset(sock)
    except OSError:
        pass                                   # reset by the peer, or aborted by the drain
    finally:
        peer.close()
        session.close()                        # its buffer budget back, whatever ended it
        connections.discard(sock)
        release(sock, session, stats)


def still_delivering(sock, session, sleep) -> bool:
    """At the session's deadline: replies the kernel took and has not delivered yet are a reply in
    progress. Wait for them as a blocked send would (WriteStalled if they stop); once they are out,
    the idle clock restarts. False if there were none."""
    if not deliver_or_reset(sock, session.idle_timeout, sleep):
        return False
    session.replied(time.monotonic())
    return True
