"""The redis rate-limit store driven by the epoll loop itself (servers/epoll.py; docs/ratelimit.md).

The epoll backend waits for nothing: its one thread must never block on Redis.
So the store is one non-blocking connection to Redis registered in the loop's
own epoll set, spoken to with servers/redis_bucket.py's sans-I/O codec
(``command`` bytes out, ``RespReader`` fed from non-blocking reads) and
``BucketCall`` (the EVALSHA, the NOSCRIPT fallback, the verdict). See
``RedisStore`` for the pipelining, the deadline and the reconnect rule, which
are the other clients' (``AsyncBucketClient`` is the closest).

Its own module, imported only when a redis store is configured: redis_bucket
brings asyncio along, a few MiB the epoll server otherwise never pays.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import socket
from select import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT
from time import monotonic

from . import redis_bucket


class Call:
    """One command sent to the redis store, in the order its reply will come: ``kind`` is "call" (an
    EVALSHA for ``conn``'s queue[0]), "load" (SCRIPT LOAD after a NOSCRIPT) or "select" (SELECT DB)."""

    __slots__ = ("kind", "conn", "key", "deadline", "retried", "done")

    def __init__(self, kind: str, conn=None, key: str = "", deadline: float = 0.0, retried: bool = False) -> None:
        self.kind, self.conn, self.key, self.deadline, self.retried = kind, conn, key, deadline, retried
        self.done = kind != "call"         # a call is done once its connection has its verdict


class RedisStore(redis_bucket._Base):
    """The redis store on the loop itself: one non-blocking connection to Redis in the same epoll set.

    The model's way to wait: nothing blocks. ``ask`` writes a call's EVALSHA
    (``BucketCall.request``) and returns; calls are pipelined on the one
    connection, and a FIFO of ``Call`` entries matches each reply, fed through
    the sans-I/O ``RespReader``, to the connection waiting for it
    (``Loop.on_verdict``). A NOSCRIPT reply sends SCRIPT LOAD and the call once
    more. The deadline (``CALL_TIMEOUT_S`` from ``ask``) is one timer on the
    loop's heap, at the earliest deadline still pending: a call past it gets
    the on-error verdict and its late reply, matched to its entry, is dropped
    (the asyncio client's rule: one slow call does not fail those behind it).
    A connection that breaks fails every call on it and shuts the gate: the
    next connect comes at most once per ``RECONNECT_INTERVAL_S``, and calls
    in between get the on-error verdict at once, as the other clients do.
    """

    def __init__(self, url: str, rate: float, burst: float, mode: str = "delay", *, loop, **options) -> None:
        super().__init__(url, rate, burst, mode, **options)
        self.loop = loop
        self.sock: socket.socket | None = None
        self.fd = -1
        self.reader = redis_bucket.RespReader()
        self.out = bytearray()             # bytes for Redis the kernel has not taken yet
        self.connecting = False            # the non-blocking connect is under way (EPOLLOUT says when done)
        self.pending: collections.deque[Call] = collections.deque()
        self.timer = None                  # the loop's timer entry for the earliest deadline pending

    def ask(self, conn, key: str):
        """Send conn's call for bucket ``key``: None (the verdict comes to ``loop.on_verdict``), or the
        on-error verdict at once if there is no connection and the gate forbids a new one."""
        if self.sock is None and not self._connect():
            return self._failed()
        self._called()
        call = Call("call", conn, key, monotonic() + self.timeout)
        self._send(call, self.call.request(key))
        if self.timer is None:
            self.timer = self.loop.call_at(call.deadline, self._on_deadline)
        return None

    def _connect(self) -> bool:
        if not self.gate.may_try():
            return False
        self.connects += 1
        try:
            family, kind, proto, _, address = socket.getaddrinfo(*self.address[:2], type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
        except OSError:
            self.gate.failed()
            return False
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        error = sock.connect_ex(address)
        if error not in (0, errno.EINPROGRESS):
            sock.close()
            self.gate.failed()
            return False
        self.sock, self.fd, self.reader, self.connecting = sock, sock.fileno(), redis_bucket.RespReader(), True
        self.loop.epoll.register(self.fd, EPOLLIN | EPOLLOUT)
        if self.address.db:
            self._send(Call("select"), self.call.select(self.address.db))
        return True

    def _send(self, call: Call, data: bytes) -> None:
        self.pending.append(call)
        self.out += data
        if not self.connecting:
            self._flush()

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            return self._broke()
        del self.out[:sent]
        self.loop.epoll.modify(self.fd, EPOLLIN | (EPOLLOUT if self.out else 0))

    def on_event(self, events: int) -> None:
        """The loop: Redis's socket is ready (connected, writable, readable or broken)."""
        if events & EPOLLOUT:
            if self.connecting:
                if self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    return self._broke()
                self.connecting = False
            self._flush()
        if self.sock is not None and events & (EPOLLIN | EPOLLHUP | EPOLLERR):
            self._read()

    def _read(self) -> None:
        try:
            data = self.sock.recv(redis_bucket.RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return self._broke()
        try:
            replies = self.reader.feed(data)
        except redis_bucket.RespProtocolError:
            return self._broke()
        for value in replies:
            call = self.pending.popleft()
            if call.kind == "call":
                self._answered(call, value)
            elif call.kind == "select" and value != "OK":
                return self._broke()
            if self.sock is None:            # broken meanwhile
                return

    def _answered(self, call: Call, value) -> None:
        """A call's reply: its verdict to its connection, or (NOSCRIPT) SCRIPT LOAD and the call again."""
        if call.done:
            return                           # it ran out of time: its connection had the on-error verdict
        try:
            verdict = self.call.answer(value)
        except redis_bucket.StoreError:      # an error reply for this call alone: the others go on
            return self._give(call, self._failed())
        if verdict is None:                  # NOSCRIPT: Redis lost its scripts (a restart)
            if call.retried:
                return self._give(call, self._failed())
            self.script_loads += 1
            self._send(Call("load"), redis_bucket.BucketCall.LOAD)
            self._send(Call("call", call.conn, call.key, call.deadline, retried=True), self.call.request(call.key))
            call.done = True
            return
        self._give(call, verdict)

    def _give(self, call: Call, verdict) -> None:
        call.done = True
        self.loop.on_verdict(call.conn, verdict)

    def _on_deadline(self) -> None:
        """The timer: every call past its deadline gets the on-error verdict; then the next deadline."""
        self.timer = None
        now = monotonic()
        for call in list(self.pending):
            if not call.done and call.deadline <= now:
                self._give(call, self._failed())
        waiting = [call.deadline for call in self.pending if not call.done]
        if waiting and self.timer is None:
            self.timer = self.loop.call_at(min(waiting), self._on_deadline)

    def _broke(self) -> None:
        """The connection broke: close it, shut the gate, and fail every call still waiting on it."""
        calls = list(self.pending)
        self._drop()
        self.gate.failed()
        for call in calls:
            if not call.done:
                self._give(call, self._failed())

    def _drop(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.loop.epoll.unregister(self.fd)
            self.sock.close()
        self.sock, self.fd, self.connecting = None, -1, False
        self.out.clear()
        self.pending.clear()

    def close(self) -> None:
        self._drop()
