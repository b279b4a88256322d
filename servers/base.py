"""What every Python backend shares outside the per-connection logic.

* ``open_listener``: bind and listen, with one-line errors instead of tracebacks;
* ``announce``: the contract's ``listening on HOST:PORT`` line, printed when ready;
* ``graceful_signals``: SIGTERM/SIGINT become a ``Shutdown`` exception in the
  main thread, for the models that block in ``accept()`` (threads, pools);
* ``ConnectionSet``: the live sockets of a blocking model, and the drain of
  docs/protocol.md section 4 done on them (shut the read side so idle readers
  wake up and busy ones stop after their reply, then abort what is left).
"""
from __future__ import annotations

import contextlib
import errno
import signal
import socket
import struct
import sys
import threading
import time

from .config import ServerConfig

LISTEN_BACKLOG = 4096          # the kernel caps it at net.core.somaxconn
DRAIN_POLL_INTERVAL = 0.01     # how often the drain looks whether everyone has left
ABORT_GRACE = 1.0              # after aborting, how long to wait for handlers to notice
ACCEPT_BACKOFF = 0.1           # out of fds (EMFILE): stop accepting this long; retrying at once would spin
FD_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}   # accept() errors that call for it
DEADLINE_SLACK = 0.01          # a kernel read timeout is re-armed only when it is off by more than this (seconds)
TIMED_OUT = (TimeoutError, BlockingIOError)   # a read's deadline passed: Python's socket timeout, or the kernel's (EAGAIN)


class StartupError(Exception):
    """The server cannot start; the message is shown to the user as one line."""


class Shutdown(Exception):
    """Raised in the main thread by SIGTERM or SIGINT."""


def open_listener(config: ServerConfig) -> socket.socket:
    """A listening TCP socket for config.host:config.port (IPv4 or IPv6)."""
    try:
        infos = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(LISTEN_BACKLOG)
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve --host {config.host!r}: {exc.strerror}") from None
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise StartupError(f"cannot listen on {config.host}:{config.port}: {reason}") from None
    return listener


def address_of(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def announce(listener: socket.socket) -> None:
    """Tell the world we serve: the one line scripts wait for."""
    print(f"listening on {address_of(listener)}", flush=True)


LEAKED: list = []   # --fault leak: connections "forgotten" open (fds or transports nobody will close)


def stop_signals(config: ServerConfig) -> tuple:
    """The signals that start the graceful drain; none under --fault hard-kill (the default action kills)."""
    return () if config.fault == "hard-kill" else (signal.SIGTERM, signal.SIGINT)


def release(sock, session, stats) -> None:
    """Close a finished connection and count it closed.

    Under --fault leak this is the classic bug: a connection whose peer closed
    first is never closed here, so it sits in CLOSE_WAIT holding its fd.
    """
    if session is not None and session.forget_to_close:
        LEAKED.append(sock.detach())    # the bare fd: no socket object (nor gevent's server) will close it
        return
    sock.close()
    stats.closed()


@contextlib.contextmanager
def graceful_signals(config: ServerConfig):
    """Within the block, SIGTERM and SIGINT raise Shutdown in the main thread."""
    def stop(signum, frame):
        raise Shutdown(signal.Signals(signum).name)
    previous = {sig: signal.signal(sig, stop) for sig in stop_signals(config)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ignore_signals() -> None:
    """Once draining, a second SIGTERM must not cut the drain short with a traceback."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def no_delay(sock) -> None:
    """Send small replies at once (no Nagle), as asyncio, uvloop and Go do by default."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def timeval(seconds: float) -> bytes:
    """struct timeval, as SO_RCVTIMEO and SO_SNDTIMEO take it."""
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


def send_timeout(sock, seconds: float) -> None:
    """A blocking send gives up (EAGAIN) after this long without progress: the kernel's timer, no poll()."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(seconds))


class KernelDeadlines:
    """A blocking socket's recv and sendall, with deadlines the kernel keeps (SO_RCVTIMEO, SO_SNDTIMEO).

    A Python socket timeout makes every recv and send ``poll()`` first: two more
    syscalls per request, and each one hands the GIL to another thread, which
    is most of what a thread costs per request. The kernel's own timeouts cost
    nothing per call. The receive timeout counts from each ``recv``, so it is
    set only when the time left until the session's deadline differs from the
    armed one (a frame started, or ended); a read woken early just reads
    again. Sends get the idle timeout once: a peer that stops reading is
    dropped after that long without progress.
    """

    __slots__ = ("sock", "session", "armed", "sendall")

    def __init__(self, sock, session) -> None:
        self.sock, self.session, self.armed = sock, session, -1.0
        self.sendall = sock.sendall
        send_timeout(sock, session.idle_timeout)

    def recv(self, size: int) -> bytes:
        seconds = self.session.timeout(time.monotonic())
        if abs(seconds - self.armed) > DEADLINE_SLACK:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(seconds))
            self.armed = seconds
        return self.sock.recv(size)

    def close(self) -> None:
        """Nothing to undo: the kernel's timers go with the socket."""


def abort(sock) -> None:
    """Close with RST at once (SO_LINGER 0): the end of the drain deadline."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)


class ConnectionSet:
    """The open connection sockets of a blocking model, and their graceful drain."""

    def __init__(self) -> None:
        self._sockets: set = set()
        self._lock = threading.Lock()

    def add(self, sock) -> None:
        with self._lock:
            self._sockets.add(sock)

    def discard(self, sock) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def __len__(self) -> int:
        return len(self._sockets)

    def snapshot(self) -> list:
        with self._lock:
            return list(self._sockets)

    def drain(self, timeout: float, sleep=time.sleep) -> int:
        """Wake idle readers, let busy ones finish, abort the rest at the deadline.

        Returns how many connections had to be aborted. ``sleep`` is the
        model's own (time.sleep for threads, gevent.sleep for greenlets).
        """
        for sock in self.snapshot():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)   # a blocked recv() returns b"" once the buffer is read
        if not self._wait_empty(timeout, sleep):
            left = self.snapshot()
            for sock in left:
                abort(sock)
            self._wait_empty(ABORT_GRACE, sleep)
            return len(left)
        return 0

    def _wait_empty(self, timeout: float, sleep) -> bool:
        end = time.monotonic() + timeout
        while self._sockets and time.monotonic() < end:
            sleep(DRAIN_POLL_INTERVAL)
        return not self._sockets


def warn(message: str) -> None:
    print(f"conclab: warning: {message}", file=sys.stderr, flush=True)
