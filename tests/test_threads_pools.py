"""The blocking models' own machinery, in-process on loopback sockets (no server process).

threads.py and threadpool.py: signals that only set a flag, a connection shed when no thread can be
had, WORK waits the drain deadline ends, the request-dispatch loop (workers never wait for a peer,
replies in order, a failing worker reported and its connection aborted) and the write policy
(a reply that makes no progress for --idle-timeout is reset and counted an idle timeout).
"""
from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from conclab.servers import session as session_module
from conclab.servers import threads
from conclab.servers.base import AbortableWait, ConnectionSet, StopSignals
from conclab.servers.config import ServerConfig
from conclab.servers.protocol import ECHO, ERROR, PING, PONG, WORK, FrameDecoder, encode, encode_work
from conclab.servers.stats import Stats
from conclab.servers.threadpool import RequestLoop

BIG_FRAME = encode(ECHO, b"n" * (64 * 1024 - 1))


def loopback_pair():
    """(server side, client side) of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return server, client


def read_frames(sock, count: int, timeout: float = 5.0) -> list:
    """The next ``count`` frames on sock (fewer if it closes first)."""
    sock.settimeout(timeout)
    decoder, frames = FrameDecoder(max_frame=2**32 - 1), []
    while len(frames) < count:
        data = sock.recv(65536)
        if not data:
            break
        frames += decoder.feed(data)
    return frames


def ending(sock, timeout: float = 5.0) -> str:
    """Read until the peer closes: 'eof' or 'reset' ('open' if it does not within timeout)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "open"
    return "eof"


def push_without_reading(sock, frame: bytes, limit: int) -> threading.Thread:
    """A thread that sends ``frame`` until ``limit`` bytes went or the kernel takes no more for 0.5 s."""
    def push():
        sock.settimeout(0.5)
        sent = 0
        with contextlib.suppress(OSError):
            while sent < limit:
                sock.sendall(frame)
                sent += len(frame)
    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    return pusher


# -- signals ----------------------------------------------------------------------------------------
def test_sigterm_only_sets_a_flag_and_wakes_the_selector():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with StopSignals(ServerConfig()) as stop, selectors.DefaultSelector() as selector:
            selector.register(stop, selectors.EVENT_READ)
            stop.wake()                                    # a worker's wake-up is not a stop
            assert selector.select(1.0) and not stop.check()
            os.kill(os.getpid(), signal.SIGTERM)           # raises nothing, anywhere
            assert selector.select(2.0)
            assert stop.check() and stop.requested
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN   # a second one cannot cut the drain short
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# -- threads: out of threads, shed ------------------------------------------------------------------
def test_a_connection_no_thread_can_serve_is_shed_and_counted_rejected():
    config = ServerConfig()
    stats, connections = Stats("threads", config.max_conns), ConnectionSet()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        client = socket.create_connection(listener.getsockname())

        def start(sock):
            raise RuntimeError("can't start new thread")
        pause = threads.accept_batch(listener, config, stats, connections, start, SimpleNamespace(requested=False))
    with client:
        assert read_frames(client, 1) == [(ERROR, b"server busy")]
        assert ending(client) in ("eof", "reset")
    assert pause == threads.THREAD_BACKOFF
    counters = stats.snapshot()
    assert (counters["connections_rejected"], counters["connections_active"], counters["connections_total"]) == (1, 0, 0)
    assert len(connections) == 0


# -- WORK waits the drain deadline ends -------------------------------------------------------------
def test_abortable_wait_sleeps_and_abort_ends_it():
    wait = AbortableWait()
    began = time.monotonic()
    wait(0.05)
    assert time.monotonic() - began >= 0.05
    outcome = []

    def sleeper():
        try:
            wait(30.0)
        except ConnectionAbortedError:
            outcome.append(time.monotonic())
    thread = threading.Thread(target=sleeper)
    thread.start()
    time.sleep(0.1)
    aborted_at = time.monotonic()
    wait.abort()
    thread.join(2.0)
    assert outcome and outcome[0] - aborted_at < 1.0
    with pytest.raises(ConnectionAbortedError):
        wait(30.0)                                         # after the deadline, at once


def test_threads_handler_ends_a_work_wait_at_the_drain_deadline():
    config = ServerConfig()
    stats, connections, wait = Stats("threads", config.max_conns), ConnectionSet(), AbortableWait()
    server, client = loopback_pair()
    stats.try_open()
    connections.add(server)
    handler = threading.Thread(target=threads.handle, args=(server, config, stats, connections, wait))
    handler.start()
    with client:
        client.sendall(encode_work(10_000_000, 0, b"ten seconds"))
        time.sleep(0.2)
        wait.abort()
        handler.join(2.0)
        assert not handler.is_alive()
        assert ending(client) == "reset"                   # aborted, nothing left behind
    assert stats.snapshot()["connections_active"] == 0 and len(connections) == 0


# -- the write policy (threads) -----------------------------------------------------------------------
@pytest.mark.slow
def test_a_reply_the_peer_stops_taking_is_reset_and_counted_idle():
    config = ServerConfig(idle_timeout=0.5)
    stats, connections = Stats("threads", config.max_conns), ConnectionSet()
    server, client = loopback_pair()
    stats.try_open()
    connections.add(server)
    handler = threading.Thread(target=threads.handle, args=(server, config, stats, connections, AbortableWait()))
    began = time.monotonic()
    handler.start()
    with client:
        pusher = push_without_reading(client, BIG_FRAME, 8 << 20)
        handler.join(10.0)
        assert not handler.is_alive()
        assert time.monotonic() - began < 6.0
        assert ending(client) == "reset"
        pusher.join(5.0)
    assert stats.snapshot()["idle_timeouts"] == 1 and stats.snapshot()["connections_active"] == 0


# -- the request-dispatch loop ----------------------------------------------------------------------
@contextlib.contextmanager
def request_loop(workers: int = 2, **settings):
    """A RequestLoop on a loopback listener, polled by a thread of its own; yields (loop, address)."""
    config = ServerConfig(dispatch="request", **settings)
    stats = Stats("threadpool", config.max_conns)
    stop = StopSignals(config)                             # not entered: no signal handlers in the test process
    listener = socket.create_server(("127.0.0.1", 0))
    pool = ThreadPoolExecutor(workers)
    loop = RequestLoop(listener, config, stats, pool, ConnectionSet(), AbortableWait(), stop)
    done = threading.Event()

    def run():
        while not done.is_set():
            loop.poll(0.02)
        loop.wait.abort()
        loop.abort_all()
    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        yield loop, listener.getsockname()
    finally:
        done.set()
        runner.join(5.0)
        pool.shutdown()
        loop.selector.close()
        for closable in (listener, stop.reader, stop.writer):
            closable.close()


def test_request_loop_answers_in_order_across_waits_and_workers():
    with request_loop() as (loop, address), socket.create_connection(address) as client:
        client.sendall(encode_work(30_000, 0, b"slow") + encode(PING, b"a") + encode_work(0, 200, b"cpu")
                       + encode(ECHO, b"b") * 3)
        frames = read_frames(client, 6)
    assert [op for op, _ in frames] == [WORK, PONG, WORK, ECHO, ECHO, ECHO]
    assert frames[1] == (PONG, b"a") and frames[3] == (ECHO, b"b")


def test_request_loop_client_that_never_reads_holds_no_worker():
    with request_loop(workers=1, idle_timeout=30.0) as (loop, address):
        with socket.create_connection(address) as clog:
            pusher = push_without_reading(clog, BIG_FRAME, 6 << 20)
            time.sleep(1.0)                                # its replies fill every buffer there is
            with socket.create_connection(address) as other:
                began = time.monotonic()
                other.sendall(encode(PING, b"anyone?"))
                assert read_frames(other, 1, timeout=2.0) == [(PONG, b"anyone?")]
                assert time.monotonic() - began < 1.0
            clog.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        pusher.join(5.0)


def test_request_loop_aborts_the_connection_of_a_failing_worker(monkeypatch, capsys):
    def fail(self, now):
        raise RuntimeError("injected failure")
    monkeypatch.setattr(session_module.Request, "run", fail)
    with request_loop() as (loop, address):
        with socket.create_connection(address) as client:
            client.sendall(encode(PING, b"x"))
            assert ending(client) in ("reset", "eof")      # not left open, busy forever
            deadline = time.monotonic() + 2.0
            while loop.stats.snapshot()["connections_active"] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert loop.stats.snapshot()["connections_active"] == 0 and not loop.conns
    lines = [line for line in capsys.readouterr().err.splitlines() if "injected failure" in line]
    assert len(lines) == 1 and "pool worker failed" in lines[0]
