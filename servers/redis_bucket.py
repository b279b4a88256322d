"""The token bucket kept in Redis: one bucket shared by every process and host.

``--rate-limit-store redis://HOST:PORT[/DB]`` (docs/protocol.md section 3,
docs/ratelimit.md) moves ``session.TokenBucket`` out of the process: its state
is one Redis HASH per bucket key (``tokens``, ``stamp``) and every
request takes its token by running ONE Lua script, ``BUCKET_SCRIPT``, which
reads, refills, takes and writes back in one step. Redis runs a script alone,
so two servers taking the last token at the same instant cannot both get it:
no lock, no WATCH/MULTI retry loop, one round trip per request.

The script's arithmetic is ``TokenBucket``'s, line for line and in the same
order (reject mode: ``available``; delay mode: ``take``, debt included), so a
shared bucket admits what one in-memory bucket would. In delay mode it answers
the wait counted from now: the bucket is shared, so the request before this one
may be another connection's, and a connection's own delayed requests are
sequenced by its session (``SharedSession.delayed``). Floats are stored with
``%.17g``, which a double survives exactly (Redis would format a Lua number
with 14 digits). The time is Redis's ``TIME``: one
clock for every host, so hosts whose clocks disagree still share one bucket
fairly. ``TIME`` is a wall clock: when it steps back past the bucket's last
refill, the script moves the refill time back with it (no time passed, and
the refill goes on from the new clock), a case ``TokenBucket``, on a monotonic
clock, never sees. A test may pass its own ``now`` (seconds) instead, to drive
the script like ``TokenBucket``. A bucket left alone expires (PEXPIRE) when it
would be full again: a new bucket is full, so forgetting it changes nothing,
and idle clients cost Redis no memory. A driven clock is not Redis's, so a
driven bucket sets no expiry. The script returns 1/0 in reject mode and the
wait in whole microseconds in delay mode.

Keys: ``conclab:bucket:<scope value>``; the value is, for
``--rate-limit-scope connection``, a connection id unique across processes and
hosts (host name, pid, a counter: ``new_connection_id``), and for ``client``,
the peer's IP address.

The client is our own, not the ``redis`` package: one sans-I/O RESP2 codec
(``command`` to encode, ``RespReader`` to decode; no socket, no clock, h11's
way) serves every concurrency model, so the models differ only in how they
wait for the reply, which is what the lab compares; and the epoll backend's
hand-written loop needs a non-blocking codec it can feed anyway. It is also a
few hundred lines with no dependency. ``BucketCall`` is the part every client
shares: the EVALSHA command for a key, the NOSCRIPT fallback (Redis forgets
scripts when it restarts: SCRIPT LOAD, then EVALSHA once more) and the reply's
``Verdict``. Two clients wrap it: ``BlockingBucketClient`` (a small pool of
sockets with a timeout, for threads and the pools) and ``AsyncBucketClient`` (an asyncio
Protocol with pipelined calls, for asyncio and uvloop); gevent uses the
blocking one given gevent's socket module and semaphore (``sockets``, ``semaphore``), and
the epoll loop drives the codec itself.

Failures. Every call has a deadline, ``CALL_TIMEOUT_S`` (50 ms: a loopback or
LAN round trip is well under a millisecond, so 50 ms means Redis is stalled,
not busy), covering connecting, the NOSCRIPT fallback and the reply. A call
that fails or times out gets the on-error verdict (``--rate-limit-on-error``,
default ``allow``: fail open, see ``DEFAULT_ON_ERROR``), is counted in
``failures``; the blocking client drops its connections (a late reply would
desynchronise it), the pipelining asyncio one keeps it unless it broke.
The next connect is tried at most once per ``RECONNECT_INTERVAL_S`` (100 ms);
calls in between get the on-error verdict at once, counted too, so a dead
Redis costs a request nothing but a clock read.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
import os
import socket
import _socket
import threading
import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

CALL_TIMEOUT_S = 0.050          # one request's whole dealing with Redis: connect, NOSCRIPT fallback, reply
RECONNECT_INTERVAL_S = 0.100    # at most one connection attempt per interval after a failure
DEFAULT_ON_ERROR = "allow"      # fail open: a Redis outage must not become an outage of the service
ON_ERROR_CHOICES = ("allow", "deny")
SCOPES = ("connection", "client")
MODES = ("delay", "reject")
KEY_PREFIX = "conclab:bucket:"
DEFAULT_PORT = 6379
RECV_SIZE = 65536
POOL_SIZE = 64                  # the blocking client's connections per process (calls in flight at most): go's
                                # redisMaxConns too, so the models differ in how they wait, not in how many may

# KEYS[1]: the bucket; ARGV: rate (tokens/s), burst, mode ("reject" or "delay"), [now: seconds, a driven clock].
# session.TokenBucket in Lua: _refill, then available (reject) or take (delay: the wait from now), in the same order.
BUCKET_SCRIPT = (Path(__file__).parent / "go" / "bucket.lua").read_text()   # the go server embeds the same file
BUCKET_SHA = hashlib.sha1(BUCKET_SCRIPT.encode()).hexdigest()


# ---------------------------------------------------------------- the RESP2 codec (sans-I/O)

class RespError(Exception):
    """An error reply (``-ERR ...``): a value the reader returns, not raises; ``kind`` is its first word."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def kind(self) -> str:
        return self.message.split(" ", 1)[0]

    def __eq__(self, other: object) -> bool:
        return type(other) is RespError and other.message == self.message

    def __hash__(self) -> int:
        return hash(self.message)

    def __repr__(self) -> str:
        return f"RespError({self.message!r})"


class RespProtocolError(ValueError):
    """The bytes are not RESP2: the stream cannot be trusted any more (drop the connection)."""


class _Incomplete(Exception):
    """The buffer ends inside a reply: wait for more bytes."""


def _bulk(value) -> bytes:
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        data = repr(value).encode()      # repr: the shortest text a float round-trips through
    else:
        raise TypeError(f"a Redis argument is bytes, str, int or float, not {type(value).__name__}")
    return b"$%d\r\n%s\r\n" % (len(data), data)


def command(*args) -> bytes:
    """One command as Redis reads it: an array of bulk strings (``command("PING") == b"*1\\r\\n$4\\r\\nPING\\r\\n"``)."""
    return b"*%d\r\n" % len(args) + b"".join(_bulk(arg) for arg in args)


def reply(value) -> bytes:
    """A reply as Redis writes it (the server side; tests and fake servers): str is a simple string,
    RespError an error, int an integer, bytes a bulk string, None nil, a list an array."""
    if isinstance(value, RespError):
        return b"-%s\r\n" % value.message.encode()
    if isinstance(value, str):
        return b"+%s\r\n" % value.encode()
    if isinstance(value, bool) or not isinstance(value, (int, bytes, list, tuple, type(None))):
        raise TypeError(f"no RESP2 reply for {type(value).__name__}")
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if value is None:
        return b"$-1\r\n"
    return b"*%d\r\n" % len(value) + b"".join(reply(item) for item in value)


class RespReader:
    """Bytes in, whole replies out, in order: ``feed`` keeps whatever part of a reply has arrived.

    Simple strings come out as str, errors as ``RespError`` values, integers as
    int, bulk strings as bytes, nil (bulk or array) as None, arrays as lists.
    Bytes that are not RESP2 raise ``RespProtocolError``.
    """

    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list:
        """Take ``data``; return the replies it completes (maybe none)."""
        self.buffer += data
        replies = []
        position = 0
        buffer = self.buffer
        while position < len(buffer):
            try:
                value, position_after = _parse(buffer, position)
            except _Incomplete:
                break
            replies.append(value)
            position = position_after
        if position:
            del buffer[:position]
        return replies


def _line(buffer: bytearray, position: int) -> tuple[bytes, int]:
    end = buffer.find(b"\r\n", position)
    if end < 0:
        raise _Incomplete
    return bytes(buffer[position:end]), end + 2


def _integer(text: bytes) -> int:
    try:
        return int(text)
    except ValueError:
        raise RespProtocolError(f"not a RESP integer: {text[:40]!r}") from None


def _parse(buffer: bytearray, position: int):
    """One reply starting at ``position``: (value, position after it); _Incomplete if it is not all here."""
    if position >= len(buffer):
        raise _Incomplete
    kind = buffer[position]
    text, position = _line(buffer, position + 1)
    if kind == 43:                                              # '+'
        return text.decode("utf-8", "replace"), position
    if kind == 45:                                              # '-'
        return RespError(text.decode("utf-8", "replace")), position
    if kind == 58:                                              # ':'
        return _integer(text), position
    if kind == 36:                                              # '$'
        length = _integer(text)
        if length < 0:
            return None, position
        end = position + length
        if len(buffer) < end + 2:
            raise _Incomplete
        if buffer[end:end + 2] != b"\r\n":
            raise RespProtocolError("a bulk string does not end with CRLF")
        return bytes(buffer[position:end]), end + 2
    if kind == 42:                                              # '*'
        count = _integer(text)
        if count < 0:
            return None, position
        items = []
        for _ in range(count):
            item, position = _parse(buffer, position)
            items.append(item)
        return items, position
    raise RespProtocolError(f"not a RESP2 reply type: {bytes([kind])!r}")


# ---------------------------------------------------------------- settings: URL, keys

class RedisAddress(NamedTuple):
    host: str
    port: int
    db: int = 0


def _quoted(text: str) -> str:
    """``text`` in double quotes, escaped as Go's %q does for the usual URLs: the go backend's words."""
    return json.dumps(text, ensure_ascii=False)


def parse_url(url: str) -> RedisAddress:
    """``redis://HOST:PORT[/DB]`` -> RedisAddress; ValueError with a one-line message otherwise."""
    usage = "expected redis://HOST:PORT[/DB]"
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ValueError(f"--rate-limit-store {_quoted(url)}: {usage}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"--rate-limit-store {_quoted(url)}: no user, password, query or fragment: {usage}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"--rate-limit-store {_quoted(url)}: the port is not a number from 0 to 65535") from None
    if not parts.hostname or port is None:
        raise ValueError(f"--rate-limit-store {_quoted(url)}: a host and a port are needed: {usage}")
    if port == 0:
        raise ValueError(f"--rate-limit-store {_quoted(url)}: port 0 is not a Redis port")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"--rate-limit-store {_quoted(url)}: the database is a number (redis://HOST:PORT/0)")
    return RedisAddress(parts.hostname, port, int(path) if path else 0)


_connection_ids = itertools.count(1)
_HOST = socket.gethostname()


def new_connection_id() -> str:
    """An id no other connection of any process or host has: host name, pid (read now: --procs forks), a counter."""
    return f"{_HOST}:{os.getpid()}:{next(_connection_ids)}"


def bucket_key(scope: str, peer_ip: str, connection_id: str) -> str:
    """The key of the bucket a request takes from: per connection, or per client (the peer's IP)."""
    if scope == "client":
        return KEY_PREFIX + peer_ip
    if scope == "connection":
        return KEY_PREFIX + connection_id
    raise ValueError(f"--rate-limit-scope {scope!r}: choose connection or client")


# ---------------------------------------------------------------- verdicts

class Verdict(NamedTuple):
    """What a request gets: admitted (after ``wait_s`` seconds) or not; ``store_failed``: the on-error rule gave it."""

    admitted: bool
    wait_s: float = 0.0
    store_failed: bool = False


ADMIT = Verdict(True)
REJECT = Verdict(False)


def verdict(script_reply: int, mode: str) -> Verdict:
    """The script's answer as a Verdict: reject mode 1 admit / 0 reject; delay mode the wait in microseconds."""
    if mode == "reject":
        return ADMIT if script_reply == 1 else REJECT
    return ADMIT if script_reply <= 0 else Verdict(True, script_reply / 1e6)


def on_error(policy: str) -> Verdict:
    """The verdict when Redis is unreachable or slow: ``allow`` admits at once (fail open), ``deny`` rejects."""
    if policy not in ON_ERROR_CHOICES:
        raise ValueError(f"--rate-limit-on-error {policy!r}: choose allow or deny")
    return Verdict(policy == "allow", 0.0, True)


class StoreError(Exception):
    """Redis answered something the bucket cannot use (an error other than NOSCRIPT, a wrong type)."""


class BucketCall:
    """The part of a call every client shares: what to send, and what a reply means.

    ``request(key, now)`` is the EVALSHA command; ``answer(reply)`` is the
    Verdict, or None for NOSCRIPT: send ``LOAD`` (SCRIPT LOAD), then the request
    once more. Anything else unusable raises StoreError. Sans-I/O: no socket, no clock.
    """

    LOAD = command("SCRIPT", "LOAD", BUCKET_SCRIPT)

    def __init__(self, rate: float, burst: float, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"--rate-limit-mode {mode!r}: choose delay or reject")
        if not rate > 0 or not burst >= 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate, self.burst, self.mode = rate, burst, mode

    def request(self, key: str, now: float | None = None) -> bytes:
        args = ["EVALSHA", BUCKET_SHA, 1, key, self.rate, self.burst, self.mode]
        return command(*args) if now is None else command(*args, now)

    def answer(self, value) -> Verdict | None:
        if isinstance(value, RespError):
            if value.kind == "NOSCRIPT":
                return None
            raise StoreError(f"redis: {value.message}")
        if not isinstance(value, int):
            raise StoreError(f"redis: the bucket script answered {value!r}, not an integer")
        return verdict(value, self.mode)

    @staticmethod
    def loaded(value) -> None:
        """Check SCRIPT LOAD's reply: the script's SHA1, as ours."""
        if value != BUCKET_SHA.encode():
            raise StoreError(f"redis: SCRIPT LOAD answered {value!r}")

    def select(self, db: int) -> bytes:
        return command("SELECT", db)


class Gate:
    """Reconnect at most once per interval: after a failure, ``may_try`` is false until the interval has passed."""

    __slots__ = ("clock", "interval", "not_before")

    def __init__(self, interval: float = RECONNECT_INTERVAL_S, clock=time.monotonic) -> None:
        self.interval, self.clock, self.not_before = interval, clock, 0.0

    def may_try(self) -> bool:
        return self.clock() >= self.not_before

    def failed(self) -> None:
        self.not_before = self.clock() + self.interval


class _Base:
    """Settings and counters the two clients share."""

    def __init__(self, url: str, rate: float, burst: float, mode: str = "delay",
                 on_error_policy: str = DEFAULT_ON_ERROR, timeout: float = CALL_TIMEOUT_S,
                 reconnect_interval: float = RECONNECT_INTERVAL_S) -> None:
        self.address = parse_url(url)
        self.call = BucketCall(rate, burst, mode)
        self.fallback = on_error(on_error_policy)
        self.timeout = timeout
        self.gate = Gate(reconnect_interval)
        self.failures = 0            # calls answered by the on-error rule (failed, timed out, or while waiting to reconnect)
        self.script_loads = 0        # NOSCRIPT fallbacks (Redis lost its script cache: a restart, SCRIPT FLUSH)
        self.calls = 0               # calls sent on a connection (EVALSHA round trips; the go side's count)
        self.connects = 0            # connection attempts (at most one per reconnect interval after a failure)
        self._count_lock = threading.Lock()

    def _failed(self) -> Verdict:
        with self._count_lock:
            self.failures += 1
        return self.fallback

    def _called(self) -> None:
        """A call goes out on a connection (rate_store_calls)."""
        with self._count_lock:
            self.calls += 1


# ---------------------------------------------------------------- the blocking client

class BlockingBucketClient(_Base):
    """Takes tokens over a small pool of sockets, blocking (threads, the pools; gevent with its sockets).

    Thread-safe. A call takes an idle connection, or opens one, and gives it
    back after its one round trip; at most ``pool_size`` calls are in flight
    (a semaphore), so at most that many connections are open, and one slow call
    holds up only itself, not every thread behind one lock (go's pool, smaller:
    a Python process has fewer threads to serve). Waiting for a slot counts in
    the call's deadline, so no caller waits more than ``timeout`` in all. A
    failed call closes its connection and the idle ones (they most likely
    failed with it) and shuts the reconnect gate. ``sockets`` (a module with
    ``socket``) and ``semaphore`` (a factory of bounded semaphores
    whose ``acquire`` takes a timeout) are the stdlib's unless given: gevent
    passes its own, so a waiting greenlet parks on the hub instead of blocking it.
    The address is resolved once, here, by the C socket module (``_socket``,
    which gevent does not patch), and a connection connects to the numbers:
    ``create_connection`` would look the name up on every connect, and gevent
    does a lookup in a pool of OS threads (its default resolver), which then
    stay in the process. Resolution that fails here is tried again at connect.
    """

    def __init__(self, url: str, rate: float, burst: float, mode: str = "delay", *,
                 sockets=socket, semaphore=threading.BoundedSemaphore, pool_size: int = POOL_SIZE,
                 **options) -> None:
        super().__init__(url, rate, burst, mode, **options)
        self._sockets = sockets
        self._slots = semaphore(pool_size)
        self._idle: list[tuple[socket.socket, RespReader]] = []   # open connections free for a call
        self._resolved = self._resolve()

    def take(self, key: str, now: float | None = None) -> Verdict:
        """One token from bucket ``key`` (``now``: a driven clock, for tests): the verdict, within the timeout."""
        deadline = time.monotonic() + self.timeout
        if not self._slots.acquire(timeout=self.timeout):
            return self._failed()
        try:
            try:
                connection = self._idle.pop()
            except IndexError:
                connection = self._connect(deadline)
                if connection is None:
                    return self._failed()
            self._called()
            try:
                answer = self._take(connection, key, now, deadline)
            except (OSError, StoreError, RespProtocolError):
                connection[0].close()
                self._drop()
                self.gate.failed()
                return self._failed()
            self._idle.append(connection)
            return answer
        finally:
            self._slots.release()

    def _take(self, connection, key, now, deadline) -> Verdict:
        request = self.call.request(key, now)
        answer = self.call.answer(_roundtrip(connection, request, deadline))
        if answer is None:                                  # NOSCRIPT: load it, then once more
            self.script_loads += 1
            self.call.loaded(_roundtrip(connection, BucketCall.LOAD, deadline))
            answer = self.call.answer(_roundtrip(connection, request, deadline))
            if answer is None:
                raise StoreError("redis: NOSCRIPT right after SCRIPT LOAD")
        return answer

    def _connect(self, deadline: float):
        """A new connection (and SELECT), or None: the gate is shut, or it failed (then the gate shuts)."""
        if not self.gate.may_try():
            return None
        with self._count_lock:
            self.connects += 1
        sock = None
        try:
            family, sockaddr = self._resolved or self._resolve() or (None, None)
            if family is None:
                raise OSError(f"redis: cannot resolve {self.address.host}")
            sock = self._sockets.socket(family, socket.SOCK_STREAM)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = (sock, RespReader())
            if self.address.db and _roundtrip(connection, self.call.select(self.address.db), deadline) != "OK":
                raise StoreError(f"redis: cannot SELECT {self.address.db}")
            return connection
        except (OSError, StoreError, RespProtocolError):
            if sock is not None:
                sock.close()
            self.gate.failed()
            return None

    def _resolve(self) -> tuple | None:
        """(family, socket address) of the store, looked up without gevent's resolver; None if it fails."""
        try:
            family, _, _, _, sockaddr = _socket.getaddrinfo(self.address.host, self.address.port, 0,
                                                            socket.SOCK_STREAM)[0]
        except OSError:
            return None
        return family, sockaddr

    def _drop(self) -> None:
        """Close the idle connections."""
        while True:
            try:
                sock, _ = self._idle.pop()
            except IndexError:
                return
            sock.close()

    def close(self) -> None:
        self._drop()


def _roundtrip(connection, data: bytes, deadline: float):
    """Send one command on a (socket, RespReader) and read its one reply, by ``deadline``."""
    sock, reader = connection
    sock.settimeout(max(deadline - time.monotonic(), 0.001))
    sock.sendall(data)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("redis: no reply within the timeout")
        sock.settimeout(left)
        chunk = sock.recv(RECV_SIZE)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        replies = reader.feed(chunk)
        if replies:
            return replies[0]                   # one request in flight: one reply


# ---------------------------------------------------------------- the asyncio client

class _RespProtocol(asyncio.Protocol):
    """One Redis connection on the event loop: calls are pipelined, replies matched to them in order."""

    def __init__(self) -> None:
        self.reader = RespReader()
        self.pending: collections.deque[asyncio.Future] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            replies = self.reader.feed(data)
        except RespProtocolError as exc:
            self.fail(exc)
            return
        for value in replies:
            if self.pending:
                future = self.pending.popleft()
                if not future.done():
                    future.set_result(value)

    def connection_lost(self, exc) -> None:
        self.fail(exc or ConnectionError("redis closed the connection"))

    def fail(self, exc: BaseException) -> None:
        self.closed = True
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(ConnectionError(str(exc)))
        if self.transport is not None:
            self.transport.close()

    def send(self, data: bytes) -> asyncio.Future:
        if self.closed:
            raise ConnectionError("redis connection closed")
        future = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        self.transport.write(data)
        return future


class AsyncBucketClient(_Base):
    """``BlockingBucketClient``'s contract on an event loop (asyncio, uvloop): ``await take(key)``.

    One connection per client, shared by every coroutine of the loop: calls are
    pipelined on it (Redis answers in order), so a thousand waiting requests
    need no thousand connections and no lock. A call that runs out of time
    leaves the connection open, unlike the blocking client's: its reply, when
    it comes, is matched to its (finished) future and dropped, so the calls
    behind it are not failed with it. A connection that breaks fails every
    call on it and shuts the gate.
    """

    def __init__(self, url: str, rate: float, burst: float, mode: str = "delay", **options) -> None:
        super().__init__(url, rate, burst, mode, **options)
        self._protocol: _RespProtocol | None = None
        self._connecting: asyncio.Future | None = None

    async def take(self, key: str, now: float | None = None) -> Verdict:
        """One token from bucket ``key``: the verdict, within the timeout."""
        protocol, connecting = self._protocol, self._connecting
        connected = protocol is not None and not protocol.closed
        if not connected and (connecting is None or connecting.done()) and not self.gate.may_try():
            return self._failed()
        try:
            async with asyncio.timeout(self.timeout):
                return await self._take(key, now)
        except TimeoutError:            # this call was slow: the connection stays, its late reply goes to no one
            return self._failed()
        except (OSError, StoreError, RespProtocolError):
            self._drop()
            self.gate.failed()
            return self._failed()

    async def _take(self, key, now) -> Verdict:
        protocol = await self._connection()
        self._called()
        request = self.call.request(key, now)
        answer = self.call.answer(await protocol.send(request))
        if answer is None:
            self.script_loads += 1
            self.call.loaded(await protocol.send(BucketCall.LOAD))
            answer = self.call.answer(await protocol.send(request))
            if answer is None:
                raise StoreError("redis: NOSCRIPT right after SCRIPT LOAD")
        return answer

    async def _connection(self) -> _RespProtocol:
        """The open connection, or a new one (one connect at a time: concurrent callers await the same)."""
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(_retrieve)     # a caller that timed out no longer awaits it
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _RespProtocol:
        """Connect (and SELECT), within one timeout of its own: it outlives a caller that gave up on it."""
        self.connects += 1
        try:
            async with asyncio.timeout(self.timeout):
                _, protocol = await asyncio.get_running_loop().create_connection(_RespProtocol, *self.address[:2])
                if self.address.db and await protocol.send(self.call.select(self.address.db)) != "OK":
                    protocol.fail(StoreError("SELECT failed"))
                    raise StoreError(f"redis: cannot SELECT {self.address.db}")
        except BaseException:
            self.gate.failed()
            raise
        self._protocol = protocol
        return protocol

    def _drop(self) -> None:
        if self._protocol is not None:
            self._protocol.fail(ConnectionError("dropped after a failed call"))
        self._protocol = None

    def close(self) -> None:
        self._drop()


def _retrieve(future: asyncio.Future) -> None:
    """Mark a finished connect's exception as seen (the caller that timed out reports the failure)."""
    if not future.cancelled():
        future.exception()
