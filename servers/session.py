"""What one connection does, whatever the concurrency model: bytes in -> requests.

A backend owns the socket, the waiting and the clock; a ``Session`` owns
everything else: decoding (through the sans-I/O codec), answering each request
as ``protocol.REQUESTS`` says (ECHO, PING and STATS with no wait), describing
WORK (how long to wait, how long to compute), counting, and the idle/frame
deadlines. Every backend drives it with the same few lines::

    while not session.closing:
        data = <read, giving up at session.deadline>   # timeout -> session.expire(now)
        for request in session.feed(data, now):
            <wait request.io_s the model's own way>
            <send request.run(now)>

so two backend files side by side differ only in how they wait and send.
Replies that need no waiting are coalesced into one Request per read, which
makes one send per read the common case. A backend may first offer a read to
``session.echo(data, now)``, the hot path: whole ECHO frames come back as the
bytes to send, with no Request made; None means "feed it".

With ``--cpu-offload process`` (servers/offload.py) an event loop has WORK's
CPU part computed in a process pool, then replies with ``request.computed(now)``:
the reply without the burn, the idle clock counting from ``now``. gevent, whose
greenlets run the threads' loop above, sets the session's ``compute`` instead,
and ``run`` has it compute there.

The buffer budget (``--max-buffered``, docs/protocol.md section 3) is kept
here too, once for every backend. A frame that lies whole in the read that
brought it reserves nothing: the backend answers it before it reads again, so
those bytes are the connection's one read (bounded by the backend's read size),
not buffered bytes. A frame that does not, reserves its length from the global
budget (``Stats.buffered_bytes``) when its 4 length bytes are in, before the decoder
keeps any of it (``FrameDecoder``'s ``budget``); if that fails, the frames
before it are answered, then ERROR "server busy" and close, counted in
``buffer_rejections``. The reservation goes back exactly once: when the
request that answers the frame runs (``Held``: its reply is handed over), or
when the connection ends (``close``, which every backend calls, whatever
ended it), whichever comes first. ``Reservations`` is what one connection holds.

Like the codec it reads no clock (h11's way): every method that needs the time
takes ``now``, in ``time.monotonic()`` seconds, from the backend, which reads
it where it calls; tests pass any times they like. The one exception is WORK's
computation itself (``burn``), which is a measured busy loop, not a decision.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time

from . import protocol
from .config import ServerConfig
from .protocol import AFTER_WORK, AT_ONCE, COUNTERS, ECHO, ERROR, REQUESTS, OverBudget, ProtocolError, UnknownOp
from .stats import ONE_WRITER, Stats

HEADER = protocol.HEADER
unpack_length = HEADER.unpack_from
SERVER_BUSY = protocol.encode(ERROR, b"server busy")
NO_DEADLINE = 86_400.0        # --fault no-deadline: a day stands for "never" (sockets and timers take it)


def burn(cpu_us: int) -> None:
    """Compute for cpu_us microseconds (a busy loop: in CPython it holds the GIL).

    It reads ``time.perf_counter`` itself, unlike everything else here: this loop
    is WORK's computation, the load being measured, not the session's logic.
    """
    end = time.perf_counter() + cpu_us / 1e6
    while time.perf_counter() < end:
        pass


class Request:
    """One thing to answer: wait io_s (the model's way), then ``run(now)`` for the reply bytes.

    ``gated`` (a class attribute): a ``Gated`` request, whose verdict the backend
    asks the rate limit's store for first (see ``SharedSession.admit``)."""

    __slots__ = ("io_s", "cpu_us", "reply", "session")
    gated = False

    def __init__(self, reply: bytes, io_s: float = 0.0, cpu_us: int = 0, session: "Session | None" = None):
        self.reply, self.io_s, self.cpu_us, self.session = reply, io_s, cpu_us, session

    def run(self, now: float) -> bytes:
        """Compute cpu_us, then return the reply; ``now`` is the time its wait ended (monotonic seconds).

        A request that waited tells its session the reply is out, at ``now`` plus
        the cpu_us it computed, so the idle timeout counts from there (a burn
        descheduled past cpu_us ends later: the next deadline is that much early).
        A session that computes elsewhere (its ``compute``, see Session) is asked
        instead, and says when that ended.
        """
        cpu_us = self.cpu_us
        if cpu_us:
            compute = None if self.session is None else self.session.compute
            if compute is None:
                burn(cpu_us)
                now += cpu_us / 1e6
            else:
                now = compute(cpu_us)
        elif self.session is None:                  # a Reply, the common case: nothing to compute or tell
            return self.reply
        return self.computed(now)

    def computed(self, now: float) -> bytes:
        """The reply, its CPU part already computed elsewhere (``--cpu-offload process``, servers/offload.py):
        no burn here; ``now`` is when that computation ended, and the session counts its idle time from then."""
        if self.session is not None:
            self.session.replied(now)
        return self.reply


class Reply(Request):
    """A Request answered at once (no wait, no computation, no session to tell): the common case.

    Its io_s, cpu_us and session are class attributes (they shadow the slots of
    Request), so making one stores only the reply: about a third cheaper than a
    Request, per read on the hot path. ``run`` is Request's own.
    """

    __slots__ = ()
    io_s, cpu_us, session = 0.0, 0, None

    def __init__(self, reply: bytes) -> None:     # not Request.__init__: the rest is class data
        self.reply = reply


class Reservations:
    """What one connection holds of the global buffer budget (``Stats.buffered_bytes``), in bytes.

    Its own object, not the Session's state: the decoder keeps it as its
    ``budget``, and a Session referring to itself through its decoder would be
    a reference cycle, freed only by the garbage collector instead of at once.
    """

    __slots__ = ("stats", "budget", "held")

    def __init__(self, stats: Stats, budget: float) -> None:
        self.stats, self.budget, self.held = stats, budget, 0

    def reserve(self, size: int) -> bool:
        """The decoder's ``reserve``: take ``size`` bytes from the global budget for a frame it will keep."""
        stats = self.stats
        with stats.lock:                            # global, and a pool worker may release meanwhile
            if stats.buffered_bytes + size > self.budget:
                return False
            stats.buffered_bytes += size
            self.held += size
            return True

    def release(self, size: int) -> None:
        """A frame holding ``size`` bytes is answered: give them back (at most what is still held)."""
        stats = self.stats
        with stats.lock:                            # a pool worker (Held.run) and the closer may race here
            size = min(size, self.held)
            self.held -= size
            stats.buffered_bytes -= size


class Held(Request):
    """A request answering a frame that reserved budget bytes: running it (its reply handed over) gives them back.

    Made only for a frame that did not arrive whole in one read, so never on the hot path.
    """

    __slots__ = ("held", "reservations")

    def __init__(self, request: Request, held: int, session: "Session") -> None:
        super().__init__(request.reply, request.io_s, request.cpu_us, session)
        self.held, self.reservations = held, session.reservations

    def computed(self, now: float) -> bytes:          # run ends here too
        reply = Request.computed(self, now)
        self.reservations.release(self.held)
        return reply


class TokenBucket:
    """The article's token bucket (docs/article.md): ``rate`` tokens per second, at most ``burst`` saved.

    ``delay_for`` takes a token and says how long the request must wait for it.
    The bucket may go into debt; a waiting request pays the debt back by time,
    which is what makes delay mode smooth like a leaky bucket. One bucket
    belongs to one connection, so it needs no lock in any model.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp", "released")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now
        self.released = now         # when the previous delayed request was let through

    def available(self, now: float) -> bool:
        """Take a token if there is one (reject mode)."""
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def take(self, now: float) -> float:
        """Take a token, in debt if need be; seconds from ``now`` until it is there (delay mode, a shared bucket).

        The wait counts from now, not from the previous request: with a bucket shared
        by several connections that request may be another connection's, whose wait is
        none of this one's. The sequencing of one connection's delayed requests is the
        Session's (``SharedSession.delayed``), as the redis store's script answers the same.
        """
        self._refill(now)
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def delay_for(self, now: float) -> float:
        """Take a token, in debt if need be; seconds to wait after the previous request (delay mode).

        The connection's own bucket: ``take`` and the connection's sequencing in one
        step (its requests run one after another, so a later one waits only what its
        release is past the previous one's), the in-memory fast path."""
        self._refill(now)
        self.tokens -= 1
        release = now if self.tokens >= 0 else now - self.tokens / self.rate
        wait = max(0.0, release - max(now, self.released))
        self.released = release
        return wait

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now


class ClientBuckets:
    """``--rate-limit-scope client`` with the memory store: one TokenBucket per peer IP, for one process.

    Every connection of a client draws on its bucket. Under a lock where threads
    share the map (an event loop, or gevent's hub, never switches inside ``take``:
    no lock there). A bucket full again answers as a new one would, so it is
    dropped: at most once per SWEEP_INTERVAL_S the request that finds the sweep
    due drops every full bucket (no thread of its own), as the go backend does.
    """

    SWEEP_INTERVAL_S = 1.0

    def __init__(self, rate: float, burst: float, reject: bool, locked: bool, now: float) -> None:
        self.rate, self.burst, self.reject = rate, burst, reject
        self.buckets: dict[str, TokenBucket] = {}
        self.lock = threading.Lock() if locked else contextlib.nullcontext()
        self.swept = now

    def take(self, ip: str, now: float) -> tuple[bool, float]:
        """One request of client ``ip``: (admitted, seconds from ``now`` to wait)."""
        with self.lock:
            if now - self.swept >= self.SWEEP_INTERVAL_S:
                self._sweep(now)
            bucket = self.buckets.get(ip)
            if bucket is None:
                bucket = self.buckets[ip] = TokenBucket(self.rate, self.burst, now)
            if self.reject:
                return bucket.available(now), 0.0
            return True, bucket.take(now)

    def _sweep(self, now: float) -> None:
        self.swept = now
        for ip, bucket in list(self.buckets.items()):
            if bucket.tokens + (now - bucket.stamp) * bucket.rate >= bucket.burst:
                del self.buckets[ip]


class SharedLimit:
    """One process's side of a rate limit whose bucket is not one connection's own (docs/ratelimit.md).

    ``store``: the redis store's client, the backend's kind (its ``take(key)`` is
    asked for each ``Gated`` request, the model's way); None with the memory
    store, where scope client is ``clients``, decided in the session. The backend
    makes one per process, after any fork (``shared_limit``), and hands it to
    each session; the Stats shows the store's counters.
    """

    __slots__ = ("store", "clients", "scope")

    def __init__(self, config: ServerConfig, stats: Stats, store=None) -> None:
        self.store, self.scope = store, config.rate_limit_scope
        self.clients = None if store is not None else ClientBuckets(
            config.rate_limit, config.effective_burst, config.rate_limit_mode == "reject",
            stats.backend not in ONE_WRITER, time.monotonic())
        stats.rate_store = store


def shared_limit(config: ServerConfig, stats: Stats, client_class=None, **options) -> SharedLimit | None:
    """The process's SharedLimit (None if each connection has its own bucket, or no limit).

    ``client_class`` makes the redis store's client: the name of one of
    servers/redis_bucket.py's (``"BlockingBucketClient"``, ``"AsyncBucketClient"``:
    imported only then) or the backend's own class, given (url, rate, burst,
    mode, on_error_policy=..., **options).
    """
    if not config.rate_limit_shared:
        return None
    store = None
    if config.rate_limit_store != "memory":
        if isinstance(client_class, str):
            from . import redis_bucket
            client_class = getattr(redis_bucket, client_class)
        store = client_class(config.rate_limit_store, config.rate_limit, config.effective_burst,
                             config.rate_limit_mode, on_error_policy=config.rate_limit_on_error, **options)
    return SharedLimit(config, stats, store)


class Session:
    """The sans-I/O state of one framed connection.

    With ``--rate-limit`` its frames are answered one at a time (``_answer_limited``),
    each first taking a token; the one loop serves every bucket, and what differs
    is only how a frame gets its verdict (``_decide``): here from the connection's
    own TokenBucket, at once; in a SharedSession from a bucket that is not its own.
    ``_settle`` turns a verdict into the answer (refused, or answered after a
    wait that ``delayed`` sequences behind the connection's earlier delayed ones).
    """

    __slots__ = ("stats", "bucket", "reject_over_rate", "decoder", "idle_timeout", "frame_timeout",
                 "idle_since", "frame_started", "closing", "peer_closed", "leaky",
                 "reservations", "compute")   # slots: ~200 B less per connection
    shared = None           # SharedSession's: the process's SharedLimit

    def __init__(self, config: ServerConfig, stats: Stats, now: float) -> None:
        self.stats = stats
        self.bucket = None          # the connection's own token bucket (a shared one: SharedSession)
        if config.rate_limit is not None and not config.rate_limit_shared:
            self.bucket = TokenBucket(config.rate_limit, config.effective_burst, now)
        self.reject_over_rate = config.rate_limit_mode == "reject"
        # --fault unbounded: an infinite budget, counted but never enforced
        self.reservations = Reservations(stats, config.buffer_budget)
        self.decoder = protocol.FrameDecoder(config.max_frame, self.reservations)
        self.idle_timeout = config.idle_timeout
        self.frame_timeout = config.frame_timeout
        self.idle_since = now
        self.frame_started: float | None = None
        self.closing = False
        self.peer_closed = False
        self.leaky = config.fault == "leak"
        self.compute = None   # None: WORK's CPU part burns in Request.run; else a callable (cpu_us) that has it
        #                       computed elsewhere and returns when it ended (gevent's --cpu-offload, servers/green.py)
        if config.fault == "no-deadline":
            self.idle_timeout = self.frame_timeout = NO_DEADLINE

    def close(self) -> None:
        """The connection ended, for whatever reason: give back every budget byte it still holds
        (a Held request that runs later gives back nothing more)."""
        reservations = self.reservations
        if reservations.held:
            reservations.release(reservations.held)

    def eof(self) -> None:
        """The peer closed its side: answer what was asked, then close."""
        self.peer_closed = self.closing = True

    @property
    def forget_to_close(self) -> bool:
        """--fault leak: the bug of never closing what the peer closed (see base.release)."""
        return self.leaky and self.peer_closed

    @property
    def deadline(self) -> float:
        """Monotonic time at which this connection expires if nothing more arrives."""
        idle_end = self.idle_since + self.idle_timeout
        started = self.frame_started
        if started is None:
            return idle_end
        frame_end = started + self.frame_timeout
        return frame_end if frame_end < idle_end else idle_end

    def expired(self, now: float) -> bool:
        """Whether the deadline has passed at ``now`` (a timer may wake a reader early; then it reads again)."""
        return now >= self.deadline

    def timeout(self, now: float) -> float:
        """Seconds left from ``now`` until the deadline (never 0, which sockets read as 'non-blocking')."""
        left = self.deadline - now
        return left if left > 0.001 else 0.001

    def replied(self, now: float) -> None:
        """A reply that waited went out at ``now``: the idle timeout counts from then (Request.run says so)."""
        if now > self.idle_since:
            self.idle_since = now

    def expire(self, now: float) -> bytes:
        """The deadline passed: count it, mark the session closing, return the ERROR to send."""
        mid_frame = self.frame_started is not None and now >= self.frame_started + self.frame_timeout
        reason = "frame timeout" if mid_frame else "idle timeout"
        self.stats.count("frame_timeouts" if mid_frame else "idle_timeouts")
        return self._close_with(reason)

    def _close_with(self, reason: str) -> bytes:
        self.closing = True
        reply = protocol.encode(ERROR, reason.encode())
        self.stats.record(0, 0, len(reply))
        return reply

    def echo(self, data: bytes, now: float) -> bytes | None:
        """The hot path: if ``data`` is whole ECHO frames, count them and return the reply, ``data`` itself.

        An ECHO reply is its request (protocol.echo_frames), so such a read needs no
        decoding and no Request: a backend that sends at once can call this first and
        send what it returns. Anything else (another op, part of a frame, a rate
        limit): None, with nothing done; then ``feed`` the read.
        """
        # ``frame_started is None`` is the decoder's ``not mid_frame`` (feed keeps them in
        # step), read without a property call; one frame, the closed-loop case, is
        # recognised inline, more go through echo_frames.
        if self.frame_started is None and self.bucket is None:
            size = len(data)
            if size > 4 and data[4] == ECHO:
                max_frame = self.decoder.max_frame
                if unpack_length(data)[0] == size - 4 <= max_frame:
                    echoes = 1
                else:
                    echoes = protocol.echo_frames(data, max_frame)
                if echoes:
                    self.idle_since = now
                    self.stats.record(echoes, size, size)
                    return data
        return None

    def feed(self, data: bytes, now: float) -> list[Request]:
        """Take bytes received at ``now``; return the requests they complete, in order."""
        reply = self.echo(data, now)
        if reply is not None:
            return [Reply(reply)]
        error = None
        carried = self.decoder.reserved                 # the reservation of a frame this read may complete
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:
            frames, error = exc.frames, exc
        if frames:
            self.idle_since = now
        if not self.decoder.mid_frame:            # the hot path reads frame_started for this
            self.frame_started = None
        elif frames or self.frame_started is None:
            self.frame_started = now
        if self.bucket is None and self.shared is None:
            requests, error = self._answer(frames, error, len(data))
        else:
            requests, error = self._answer_limited(frames, error, len(data), now)
        if error is not None:
            self.stats.count("buffer_rejections" if isinstance(error, OverBudget) else "protocol_errors")
            requests.append(Reply(self._close_with(str(error))))
        if carried and frames:                          # frames[0] completed the reserved frame: its first reply
            if requests[0].gated:
                requests[0].held = carried              # handed on when the store has answered (admit)
            else:
                requests[0] = Held(requests[0], carried, self)
        return requests

    def _answer(self, frames, error, bytes_in):
        """Requests for decoded frames, as protocol.REQUESTS says; stops at the first that breaks the protocol."""
        requests: list[Request] = []
        ready: list[bytes] = []        # replies that need no waiting, coalesced into one send
        count = bytes_out = 0
        rule_of, at_once = REQUESTS.get, AT_ONCE
        for op, payload in frames:
            rule = rule_of(op)                              # protocol.check_request, inline: this is per frame
            try:
                if rule is None:
                    raise UnknownOp.of(op)
                check = rule.check
                asked = None if check is None else check(payload)
            except ProtocolError as exc:
                error = exc
                break
            answer = rule.answer
            if answer == at_once:
                reply = HEADER.pack(len(payload) + 1) + rule.reply_byte + payload
            elif answer == AFTER_WORK:
                io_us, cpu_us = asked
                if ready:
                    requests.append(Reply(b"".join(ready)))
                    ready = []
                reply = HEADER.pack(len(payload) + 1) + rule.reply_byte + payload
                requests.append(Request(reply, io_us / 1e6, cpu_us, self))
                count, bytes_out = count + 1, bytes_out + len(reply)
                continue
            else:                                           # COUNTERS
                self.stats.record(count + 1, bytes_in, bytes_out)   # the snapshot includes this read
                count = bytes_in = bytes_out = 0
                reply = protocol.encode(rule.reply, json.dumps(self.stats.snapshot()).encode())
                self.stats.record(0, 0, len(reply))
                ready.append(reply)
                continue
            ready.append(reply)
            count, bytes_out = count + 1, bytes_out + len(reply)
        if ready:
            requests.append(Reply(b"".join(ready) if len(ready) > 1 else ready[0]))
        self.stats.record(count, bytes_in, bytes_out)
        return requests, error

    def _answer_limited(self, frames, error, bytes_in, now):
        """Like _answer, one frame at a time, each first taking a token: its verdict is ``_decide``'s.

        STATS takes none (the lab can always read its counters). The read's bytes are
        counted with the first frame's answer. A frame that breaks the protocol asks no
        bucket (as in go: it is checked first) and ends the loop with its error;
        otherwise the decoder's, if any, follows the frames.
        """
        requests: list[Request] = []
        for frame in frames:
            rule = REQUESTS.get(frame[0])
            if rule is not None and rule.answer == COUNTERS:
                answered, broken = self._answer([frame], None, bytes_in)
            else:
                try:
                    protocol.check_request(*frame)
                except ProtocolError as exc:
                    answered, broken = [], exc
                    self.stats.record(0, bytes_in, 0)
                else:
                    answered, broken = self._decide(frame, bytes_in, now)
            bytes_in = 0
            requests += answered
            if broken is not None:
                error = broken
                break
        if bytes_in:                        # a read that completed no frame: its bytes still came in
            self.stats.record(0, bytes_in, 0)
        return requests, error

    def _decide(self, frame, bytes_in, now):
        """One rate-limited frame's (answered, error), its verdict from the connection's own bucket, at once:
        reject mode, a token or a refusal; delay mode, a token (in debt if need be) and the wait for it,
        which ``delay_for`` counts past the connection's previous delayed request already."""
        if self.reject_over_rate:
            return self._settle(frame, bytes_in, self.bucket.available(now), 0.0, now)
        return self._settle(frame, bytes_in, True, self.bucket.delay_for(now), now)

    def _settle(self, frame, bytes_in, admitted, wait, now):
        """One frame's answer once its bucket has spoken: refused, or answered after ``wait`` seconds from
        ``now`` (plus what the connection's earlier delayed requests still wait: ``delayed``)."""
        if not admitted:
            self.stats.count("rate_limited")
            reply = protocol.encode(ERROR, b"rate limited")
            self.stats.record(0, bytes_in, len(reply))             # refused: not a request served
            return [Reply(reply)], None
        answered, error = self._answer([frame], None, bytes_in)
        if not self.reject_over_rate:
            wait = self.delayed(wait, now)
            if answered and wait:
                first = answered[0]
                answered[0] = Request(first.reply, first.io_s + wait, first.cpu_us, self)
        return answered, error

    def delayed(self, wait: float, now: float) -> float:
        """A delay-mode wait as this connection waits it: the own bucket's ``delay_for`` sequenced it already."""
        return wait


class SharedSession(Session):
    """A framed connection whose token bucket is not its own (docs/ratelimit.md): the process's bucket of
    its client (memory store, scope client), or one in Redis (any scope), whose verdicts the backend asks for.

    Session's loop with its own ``_decide``, and ``delayed`` sequencing the connection's
    waits, which a shared bucket counts from now. Its own class, so a connection
    without a shared limit carries none of this.
    """

    __slots__ = ("shared", "peer", "key", "released")

    def __init__(self, config: ServerConfig, stats: Stats, now: float, peer: str, shared: SharedLimit | None) -> None:
        if shared is None:
            raise ValueError("a shared rate limit (a redis store, or scope client) needs the process's SharedLimit")
        super().__init__(config, stats, now)
        self.shared, self.peer, self.released = shared, peer, now   # released: its last delayed request's release
        self.key = None
        if shared.store is not None:
            from .redis_bucket import bucket_key, new_connection_id   # only a redis store needs them
            self.key = bucket_key(config.rate_limit_scope, peer, new_connection_id())

    def echo(self, data: bytes, now: float) -> None:
        """No hot path: every request takes a token first (``feed``)."""
        return None

    def _decide(self, frame, bytes_in, now):
        """One rate-limited frame's (answered, error), from a bucket that is not the connection's own: the
        process's bucket of this client decides at once; with a redis store the frame becomes a ``Gated``
        request, the store's verdict for it asked by the backend, its way, and turned into the answer by
        ``admit``."""
        clients = self.shared.clients
        if clients is not None:
            admitted, wait = clients.take(self.peer, now)
            return self._settle(frame, bytes_in, admitted, wait, now)
        return [Gated(frame, bytes_in, self.key, self)], None

    def admit(self, gated: "Gated", verdict, now: float) -> Request:
        """The store's ``verdict`` (servers/redis_bucket.py's Verdict) for a Gated request, asked at ``now``:
        the request to answer it with (wait its io_s, then run it), or ERROR "rate limited"."""
        [request], _ = self._settle(gated.frame, gated.bytes_in, verdict.admitted, verdict.wait_s, now)
        return Held(request, gated.held, self) if gated.held else request

    def delayed(self, wait: float, now: float) -> float:
        """A delay-mode wait counted from ``now`` (a shared bucket's answer) as this connection waits it.

        One connection's delayed requests run one after another, so a request waits only
        what its release is past the release of the one before it (``TokenBucket.delay_for``
        does this for a connection's own bucket)."""
        release = now + wait
        start = max(now, self.released)             # when the requests before it are through
        self.released = max(self.released, release)
        return max(0.0, release - start)



class Gated(Request):
    """A request whose token is in the redis store: the backend asks ``store.take(key)`` its model's way,
    then ``session.admit(request, verdict, now)`` gives the request to answer in its place.

    It is validated already (a frame breaking the protocol is never gated) and holds
    what the answer needs: the frame, the bytes of the read it came in (counted when
    it is answered) and any budget bytes its frame reserved (``held``)."""

    __slots__ = ("frame", "bytes_in", "key", "held")
    gated = True

    def __init__(self, frame, bytes_in: int, key: str, session: "Session") -> None:
        super().__init__(b"", 0.0, 0, session)
        self.frame, self.bytes_in, self.key, self.held = frame, bytes_in, key, 0

    def run(self, now: float) -> bytes:
        raise RuntimeError("a Gated request is answered through session.admit, after the store's verdict")


class RawSession(Session):
    """RFC 862 echo: every byte received goes back unchanged; no frames, no frame timeout."""

    __slots__ = ()

    def echo(self, data: bytes, now: float) -> bytes:
        """Every read is answered with itself: never None."""
        self.idle_since = now
        size = len(data)
        self.stats.record(1, size, size)
        return data

    def feed(self, data: bytes, now: float) -> list[Request]:
        return [Reply(self.echo(data, now))]

    def expire(self, now: float) -> bytes:
        self.stats.count("idle_timeouts")
        self.closing = True
        return b""


def open_session(config: ServerConfig, stats: Stats, now: float, peer: str = "",
                 shared: SharedLimit | None = None) -> Session:
    """A new session for a connection accepted at ``now`` (monotonic seconds), in the configured protocol;
    ``peer`` (the client's IP address) and ``shared`` (the process's ``shared_limit``) serve a shared rate limit."""
    if config.protocol == "raw":
        return RawSession(config, stats, now)
    if config.rate_limit_shared:
        return SharedSession(config, stats, now, peer, shared)
    return Session(config, stats, now)


def peer_ip(sock) -> str:
    """The client's IP address: what --rate-limit-scope client keys on ("" if the socket has no peer)."""
    try:
        return sock.getpeername()[0]
    except (OSError, IndexError, TypeError):
        return ""


def rejection(config: ServerConfig) -> bytes:
    """What an over-the-cap connection is told before it is closed (raw mode: nothing)."""
    return b"" if config.protocol == "raw" else SERVER_BUSY
