"""The lab protocol as a sans-I/O codec: bytes in -> frames out, frames in -> bytes out.

Every message is one frame::

    +----------------------+--------+-----------+
    | length: u32 big-end. | op: u8 | payload   |
    +----------------------+--------+-----------+

``length`` counts the op byte and the payload, never itself, and must be in
``1 .. max_frame``. The codec owns no socket and reads no clock (the design of
h11 and wsproto): every backend, the load generator and the tests drive this one
module, so a protocol bug is fixed once. A hostile length is rejected as soon as
its four bytes arrive, before any payload is buffered, so the decoder never
holds more than one maximum frame plus one read; a server's buffer budget is
asked at that same moment (``FrameDecoder``'s ``budget``).

What each request op means is one table, ``REQUESTS`` (as h11 keeps its rules
in one place): the op of its reply, the check its payload must pass, and how a
server answers it. ``check_request`` and the server's Session both read it, so
an op is added or changed here and nowhere else.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Protocol

ECHO = 0x01
PING = 0x02
PONG = 0x03
WORK = 0x04
STATS = 0x05
ERROR = 0xFF

OP_NAMES = {ECHO: "ECHO", PING: "PING", PONG: "PONG", WORK: "WORK", STATS: "STATS", ERROR: "ERROR"}

HEADER = struct.Struct(">I")
WORK_HEADER = struct.Struct(">II")
DEFAULT_MAX_FRAME = 1_048_576
MAX_PING_PAYLOAD = 64


class ProtocolError(Exception):
    """A peer broke the protocol; ``str(error)`` is the reason sent in the ERROR frame.

    ``frames`` holds the valid frames that arrived before the violation, so a
    server can still answer them before it sends ERROR and closes.
    """

    frames: list = []


class BadLength(ProtocolError):
    """The length field is 0 or above max_frame."""


class OverBudget(ProtocolError):
    """A frame's length does not fit in the buffer budget (``--max-buffered``): the server is busy.

    Not the peer's fault, but answered the same way: frames before it are
    answered, then ERROR "server busy" and the connection is closed.
    """

    def __init__(self) -> None:
        super().__init__("server busy")


class UnknownOp(ProtocolError):
    """The op byte is not a request this side accepts."""

    @classmethod
    def of(cls, op: int) -> "UnknownOp":
        return cls(f"unknown op 0x{op:02x}")


class ShortWork(ProtocolError):
    """A WORK payload shorter than its 8-byte (io_us, cpu_us) header."""


class PingTooLong(ProtocolError):
    """A PING id over 64 bytes."""


def encode(op: int, payload: bytes = b"") -> bytes:
    """One frame as bytes."""
    return HEADER.pack(len(payload) + 1) + bytes((op,)) + payload


def encode_work(io_us: int, cpu_us: int, data: bytes = b"") -> bytes:
    """A WORK request: wait io_us, then compute cpu_us, then echo the payload."""
    return encode(WORK, WORK_HEADER.pack(io_us, cpu_us) + data)


def parse_work(payload: bytes) -> tuple[int, int]:
    """(io_us, cpu_us) of a WORK payload."""
    if len(payload) < WORK_HEADER.size:
        raise ShortWork(f"WORK payload is {len(payload)} bytes, needs at least 8 (io_us, cpu_us)")
    return WORK_HEADER.unpack_from(payload)


def check_ping(payload: bytes) -> None:
    """A PING carries an id of at most 64 bytes."""
    if len(payload) > MAX_PING_PAYLOAD:
        raise PingTooLong(f"PING payload is {len(payload)} bytes, at most {MAX_PING_PAYLOAD} allowed")


# How a server answers a request (OpRule.answer):
AT_ONCE = "at once"          # the request's payload back under the reply op, with no wait
AFTER_WORK = "after work"    # the same, after waiting io_us and computing cpu_us (parse_work)
COUNTERS = "counters"        # the server's counters as UTF-8 JSON


@dataclass(frozen=True, slots=True)            # slots: a server reads these fields for every frame
class OpRule:
    """What the protocol says about one request op."""
    reply: int                                   # the op of the reply frame
    check: Callable[[bytes], object] | None = None   # raises the ProtocolError a bad payload earns, else returns
                                                 # what it asks for (AFTER_WORK: io_us, cpu_us); None: any payload
    answer: str = AT_ONCE                        # AT_ONCE, AFTER_WORK or COUNTERS
    reply_byte: bytes = field(init=False, repr=False, compare=False)   # ``reply`` as the byte after a length

    def __post_init__(self) -> None:
        if self.answer not in (AT_ONCE, AFTER_WORK, COUNTERS):
            raise ValueError(f"answer must be AT_ONCE, AFTER_WORK or COUNTERS, not {self.answer!r}")
        object.__setattr__(self, "reply_byte", bytes((self.reply,)))


REQUESTS: dict[int, OpRule] = {                  # the requests a client may send; any other op is UnknownOp
    ECHO: OpRule(ECHO),                           # any payload, back as it came
    PING: OpRule(PONG, check_ping),               # an id of 0..64 bytes, back in a PONG
    WORK: OpRule(WORK, parse_work, AFTER_WORK),   # u32 io_us, u32 cpu_us, then any bytes, back after the work
    STATS: OpRule(STATS, answer=COUNTERS),        # the reply carries the counters, not the payload
}
REQUEST_OPS = frozenset(REQUESTS)


def check_request(op: int, payload: bytes) -> OpRule:
    """The rule for this request; raise the ProtocolError a server answers to it instead, if any."""
    rule = REQUESTS.get(op)
    if rule is None:
        raise UnknownOp.of(op)
    if rule.check is not None:
        rule.check(payload)
    return rule


def echo_frames(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> int:
    """How many frames ``data`` holds if it is whole ECHO frames and nothing else; otherwise 0.

    An ECHO reply is its request, byte for byte (REQUESTS[ECHO]: reply ECHO, no
    check, answered at once), so a server that gets such a read can send the
    very same bytes back without decoding a payload (the common case under
    load, and the one a server's hot path is made for).
    """
    count = start = 0
    end = len(data)
    while end - start > 4:
        (length,) = HEADER.unpack_from(data, start)
        if not 0 < length <= max_frame or data[start + 4] != ECHO:
            return 0
        start += 4 + length
        count += 1
    return count if start == end else 0


class Budget(Protocol):
    """What a FrameDecoder asks before it keeps the start of a frame (servers/session.py: Reservations)."""

    def reserve(self, size: int) -> bool: ...


class FrameDecoder:
    """Turns a byte stream, in chunks of any size, into (op, payload) frames.

    Only the start of a frame that has not fully arrived is kept (``_pending``);
    whole frames are cut from the chunk itself, with no copy into a buffer first.
    Between frames, the usual state of an idle connection, it holds the one
    shared empty ``bytes``: no buffer per connection.

    ``budget`` (optional, a server's buffer budget) is asked before the start of
    a frame is kept: ``budget.reserve(length)``, once the frame's 4 length bytes
    are in, returns whether that many bytes may be buffered. If not, the
    decoder keeps nothing and raises ``OverBudget`` (with the frames before it).
    A frame that lies whole in one chunk is never kept, so never reserved.
    ``reserved`` is the length reserved for the frame being kept (0: none); it
    is carried until that frame completes, when it goes to 0 and the frame's
    bytes belong to whoever answers it (``reserved`` read before the ``feed``
    that completed it says how many: that frame is the feed's first).
    """

    __slots__ = ("max_frame", "_pending", "budget", "reserved")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, budget: Budget | None = None) -> None:
        self.max_frame = max_frame
        self._pending: bytes | bytearray = b""
        self.budget = budget             # an object, not a bound method: ~64 B less per connection
        self.reserved = 0

    @property
    def mid_frame(self) -> bool:
        """True while part of a frame has arrived and the rest has not."""
        return bool(self._pending)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add received bytes; return every frame they complete, in order."""
        stream = self._pending
        if stream:
            stream += data                 # a bytearray: grows in place
        else:
            stream = data
        carried, self.reserved = self.reserved, 0   # the kept frame's reservation, if it is still incomplete
        frames = []
        start, end = 0, len(stream)
        while end - start >= 4:
            (length,) = HEADER.unpack_from(stream, start)
            if length == 0 or length > self.max_frame:
                self._pending = b""
                error = BadLength(f"frame length {length} outside 1..{self.max_frame}")
                error.frames = frames
                raise error
            if end - start - 4 < length:
                if start == 0 and carried:
                    self.reserved = carried
                elif self.budget is not None:
                    if not self.budget.reserve(length):
                        self._pending = b""
                        error = OverBudget()
                        error.frames = frames
                        raise error
                    self.reserved = length
                break
            frames.append((stream[start + 4], bytes(stream[start + 5:start + 4 + length])))
            start += 4 + length
        if stream is data:
            if start < end:                # the start of a frame: a copy of its own (data may be a caller's buffer)
                self._pending = bytearray(memoryview(data)[start:])
        elif start == end:
            self._pending = b""            # the frame is whole: let its buffer go
        elif start:
            del stream[:start]
        return frames
