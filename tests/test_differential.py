"""Differential tests: every variant must send the same reply stream for the same input stream.

Hypothesis draws a byte stream (valid frames of every op, at most one malformed
or truncated frame at the end, random chunking with short pauses, then a
half-close or an abort); the stream is played to one server of every available
variant at once (one connection each), and the replies are compared
(reliability/streams.py):

* half-close: every variant's frames, once STATS bodies are checked and
  replaced by a marker, must be identical, end with EOF, and be what the
  protocol promises (docs/protocol.md section 1), ERROR reasons included;
* abort (RST): what a variant sent before the RST depends on timing, so each
  must only have sent a prefix of that answer.

After every stream each server must still be alive, answer a PING, and drop
back to no connection but the one asking (no leak).

The servers are started once for the module (``--max-frame 65536``, so an
over-long length is cheap to send). CI runs ``EXAMPLES`` streams, derandomized
so a run is reproducible; ``CONCLAB_FULL=1`` runs 2000 random ones
(``CONCLAB_DIFFERENTIAL_EXAMPLES`` overrides the count). A failure is shrunk
and printed as the stream (frames, chunks, pauses, ending) and each group of
variants with the replies it sent.
"""
from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, event, example, given, settings, strategies as st

from conclab.reliability import streams
from conclab.reliability.streams import ABORT, HALF_CLOSE, Replies, Stream
from conclab.servers import VARIANTS as LAB_VARIANTS
from conclab.servers.launcher import ServerProcess, wait_until
from conclab.servers.protocol import ECHO, ERROR, PING, PONG, STATS, encode

pytestmark = pytest.mark.live

MAX_FRAME = 65536
FULL = os.environ.get("CONCLAB_FULL") == "1"
EXAMPLES = int(os.environ.get("CONCLAB_DIFFERENTIAL_EXAMPLES", 2000 if FULL else 200))
SETTLE_S = 5.0                 # how long a server may take to close a finished connection

# Test setup on top of the table's options (as tests/conftest.py gives every variant test).
TEST_OPTIONS = {"threadpool": ("--workers", "32")}

# ERROR reasons a variant words differently from the others, with the documented wording they
# stand for: {variant: [(regex on its reason, replacement)]}. Each entry is a known difference to
# be fixed in the backend or written into docs/protocol.md; keep it empty otherwise.
REASON_DIFFERENCES: dict[str, list[tuple[str, str]]] = {}


# -- the streams -----------------------------------------------------------------------------------
def patterned(size: int, seed: int) -> bytes:
    """``size`` bytes that shrink well and still look like anything (frame headers included)."""
    return bytes((seed + i * 7) % 256 for i in range(size))


BIGGEST = MAX_FRAME - 1        # the largest ECHO payload --max-frame allows
# ECHO payloads: a few arbitrary bytes, or a pattern of 0..4 KiB (one draw in 16: 1..4 KiB), or now
# and then (one draw in 64) BIGGEST, the boundary.
echo_sizes = st.integers(0, 63).flatmap(
    lambda k: st.just(BIGGEST) if k == 63 else st.integers(1024, 4096) if k % 16 == 15 else st.integers(0, 4096))
echo_payloads = st.one_of(st.binary(max_size=16), st.builds(patterned, echo_sizes, st.integers(0, 255)))
valid_items = st.one_of(
    st.builds(streams.echo, echo_payloads),
    st.builds(streams.ping, st.binary(max_size=64)),
    st.builds(streams.work, st.integers(0, 2000), st.just(0), st.binary(max_size=32)),
    st.just(streams.stats()),
)
# The frames after which the server sends ERROR and closes, each kind equally often.
error_items = st.sampled_from([
    st.builds(streams.bad_length, st.one_of(st.just(0), st.integers(MAX_FRAME + 1, 2**32 - 1)), st.just(MAX_FRAME)),
    st.builds(streams.unknown_op, st.one_of(st.sampled_from([0x00, PONG, ERROR]), st.integers(0x06, 0xFE)),
              st.binary(max_size=8)),
    st.builds(streams.short_work, st.binary(max_size=7)),
    st.builds(streams.long_ping, st.binary(min_size=65, max_size=130)),
]).flatmap(lambda kind: kind)
# A valid frame cut short by the end of the stream: no reply.
truncated_items = valid_items.flatmap(
    lambda whole: st.builds(streams.truncated, st.just(whole), st.integers(1, len(whole.data) - 1)))
PAUSES = [0.0, 0.001, 0.002, 0.005]


@st.composite
def byte_streams(draw) -> Stream:
    items = draw(st.lists(valid_items, max_size=12))
    tail = draw(st.sampled_from(["none", "error", "error", "truncated"]))     # at most one bad frame, the last
    if tail != "none":
        items.append(draw(error_items if tail == "error" else truncated_items))
    size = sum(len(item.data) for item in items)
    cuts = sorted(draw(st.sets(st.integers(1, size - 1), max_size=8))) if size > 1 else []
    pauses = draw(st.lists(st.sampled_from(PAUSES), min_size=len(cuts), max_size=len(cuts)))
    ending = draw(st.sampled_from([HALF_CLOSE, HALF_CLOSE, ABORT]))       # shrinks towards a half-close
    abort_after = draw(st.sampled_from([0.0, 0.001, 0.003])) if ending == ABORT else 0.0
    return Stream(tuple(items), tuple(cuts), tuple(pauses), ending, abort_after)


# -- the servers -----------------------------------------------------------------------------------
def start(name: str) -> ServerProcess:
    variant = LAB_VARIANTS[name]
    return ServerProcess(variant.backend, [*variant.options, *TEST_OPTIONS.get(name, ()), "--max-frame", str(MAX_FRAME)])


class Lab:
    """The module's servers: {variant: ServerProcess}, their addresses and backends, a pool of threads."""

    def __init__(self, servers: dict, pool: ThreadPoolExecutor) -> None:
        self.servers, self.pool = servers, pool
        self.addresses = {name: server.address for name, server in servers.items()}
        self.backends = {name: LAB_VARIANTS[name].backend for name in servers}

    def __repr__(self) -> str:                  # what a falsifying example prints for this argument
        return f"<Lab: {', '.join(self.servers)}>"


@pytest.fixture(scope="module")
def lab():
    """One server per available variant, started together; a thread pool to talk to them all at once."""
    names = [name for name, variant in LAB_VARIANTS.items() if variant.unavailable() is None]
    if len(names) < 2:
        pytest.skip(f"needs two variants to compare, only {names} can run here")
    pool = ThreadPoolExecutor(max_workers=2 * len(names), thread_name_prefix="differential")
    futures = {name: pool.submit(start, name) for name in names}
    try:
        yield Lab({name: future.result() for name, future in futures.items()}, pool)
    finally:
        for future in futures.values():
            if future.exception() is None:
                future.result().close()
        pool.shutdown()


def active_connections(server: ServerProcess) -> int | None:
    """connections_active, counting the connection that asks; None if STATS does not answer."""
    stats = server.try_stats(SETTLE_S)
    return None if stats is None else stats.get("connections_active")


def unhealthy(name: str, server: ServerProcess) -> str | None:
    """None if the server is alive, answers PING, and holds no connection but the one asking."""
    if not server.alive():
        return f"{name} died (exit {server.proc.poll()}): {server.last_words()}"
    try:
        with server.connect(SETTLE_S) as client:
            client.send(encode(PING, b"health") + encode(STATS))
            if (reply := client.recv_frame()) != (PONG, b"health"):
                return f"{name} answered PING with {reply!r}"
            op, body = client.recv_frame()
            if op != STATS:
                return f"{name} answered STATS with op {op:#x} {body[:80]!r}"
            active = json.loads(body)["connections_active"]
    except (OSError, ValueError, KeyError) as exc:
        return f"{name} did not answer PING and STATS: {exc!r}"
    if active > 1 and not wait_until(lambda: (active_connections(server) or 2) <= 1, SETTLE_S, 0.005):
        return f"{name} still counts {active_connections(server)} active connections, the asking one included"
    return None


# -- the property ----------------------------------------------------------------------------------
@settings(max_examples=EXAMPLES, deadline=None, derandomize=not FULL,     # derandomize: no example database either
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(stream=byte_streams())
@example(stream=Stream((streams.ping(b"p"), streams.echo(patterned(BIGGEST, 1)), streams.stats()), cuts=(2, 40_000),
                       pauses=(0.001, 0.002)))                               # the largest frame allowed, in pieces
@example(stream=Stream((streams.work(2000), streams.echo(b"e"), streams.bad_length(MAX_FRAME + 1, MAX_FRAME)),
                       cuts=(21,), pauses=(0.001,)))                   # one past it, behind a WORK, header split
@example(stream=Stream((streams.work(2000), streams.work(1000, 0, b"w"), streams.ping(b"q")), ending=ABORT))
def test_every_variant_replies_the_same(lab, stream):
    event(f"ending: {stream.ending}")             # what was covered: --hypothesis-show-statistics
    event(f"last frame: {stream.items[-1].kind if stream.items else 'none'}")
    if any(len(item.data) == 4 + MAX_FRAME for item in stream.items):
        event("an ECHO of the largest frame --max-frame allows")
    results = streams.send_everywhere(lab.addresses, stream, lab.pool)
    problems = streams.compare(stream, results, lab.backends, REASON_DIFFERENCES)
    sick = [problem for problem in lab.pool.map(lambda item: unhealthy(*item), lab.servers.items()) if problem]
    assert not problems and not sick, "\n".join([*sick, *problems])


# -- the comparison itself can fail ------------------------------------------------------------------
SAMPLE = Stream((streams.echo(b"abc"), streams.ping(b"id"), streams.stats(), streams.unknown_op(0x42)), cuts=(3, 9),
                pauses=(0.001, 0.0))
STATS_BODY = json.dumps({key: 0 for key in streams.STATS_KEYS} | {"backend": "epoll"}).encode()
GOOD = [(ECHO, b"abc"), (PONG, b"id"), (STATS, STATS_BODY), (ERROR, b"unknown op 0x42")]


@pytest.mark.parametrize("other, complaint", [
    (Replies(GOOD), None),
    (Replies(GOOD[:3] + [(ERROR, b"bad op 0x42")]), "does not match"),
    (Replies(GOOD[:3]), "3 replies, the protocol says 4"),
    (Replies([GOOD[1], GOOD[0], *GOOD[2:]]), "reply [0] is PONG"),
    (Replies(GOOD, ending="reset"), "ended with reset"),
    (Replies(GOOD[:2] + [(STATS, b"{}")] + GOOD[3:]), "missing"),
    (Replies(GOOD, received=sum(5 + len(p) for _, p in GOOD) + 3), "never completed"),
])
def test_compare_reports_what_differs(other, complaint):
    results = {"epoll": Replies(GOOD), "other": other}
    problems = streams.compare(SAMPLE, results, {"epoll": "epoll", "other": "epoll"})
    if complaint is None:
        assert problems == []
    else:
        assert problems[0] == "the variants disagree" and complaint in "\n".join(problems)
        assert "[3] unknown op 0x42" in problems[-1] and "sent as: 3 B, pause 1.0 ms" in problems[-1]


def test_an_abort_allows_a_prefix_only():
    aborted = Stream(SAMPLE.items, ending=ABORT)
    cut_short = Replies(GOOD[:1], ending="aborted", received=5 + 3 + 4)    # ECHO, then 4 B of the PONG
    results = {"a": Replies(GOOD[:2], ending="aborted"), "b": Replies([], ending="aborted"), "c": cut_short}
    backends = dict.fromkeys(results, "epoll")
    assert cut_short.leftover == 4 and streams.compare(aborted, results, backends) == []
    results["b"] = Replies([(PONG, b"id")], ending="aborted")
    assert "reply [0] is PONG" in "\n".join(streams.compare(aborted, results, backends))


def test_a_real_difference_is_found(lab):
    """Two live servers that differ (one takes longer frames) are told apart by the runner."""
    name = next(iter(lab.servers))
    variant = LAB_VARIANTS[name]
    with ServerProcess(variant.backend, [*variant.options, "--max-frame", str(2 * MAX_FRAME)]) as lenient:
        stream = Stream((streams.ping(b"1"), streams.echo(bytes(MAX_FRAME))), cuts=(4,), pauses=(0.001,))
        results = streams.send_everywhere({name: lab.addresses[name], "lenient": lenient.address}, stream, lab.pool)
    problems = streams.compare(stream, results, {name: variant.backend, "lenient": variant.backend})
    assert problems and problems[0] == "the variants disagree"
    assert f"{name}: reply [1] is ERROR, the protocol says ECHO" in problems
    assert results["lenient"].frames == [(PONG, b"1"), (ECHO, bytes(MAX_FRAME))]


def test_random_streams_without_hypothesis_agree_too(lab):
    """``random_stream`` (what a command line can draw without hypothesis) through the same runner."""
    rng = random.Random(862)
    for _ in range(25):
        stream = streams.random_stream(rng, MAX_FRAME)
        problems = streams.compare(stream, streams.send_everywhere(lab.addresses, stream, lab.pool), lab.backends,
                                   REASON_DIFFERENCES)
        assert not problems, "\n".join(problems)
    sick = [problem for problem in lab.pool.map(lambda item: unhealthy(*item), lab.servers.items()) if problem]
    assert not sick, "\n".join(sick)
