"""Byte streams for differential checks: the same input to every variant, the replies compared.

A ``Stream`` is what one client sends on one connection: a list of ``Item``s
(each a frame, valid or malformed, with the reply the protocol promises for it,
docs/protocol.md section 1), cut into chunks sent with short pauses between
them, and an ending: a half-close (SHUT_WR, then read until the server's EOF)
or an abort (RST through SO_LINGER 0, ``abort_after`` seconds after the last
chunk). At most one item is malformed and it is the last one: the server sends
ERROR and closes after it, and bytes sent after that would only race the close
(or it is a frame cut short by the ending: no reply at all).

``send_stream`` plays one stream to one server and returns its ``Replies``;
``send_everywhere`` plays it to several at once (one connection each, in
threads). ``normalise`` makes replies comparable across variants (a STATS body
becomes a marker once it is checked); ``compare`` says whether the variants
agree with each other and with the protocol's own answer (``expected``), and
``report`` prints a stream and every variant's replies.

The test suite (tests/test_differential.py) builds streams with hypothesis;
``random_stream`` builds them from a ``random.Random`` so a command line can use
the same runner without hypothesis. Every wait here is bounded by a deadline.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import selectors
import socket
import struct
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

from conclab.servers.protocol import (ECHO, ERROR, HEADER, MAX_PING_PAYLOAD, OP_NAMES, PING, PONG, STATS, WORK,
                                      FrameDecoder, ProtocolError, encode, encode_work)

HALF_CLOSE = "half-close"
ABORT = "abort"
READ_TIMEOUT_S = 10.0          # one stream, from connect to the server's EOF
RECV_SIZE = 1 << 16

# The counters every STATS reply must carry (docs/protocol.md section 1).
STATS_KEYS = frozenset({"backend", "pid", "connections_active", "connections_total", "connections_rejected",
                        "requests_total", "bytes_in", "bytes_out", "idle_timeouts", "protocol_errors"})
STATS_MARK = b"<stats>"        # a STATS body that parsed and had the keys; its numbers differ by nature


# -- what a client sends ---------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class Item:
    """One frame on the wire and the reply the protocol promises for it.

    ``reply`` is (op, payload) for a valid request (STATS: ``STATS_MARK``),
    (ERROR, a regular expression the reason must match) for a malformed one,
    after which the server closes (``closes``), or None for a frame cut short
    by the end of the stream. ``kind`` names the op or the
    way the frame is malformed; ``label`` adds what it carries.
    """
    kind: str
    label: str
    data: bytes
    reply: tuple | None
    closes: bool = False

    def __repr__(self) -> str:                  # the label, not the bytes (a failure prints every item)
        return f"<{self.label}>"

    def _repr_pretty_(self, printer, cycle) -> None:   # hypothesis prints a dataclass by fields unless told so
        printer.text(repr(self))


def _show(payload: bytes, limit: int = 12) -> str:
    """A payload in a few characters: its size, its first bytes, and a digest when it is longer."""
    if len(payload) <= limit:
        return repr(payload)
    digest = hashlib.blake2b(payload, digest_size=3).hexdigest()
    return f"{len(payload)} B {payload[:limit]!r}.. #{digest}"


def echo(payload: bytes) -> Item:
    return Item("ECHO", f"ECHO {_show(payload)}", encode(ECHO, payload), (ECHO, payload))


def ping(ident: bytes) -> Item:
    assert len(ident) <= MAX_PING_PAYLOAD
    return Item("PING", f"PING {_show(ident)}", encode(PING, ident), (PONG, ident))


def work(io_us: int, cpu_us: int = 0, data: bytes = b"") -> Item:
    frame = encode_work(io_us, cpu_us, data)
    return Item("WORK", f"WORK io {io_us} us cpu {cpu_us} us {_show(data)}", frame, (WORK, frame[5:]))


def stats() -> Item:
    return Item("STATS", "STATS", encode(STATS), (STATS, STATS_MARK))


# The malformed frames: the reasons are docs/protocol.md's (section 1), as regular expressions.
def bad_length(length: int, max_frame: int) -> Item:
    """A bare header whose length is 0 or above max_frame: ERROR as soon as its 4 bytes arrive."""
    assert length == 0 or length > max_frame
    return Item("bad length", f"bad length {length}", HEADER.pack(length),
                (ERROR, rf"frame length {length} outside 1\.\.{max_frame}"), closes=True)


def unknown_op(op: int, payload: bytes = b"") -> Item:
    assert op not in (ECHO, PING, WORK, STATS)
    return Item("unknown op", f"unknown op 0x{op:02x} {_show(payload)}", encode(op, payload),
                (ERROR, re.escape(f"unknown op 0x{op:02x}")), closes=True)


def short_work(payload: bytes) -> Item:
    assert len(payload) < 8
    return Item("short WORK", f"short WORK {_show(payload)}", encode(WORK, payload),
                (ERROR, rf"WORK payload is {len(payload)} bytes\b.*"), closes=True)


def long_ping(ident: bytes) -> Item:
    assert len(ident) > MAX_PING_PAYLOAD
    return Item("long PING", f"long PING {_show(ident)}", encode(PING, ident),
                (ERROR, rf"PING payload is {len(ident)} bytes\b.*"), closes=True)


def truncated(item: Item, keep: int) -> Item:
    """The first ``keep`` bytes of a valid frame, and no more: no reply, whatever the ending."""
    assert not item.closes and 0 < keep < len(item.data)
    return Item("truncated", f"truncated {item.label}: {keep} of {len(item.data)} B", item.data[:keep], None,
                closes=True)


@dataclass(frozen=True)
class Stream:
    """Items, cut into chunks at ``cuts`` (offsets into ``data``), a pause after each chunk but the last."""
    items: tuple
    cuts: tuple = ()
    pauses: tuple = ()             # seconds, one per cut
    ending: str = HALF_CLOSE
    abort_after: float = 0.0       # ABORT: seconds from the last chunk to the RST

    def __post_init__(self) -> None:
        if any(item.closes for item in self.items[:-1]):
            raise ValueError("only the last item may be malformed")
        if list(self.cuts) != sorted(set(self.cuts)) or any(not 0 < c < len(self.data) for c in self.cuts):
            raise ValueError(f"cuts must be increasing offsets inside the data: {self.cuts}")
        if len(self.pauses) != len(self.cuts):
            raise ValueError("one pause per cut")
        if self.ending not in (HALF_CLOSE, ABORT):
            raise ValueError(f"ending must be {HALF_CLOSE!r} or {ABORT!r}")

    @property
    def data(self) -> bytes:
        return b"".join(item.data for item in self.items)

    def chunks(self) -> list[bytes]:
        data, points = self.data, [0, *self.cuts, len(self.data)]
        return [data[a:b] for a, b in zip(points, points[1:]) if b > a]

    def expected(self) -> list[tuple]:
        """The replies the protocol promises, in order (a malformed item's: op ERROR, reason pattern)."""
        return [item.reply for item in self.items if item.reply is not None]

    def describe(self) -> str:
        chunks = self.chunks()
        steps = []
        for i, chunk in enumerate(chunks):
            steps.append(f"{len(chunk)} B")
            if i < len(self.pauses):
                steps.append(f"pause {self.pauses[i] * 1e3:.1f} ms")
        ending = self.ending if self.ending == HALF_CLOSE else f"abort (RST) {self.abort_after * 1e3:.1f} ms after"
        lines = [f"stream: {len(self.items)} frames, {len(self.data)} B in {len(chunks)} chunks, then {ending}"]
        lines += [f"  [{i}] {item.label}" for i, item in enumerate(self.items)]
        lines.append("  sent as: " + ", ".join(steps) if steps else "  sent as: nothing")
        return "\n".join(lines)


def random_stream(rng: random.Random, max_frame: int, max_items: int = 8, max_echo: int = 4096) -> Stream:
    """A stream drawn from ``rng`` with the shapes the test suite's hypothesis strategy makes (no shrinking)."""
    def valid() -> Item:
        kind = rng.randrange(4)
        if kind == 0:
            return echo(rng.randbytes(rng.choice([0, 1, rng.randrange(64), rng.randrange(max_echo + 1)])))
        if kind == 1:
            return ping(rng.randbytes(rng.randrange(MAX_PING_PAYLOAD + 1)))
        if kind == 2:
            return work(rng.randrange(2001), 0, rng.randbytes(rng.randrange(33)))
        return stats()

    def bad() -> Item:
        kind = rng.randrange(5)
        if kind == 0:
            return bad_length(rng.choice([0, max_frame + 1, 2**32 - 1]), max_frame)
        if kind == 1:
            return unknown_op(rng.choice([0x00, PONG, 0x06, 0x42, 0xFE, ERROR]), rng.randbytes(rng.randrange(9)))
        if kind == 2:
            return short_work(rng.randbytes(rng.randrange(8)))
        if kind == 3:
            return long_ping(rng.randbytes(rng.randrange(MAX_PING_PAYLOAD + 1, 2 * MAX_PING_PAYLOAD)))
        whole = valid()
        return truncated(whole, rng.randrange(1, len(whole.data)))

    items = [valid() for _ in range(rng.randrange(max_items + 1))]
    if rng.random() < 0.4:
        items.append(bad())
    size = sum(len(item.data) for item in items)
    cuts = sorted({rng.randrange(1, size) for _ in range(rng.randrange(6))}) if size > 1 else []
    pauses = [rng.choice([0.0, 0.001, 0.003]) for _ in cuts]
    ending = ABORT if rng.random() < 0.2 else HALF_CLOSE
    return Stream(tuple(items), tuple(cuts), tuple(pauses), ending, rng.choice([0.0, 0.002]) if ending == ABORT else 0.0)


# -- playing a stream to a server ------------------------------------------------------------------
@dataclass
class Replies:
    """What one server sent back on one connection, and how the connection ended.

    ``ending``: "eof" (the server closed), "reset" (RST from the server),
    "aborted" (we sent the RST first), "timeout" (still open at the deadline),
    "garbage" (bytes that are no frame), "refused" (no connection), or
    "failed (...)" (another socket error).
    ``received``: every byte that came; ``leftover``: those of an incomplete
    last frame. ``send_error``: a send that failed (the server had closed;
    timing-dependent, so never compared).
    """
    frames: list = field(default_factory=list)
    ending: str = "eof"
    received: int | None = None                # None: as many as the frames hold
    send_error: str | None = None

    @property
    def leftover(self) -> int:
        if self.received is None:
            return 0
        return self.received - sum(5 + len(payload) for _op, payload in self.frames)


def send_stream(address, stream: Stream, timeout: float = READ_TIMEOUT_S) -> Replies:
    """Play ``stream`` on a new connection to ``address``; read the replies until the server closes."""
    replies = Replies(received=0)
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as exc:
        replies.ending, replies.send_error = "refused", f"connect: {exc}"
        return replies
    decoder = FrameDecoder(max_frame=2**32 - 1)        # a client takes whatever length a server sends
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # a chunk leaves when it is sent
        sock.setblocking(False)
        replies.ending = _play(sock, stream, decoder, replies, deadline)
    finally:
        if replies.ending != "aborted":
            sock.close()
    return replies


def _play(sock, stream: Stream, decoder: FrameDecoder, replies: Replies, deadline: float) -> str:
    chunks, pauses = stream.chunks(), list(stream.pauses)
    out = memoryview(b"")
    next_at = time.monotonic()                   # when the next chunk may go
    abort_at = None
    sending = True
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            if sending and not out and chunks and now >= next_at:
                out = memoryview(chunks.pop(0))
            if sending and out:
                try:
                    sent = sock.send(out)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:           # the server closed: read what it sent
                    replies.send_error, sending, out = f"send: {exc}", False, memoryview(b"")
                    sent = 0
                out = out[sent:]
                if sending and not out:
                    next_at = time.monotonic() + (pauses.pop(0) if pauses else 0.0)
            if sending and not out and not chunks:
                sending = False
                if stream.ending == HALF_CLOSE:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
                else:
                    abort_at = time.monotonic() + stream.abort_after
            now = time.monotonic()
            if abort_at is not None and now >= abort_at:
                _drain_ready(sock, decoder, replies)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                return "aborted"
            if now >= deadline:
                return "timeout"
            wake = deadline
            if abort_at is not None:
                wake = min(wake, abort_at)
            if sending and not out and chunks:
                wake = min(wake, next_at)
            selector.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if sending and out else 0))
            for _key, events in selector.select(max(wake - now, 0.0)):
                if events & selectors.EVENT_READ:
                    ended = _receive(sock, decoder, replies)
                    if ended:
                        return ended


def _receive(sock, decoder: FrameDecoder, replies: Replies) -> str | None:
    """Read once: None, or how the connection ended."""
    try:
        data = sock.recv(RECV_SIZE)
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return "reset"
    except OSError as exc:
        return f"failed ({exc})"
    if not data:
        return "eof"
    replies.received += len(data)
    try:
        replies.frames.extend(decoder.feed(data))
    except ProtocolError:
        return "garbage"
    return None


def _drain_ready(sock, decoder: FrameDecoder, replies: Replies) -> None:
    """Before an abort: take what already arrived (it was sent before the RST)."""
    while True:
        try:
            data = sock.recv(RECV_SIZE)
            if not data:
                return
            replies.received += len(data)
            replies.frames.extend(decoder.feed(data))
        except (OSError, ProtocolError):      # BlockingIOError: nothing more has arrived
            return


def send_everywhere(addresses: dict, stream: Stream, pool: Executor, timeout: float = READ_TIMEOUT_S) -> dict:
    """{name: Replies}: ``stream`` played to every address at once, one connection each."""
    futures = {name: pool.submit(send_stream, address, stream, timeout) for name, address in addresses.items()}
    return {name: future.result() for name, future in futures.items()}


# -- comparing replies -----------------------------------------------------------------------------
def stats_mark(body: bytes, backend: str | None = None) -> bytes:
    """``STATS_MARK`` if ``body`` is a JSON object with the documented counters (and this backend's name)."""
    try:
        counters = json.loads(body)
    except ValueError as exc:
        return f"<stats: not JSON: {exc}>".encode()
    if not isinstance(counters, dict):
        return b"<stats: not an object>"
    missing = sorted(STATS_KEYS - counters.keys())
    if missing:
        return f"<stats: missing {', '.join(missing)}>".encode()
    if backend is not None and counters["backend"] != backend:
        return f"<stats: backend {counters['backend']!r}, not {backend!r}>".encode()
    return STATS_MARK


def normalise(frames, backend: str | None = None, reasons=()) -> tuple:
    """Frames made comparable across variants: STATS bodies checked and marked, ERROR reasons mapped.

    ``reasons``: (pattern, replacement) pairs applied to this variant's ERROR
    reasons with ``re.sub`` (a documented difference in wording).
    """
    result = []
    for op, payload in frames:
        if op == STATS:
            payload = stats_mark(payload, backend)
        elif op == ERROR:
            reason = payload.decode("utf-8", "replace")
            for pattern, replacement in reasons:
                reason = re.sub(pattern, replacement, reason)
            payload = reason.encode()
        result.append((op, payload))
    return tuple(result)


def follows_protocol(frames, stream: Stream, complete: bool) -> str | None:
    """None if normalised ``frames`` are the protocol's answer to ``stream`` (a prefix if not ``complete``)."""
    expected = stream.expected()
    if len(frames) > len(expected) or (complete and len(frames) < len(expected)):
        return f"{len(frames)} replies, the protocol says {len(expected)}"
    for i, ((op, payload), (want_op, want)) in enumerate(zip(frames, expected)):
        if op != want_op:
            return f"reply [{i}] is {OP_NAMES.get(op, hex(op))}, the protocol says {OP_NAMES[want_op]}"
        if op == ERROR:
            if not re.fullmatch(want, payload.decode("utf-8", "replace"), re.DOTALL):
                return f"reply [{i}] ERROR {payload!r} does not match {want!r}"
        elif payload != want:
            return f"reply [{i}] payload {_show(payload)}, the protocol says {_show(want)}"
    return None


def show_frames(frames) -> str:
    if not frames:
        return "(no frames)"
    return " | ".join(f"{OP_NAMES.get(op, hex(op))} {payload.decode('utf-8', 'replace')!r}"
                      if op in (ERROR, STATS) else f"{OP_NAMES.get(op, hex(op))} {_show(payload)}"
                      for op, payload in frames)


def report(stream: Stream, results: dict, normalised: dict) -> str:
    """The stream, then each group of variants that replied the same, with their replies."""
    groups: dict = {}
    for name, replies in results.items():
        key = (normalised[name], replies.ending, replies.leftover)
        groups.setdefault(key, []).append(name)
    lines = [stream.describe(), "replies:"]
    for (frames, ending, leftover), names in groups.items():
        extra = f", {leftover} B of a partial frame" if leftover else ""
        errors = {results[n].send_error for n in names if results[n].send_error}
        lines.append(f"  {', '.join(names)}: {show_frames(frames)}; ending {ending}{extra}"
                     + (f" ({'; '.join(sorted(errors))})" if errors else ""))
    return "\n".join(lines)


def compare(stream: Stream, results: dict, backends: dict, reasons: dict | None = None) -> list[str]:
    """What is wrong with ``results`` ({variant: Replies}) for ``stream``; [] if nothing.

    Half-close: every variant must send the same frames and end the same way
    (with EOF), and that must be the protocol's answer. Abort: what a variant
    sent before the RST depends on timing, so each must only have sent a
    prefix of the protocol's answer. ``backends``: {variant: backend name}
    (STATS names it); ``reasons``: {variant: [(pattern, replacement)]}.
    """
    reasons = reasons or {}
    normalised = {name: normalise(r.frames, backends.get(name), reasons.get(name, ())) for name, r in results.items()}
    problems = []
    complete = stream.ending == HALF_CLOSE
    if complete:
        outcomes = {(normalised[name], r.ending, r.leftover) for name, r in results.items()}
        if len(outcomes) > 1:
            problems.append("the variants disagree")
    for name, replies in results.items():
        allowed = {"eof"} if complete else {"eof", "aborted"}
        if replies.ending not in allowed:
            problems.append(f"{name}: ended with {replies.ending}, expected {' or '.join(sorted(allowed))}")
        if complete and replies.leftover:      # an abort may cut a reply in half: its prefix is all we ask
            problems.append(f"{name}: {replies.leftover} B of a frame never completed")
        wrong = follows_protocol(normalised[name], stream, complete)
        if wrong:
            problems.append(f"{name}: {wrong}")
    if problems:
        problems.append(report(stream, results, normalised))
    return problems
