"""What every Python backend shares outside the per-connection logic.

* ``open_listener``: bind and listen, with one-line errors instead of tracebacks;
* ``announce``: the contract's ``listening on HOST:PORT`` line, printed when ready
  (a worker of ``--procs`` tells its parent instead, which prints the one line:
  servers/prefork.py);
* ``process_facts`` and ``final_counters``: what STATS and the final line say
  about the process besides the counters (``procs``, ``python``, ``gil``,
  ``switch_interval``);
* ``StopSignals``: SIGTERM/SIGINT only set a flag and wake a selector, for the
  models whose main thread waits for connections (threads, pools). Nothing is
  raised asynchronously: an exception raised by a signal handler can land
  anywhere, e.g. inside ``Thread.start()`` after the thread exists, and strand
  a connection without a handler;
* the write policy of docs/protocol.md section 3 (``KernelDeadlines.sendall``,
  ``output_stalled``): a reply that makes no progress for ``--idle-timeout``
  ends the connection with a reset, counted in ``idle_timeouts``;
* ``AbortableWait``: WORK's wait in a thread, which the drain deadline ends;
* ``ConnectionSet`` and ``drain``: the live sockets of a blocking model, and the
  drain of docs/protocol.md section 4 done on them (shut the read side so idle
  readers wake up and busy ones stop after their reply, then abort what is left).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import platform
import signal
import socket
import struct
import sys
import termios
import threading
import time

from .config import ServerConfig
from .session import rejection

LISTEN_BACKLOG = 4096          # the kernel caps it at net.core.somaxconn
DRAIN_POLL_INTERVAL = 0.01     # how often the drain looks whether everyone has left
ABORT_GRACE = 1.0              # after aborting, how long to wait for handlers to notice
ACCEPT_BACKOFF = 0.1           # out of fds (EMFILE): stop accepting this long; retrying at once would spin
FD_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}   # accept() errors that call for it
DEADLINE_SLACK = 0.01          # a kernel read timeout is re-armed only when it is off by more than this (seconds)
TIMED_OUT = (TimeoutError, BlockingIOError)   # a read's deadline passed: Python's socket timeout, or the kernel's (EAGAIN)


class StartupError(Exception):
    """The server cannot start; the message is shown to the user as one line."""


class WriteStalled(TimeoutError):
    """A reply made no progress for --idle-timeout: the connection ends with a reset (docs/protocol.md section 3)."""


def open_listener(config: ServerConfig, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A listening TCP socket for config.host:config.port (IPv4 or IPv6).

    ``reuse_port``: SO_REUSEPORT, one of several listeners on the port (--procs);
    ``listen=False``: only bound (it reserves the port and receives nothing).
    """
    try:
        infos = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(address)
        if listen:
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


_announce_to = None            # a --procs worker's callback: it tells its parent, which prints the one line


def announce_to(callback) -> None:
    """Make ``announce`` call ``callback()`` instead of printing (a worker of --procs)."""
    global _announce_to
    _announce_to = callback


def announce(listener: socket.socket) -> None:
    """Tell the world we serve: the one line scripts wait for."""
    if _announce_to is not None:
        _announce_to()
        return
    print(f"listening on {address_of(listener)}", flush=True)


def process_facts(config: ServerConfig) -> dict:
    """What this server process is, for STATS and the final line: --procs, the interpreter, its GIL,
    the rate limit's store and scope (as go shows them), and the GIL's switch interval (``sys._is_gil_enabled`` exists from CPython 3.13 on; before, there is a GIL)."""
    gil_enabled = getattr(sys, "_is_gil_enabled", None)
    return {"procs": config.procs, "python": platform.python_version(),
            "gil": True if gil_enabled is None else bool(gil_enabled()),
            "switch_interval": round(sys.getswitchinterval(), 6),      # CPython keeps it in whole microseconds
            "rate_limit_store": config.rate_store_label, "rate_limit_scope": config.rate_limit_scope}


def final_counters(stats) -> dict:
    """The final JSON line's object (docs/protocol.md section 4): every STATS key, and connections_aborted."""
    return {"event": "stopped", **stats.snapshot(), "connections_aborted": stats.aborted}


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


class StopSignals:
    """Within the block, SIGTERM and SIGINT set ``requested`` and wake a selector: nothing is raised.

    Register the object itself (its ``fileno``) in the main thread's selector.
    Python's C-level handler writes the signal's number to the socketpair
    (``signal.set_wakeup_fd``), which wakes the selector whichever thread the
    kernel delivered the signal to; ``check()`` reads those bytes, so a stop is
    seen as soon as the selector returns, before the Python-level handler has
    even run. Other threads may ``wake()`` the selector too (a byte 0, which is
    no signal). On leaving the block the stop signals are ignored: a second
    SIGTERM must not cut the drain that follows short.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.signals = stop_signals(config)
        self.numbers = frozenset(int(sig) for sig in self.signals)
        self.reader, self.writer = socket.socketpair()
        for sock in (self.reader, self.writer):
            sock.setblocking(False)
        self.requested = False
        self.previous_fd = -1

    def fileno(self) -> int:
        return self.reader.fileno()

    def __enter__(self) -> "StopSignals":
        self.previous_fd = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        for sig in self.signals:
            signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)
        signal.set_wakeup_fd(self.previous_fd)
        self.reader.close()
        self.writer.close()

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def wake(self) -> None:
        """Wake the selector from another thread (a closed pair after the block: nobody to wake)."""
        with contextlib.suppress(OSError):
            self.writer.send(b"\0")

    def check(self) -> bool:
        """Read what woke the selector; True once a stop signal came."""
        with contextlib.suppress(OSError):
            while True:
                data = self.reader.recv(4096)
                if not data:
                    break
                if not self.numbers.isdisjoint(data):
                    self.requested = True
        return self.requested


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def ignore_signals() -> None:
    """Once draining, a second SIGTERM must not cut the drain short with a traceback."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def then_ignore_signals():
    """Hold SIGTERM/SIGINT back while an event loop takes its handlers away, then ignore them.

    Taking a loop's handler away (asyncio's ``loop.close``, a gevent watcher's
    ``cancel``) puts back the default action, which kills: a second SIGTERM
    landing in that gap ended a cleanly drained server with -15 instead of 0.
    Blocked, such a signal waits; ignored before it is unblocked, it is dropped.
    (A signal mask is the calling thread's: these loops run in the main thread,
    and their servers start no other.)
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        ignore_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def no_delay(sock) -> None:
    """Send small replies at once (no Nagle), as asyncio, uvloop and Go do by default."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def timeval(seconds: float) -> bytes:
    """struct timeval, as SO_RCVTIMEO and SO_SNDTIMEO take it."""
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


def send_timeout(sock, seconds: float) -> None:
    """A blocking send gives up (EAGAIN) after this long without being woken: the kernel's timer, no poll()."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(seconds))


# -- the write policy: no progress for --idle-timeout ends a connection with a reset ----------------
# Progress is the kernel sending the peer new data. A blocked sender cannot see it: Linux wakes it
# (and reports EPOLLOUT) only once a third of the send buffer is free, which a slow but steady reader
# may take many seconds to free. So a stall is judged from the kernel's own record instead (stuck_for).
TCP_INFO_SIZE = 104                 # struct tcp_info up to the fields read here (and a little more)
TCPI_LAST_DATA_SENT = 44            # offset of tcpi_last_data_sent: ms since the kernel last sent the peer data
TCPI_LAST_ACK_RECV = 56             # offset of tcpi_last_ack_recv: ms since the peer last acknowledged anything
SENDING_STATES = {1, 8}             # TCP_ESTABLISHED, TCP_CLOSE_WAIT: states that still send the peer data
STALL_CHECK = 0.1                   # output pending and not moving: ask the kernel this often whether it is stuck


def stuck_for(sock) -> tuple[int, float, float]:
    """(TCP state, seconds this connection's pending output has provably been stuck, seconds since the
    kernel last sent the peer data): TCP_INFO.

    Stuck since the kernel last sent the peer data, as far as the peer has
    confirmed it. A reader that frees room is heard of only when its kernel
    advertises a window, which it does in steps (receiver-side silly-window
    avoidance: a sizeable part of its buffer at a time), so a slow reader's
    progress arrives in bursts, however steadily it reads. An acknowledgement
    after the last send that still left no room proves the time in between. A
    silent peer proves less: Linux rate-limits its answers to window probes,
    and the next probe is backed off, so silence counts at half weight (a peer
    that is gone is still judged, after twice the time).
    """
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    sent = struct.unpack_from("I", info, TCPI_LAST_DATA_SENT)[0] / 1000
    heard = struct.unpack_from("I", info, TCPI_LAST_ACK_RECV)[0] / 1000
    return info[0], min(sent, max(sent - heard, heard / 2)), sent


def output_stalled(sock) -> float | None:
    """None if the kernel holds no reply bytes the peer can still get; else how long they have been stuck.

    One ioctl (SIOCOUTQ) when nothing is pending, the usual case; TCP_INFO only
    when something is: after a reset the queue still counts bytes nobody will send.
    """
    try:
        if not struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]:
            return None
        state, stuck, _ = stuck_for(sock)
    except (OSError, ValueError):       # closed or reset under us: nothing left to deliver
        return None
    return stuck if state in SENDING_STATES else None


def deliver_or_reset(sock, idle_timeout: float, sleep=time.sleep) -> bool:
    """Wait while the kernel still delivers replies (as a blocked send would); raise WriteStalled if they stop.

    Before a close: a close with unsent data would leave the kernel holding the
    socket, the data and the peer (FIN-WAIT-1) for as long as the peer does not
    read; a reply that makes no progress for ``idle_timeout`` is reset instead
    (the caller resets it). Returns whether there was anything to wait for.
    """
    waited = False
    while True:
        stalled = output_stalled(sock)
        if stalled is None:
            return waited
        if stalled >= idle_timeout:
            raise WriteStalled("replies in the kernel made no progress for --idle-timeout")
        waited = True
        sleep(STALL_CHECK)


class KernelDeadlines:
    """A blocking socket's recv and sendall, with deadlines the kernel keeps (SO_RCVTIMEO, SO_SNDTIMEO).

    A Python socket timeout makes every recv and send ``poll()`` first: two more
    syscalls per request, and each one hands the GIL to another thread, which
    is most of what a thread costs per request. The kernel's own timeouts cost
    nothing per call. The receive timeout counts from each ``recv``, so it is
    set only when the time left until the session's deadline differs from the
    armed one (a frame started, or ended); a read woken early just reads
    again. The read that follows a reply, with no frame begun, needs no clock:
    the idle clock restarts at each reply (docs/protocol.md section 3), so the
    time left is the whole idle timeout, armed as it is (under load, reads
    after a GIL wait of more than DEADLINE_SLACK would otherwise re-arm it).

    Sends follow the write policy: a reply that makes no progress for
    ``--idle-timeout`` raises ``WriteStalled``. The usual reply leaves in one
    ``send``. A send that finds the buffer full blocks until the kernel wakes it
    or SO_SNDTIMEO (the idle timeout, set once) passes; the kernel wakes a
    blocked sender only once a third of its buffer is free, so a timeout is not
    yet a stall: the kernel is asked how long the output has been stuck
    (``stuck_for``), and again every STALL_CHECK while it is (SO_SNDTIMEO set
    that short until the reply is out).
    """

    __slots__ = ("sock", "session", "armed", "send", "answered")

    def __init__(self, sock, session) -> None:
        self.sock, self.session, self.armed = sock, session, -1.0
        self.send = sock.send
        self.answered = False               # a reply went out since the last recv
        send_timeout(sock, session.idle_timeout)

    def recv(self, size: int) -> bytes:
        session = self.session
        if self.answered and session.frame_started is None:
            seconds = session.idle_timeout  # the idle clock restarted with that reply: no clock to read
            stale = seconds != self.armed
        else:
            seconds = session.timeout(time.monotonic())
            stale = abs(seconds - self.armed) > DEADLINE_SLACK
        self.answered = False
        if stale:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(seconds))
            self.armed = seconds
        return self.sock.recv(size)

    def sendall(self, data: bytes) -> None:
        try:
            sent = self.send(data)
        except BlockingIOError:             # not woken for SO_SNDTIMEO: see _send_rest
            sent = 0
        if sent < len(data):
            self._send_rest(memoryview(data)[sent:])
        self.answered = True

    def _send_rest(self, view: memoryview) -> None:
        """The buffer was full. A send that returns short or fails with EAGAIN was not woken for SO_SNDTIMEO
        (what it took, it took before it slept): ask the kernel how long the output has been stuck, and from
        then on every STALL_CHECK (a stall is confirmed when the peer answers a window probe)."""
        idle = self.session.idle_timeout
        send_timeout(self.sock, STALL_CHECK)
        try:
            while True:
                _, stuck, _ = stuck_for(self.sock)
                if stuck >= idle:
                    raise WriteStalled("a reply made no progress for --idle-timeout")
                try:
                    sent = self.send(view)
                except BlockingIOError:
                    sent = 0
                if sent == len(view):
                    return
                view = view[sent:]
        finally:
            with contextlib.suppress(OSError):
                send_timeout(self.sock, idle)

    def close(self) -> None:
        """Nothing to undo: the kernel's timers go with the socket."""


def reset(sock) -> None:
    """Make the coming close() a reset (SO_LINGER 0): RST, unsent data dropped, nothing kept by the kernel."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def abort(sock) -> None:
    """Reset a connection another thread is blocked on (the drain deadline): SO_LINGER 0, and shut both
    ways so its blocked recv or send returns; its close then sends RST."""
    reset(sock)
    with contextlib.suppress(OSError):
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

    def drain(self, timeout: float, sleep=time.sleep, at_deadline=None) -> int:
        """Wake idle readers, let busy ones finish, abort the rest at the deadline.

        Returns how many connections had to be aborted. ``sleep`` is the
        model's own (time.sleep for threads, gevent.sleep for greenlets).
        ``at_deadline`` runs once the leftovers are counted and aborted (it ends
        the WORK waits: a handler woken earlier would leave uncounted).
        """
        for sock in self.snapshot():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)   # a blocked recv() returns b"" once the buffer is read
        if not self._wait_empty(timeout, sleep):
            left = self.snapshot()
            for sock in left:
                abort(sock)
            if at_deadline is not None:
                at_deadline()
            self._wait_empty(ABORT_GRACE, sleep)
            return len(left)
        return 0

    def _wait_empty(self, timeout: float, sleep) -> bool:
        end = time.monotonic() + timeout
        while self._sockets and time.monotonic() < end:
            sleep(DRAIN_POLL_INTERVAL)
        return not self._sockets


class AbortableWait:
    """WORK's wait (and a rate-limit delay) in a thread: a sleep, GIL released, that ``abort()`` ends.

    Threads cannot be cancelled, so without this a 10 s WORK would outlive the
    drain deadline (and Python joins pool threads at exit). Each wait sleeps on
    a lock of its own (``acquire`` with a timeout: one futex wait, like
    ``time.sleep``); ``abort`` releases every one of them, and they raise
    ConnectionAbortedError. One registry serves every thread: adding and
    removing a lock is O(1), unlike an Event's list of waiters.
    """

    def __init__(self) -> None:
        self.aborted = False
        self._lock = threading.Lock()
        self._sleepers: set = set()

    def __call__(self, seconds: float) -> None:
        gate = threading.Lock()
        gate.acquire()
        with self._lock:
            if not self.aborted:
                self._sleepers.add(gate)
        try:
            if not self.aborted:
                gate.acquire(timeout=seconds)
        finally:
            with self._lock:
                self._sleepers.discard(gate)
        if self.aborted:
            raise ConnectionAbortedError("aborted at the drain deadline")

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            gates, self._sleepers = self._sleepers, set()
        for gate in gates:
            gate.release()


def drain(listener, config: ServerConfig, connections: ConnectionSet, wait: AbortableWait,
          sleep=time.sleep, at_deadline=None) -> int:
    """Section 4 for the blocking models: stop accepting, ConnectionSet's drain, whose deadline also
    ends every WORK wait (``at_deadline`` too, if given); returns how many connections were aborted."""
    ignore_signals()
    listener.close()

    def deadline() -> None:
        wait.abort()
        if at_deadline is not None:
            at_deadline()
    return connections.drain(config.drain_timeout, sleep=sleep, at_deadline=deadline)


def shed(sock, config: ServerConfig, stats) -> None:
    """Turn away a connection admitted by ``stats.try_open`` that cannot be served after all (no thread
    to be had): "server busy" without waiting, close, and count it as the cap would have (rejected)."""
    with contextlib.suppress(OSError), sock:
        sock.send(rejection(config), socket.MSG_DONTWAIT)
    with stats.lock:
        stats.connections_active -= 1
        stats.connections_total -= 1
        stats.connections_rejected += 1


def warn(message: str) -> None:
    print(f"conclab: warning: {message}", file=sys.stderr, flush=True)
