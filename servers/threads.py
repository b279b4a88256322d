"""Thread per connection: the simplest model, and the one the others are measured against.

The main thread accepts; every connection gets its own OS thread that reads,
waits and writes with plain blocking calls. The code is as straightforward as
concurrency gets, and the kernel does all the scheduling. The costs are what
the lab measures: a stack per thread (8 MiB of *virtual* memory by default,
a few KiB resident), a kernel context switch per hand-off, and, in CPython,
one GIL that lets only one thread compute at a time.

WORK's wait is ``time.sleep``: it releases the GIL, so other connections are
served meanwhile.

Rate limiting (``--rate-limit``): the token bucket is in the connection's
``Session``, and only that connection's thread ever calls into it, so it needs
no lock: the state is per connection, and the connection is per thread. A
delayed request waits like WORK, in ``time.sleep``, holding only its own thread.

Deadlines are the kernel's (``base.KernelDeadlines``: SO_RCVTIMEO and
SO_SNDTIMEO), not Python's socket timeout, which would poll before every recv
and send and hand the GIL around twice more per request. A client that stops
reading holds one read's replies and its thread for ``--idle-timeout`` without
progress, and is dropped.

Out of fds (EMFILE), the accept loop sleeps ``ACCEPT_BACKOFF`` instead of
retrying at once: the listener stays readable, and retrying would spin until a
connection closes.
"""
from __future__ import annotations

import contextlib
import threading
import time

from .base import (ACCEPT_BACKOFF, FD_EXHAUSTED, TIMED_OUT, ConnectionSet, KernelDeadlines, Shutdown, announce,
                   graceful_signals, ignore_signals, no_delay, release)
from .session import open_session, rejection

RECV_SIZE = 65536


def serve(listener, config, stats) -> None:
    connections = ConnectionSet()

    def start(sock):
        threading.Thread(target=handle, args=(sock, config, stats, connections), daemon=True).start()

    accept_until_signalled(listener, config, stats, connections, start)
    ignore_signals()
    listener.close()
    stats.aborted = connections.drain(config.drain_timeout)


def accept_until_signalled(listener, config, stats, connections, start) -> None:
    """Accept each connection and ``start`` its handler, until SIGTERM or SIGINT."""
    announce(listener)
    with graceful_signals(config):
        try:
            while True:
                try:
                    sock, _ = listener.accept()
                except ConnectionAbortedError:
                    continue                   # reset while it waited in the backlog
                except OSError as exc:
                    if exc.errno not in FD_EXHAUSTED:
                        raise
                    time.sleep(ACCEPT_BACKOFF)  # out of fds: until a connection closes, a retry fails at once
                    continue
                if not stats.try_open():
                    reject(sock, config)
                    continue
                connections.add(sock)
                start(sock)
        except Shutdown:
            pass


def reject(sock, config) -> None:
    with contextlib.suppress(OSError), sock:
        sock.sendall(rejection(config))


def handle(sock, config, stats, connections, sleep=time.sleep, deadlines=KernelDeadlines) -> None:
    session = open_session(config, stats, time.monotonic())
    peer = deadlines(sock, session)            # sock's recv and sendall, giving up at the session's deadline
    no_delay(sock)
    try:
        while not session.closing:
            try:
                data = peer.recv(RECV_SIZE)
            except TIMED_OUT:
                now = time.monotonic()
                if not session.expired(now):
                    continue                   # woken early: the deadline moved since the timer was set
                peer.sendall(session.expire(now))
                break
            if not data:
                session.eof()
                break
            for request in session.feed(data, time.monotonic()):
                if request.io_s:
                    sleep(request.io_s)
                peer.sendall(request.run(time.monotonic()))
    except OSError:
        pass                                   # reset by the peer, or aborted by the drain
    finally:
        peer.close()
        connections.discard(sock)
        release(sock, session, stats)
