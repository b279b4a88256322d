"""A Locust user that speaks the lab's framed protocol: distributed load for conclab.

    locust -f loadgen/locustfile.py --headless --host 127.0.0.1:7878 -u 50 -r 50 -t 30s \
           --conclab-op echo --conclab-size 64

Each user is a closed loop over one TCP connection: send one request (built
by the lab's codec), read frames with the codec's ``FrameDecoder`` until the
reply, fire Locust's ``request`` event (response time in milliseconds, a
float). Under Locust the process is gevent-monkey-patched; the socket here
is gevent's cooperative one explicitly, so the file says what it relies on.

Locust's own percentiles are rounded buckets in milliseconds; every worker
therefore also records each latency in microseconds into an HDR histogram
(``loadgen.histo``) and, with ``--conclab-hdr-dir DIR``, writes it to
``DIR/worker-PID.json`` when the test stops. ``conclab load --engine locust``
merges those files exactly. Locust costs far more CPU per request than the
native engine (see docs/loadgen.md): use it to spread load over machines.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from gevent import socket as gsocket
from locust import User, constant, events, task
from locust.runners import MasterRunner

from conclab.loadgen.histo import Recorder
from conclab.loadgen.params import DEFAULT_TARGET, OPS, LoadParams, parse_target
from conclab.servers.protocol import ERROR, FrameDecoder

CONNECT_TIMEOUT_S = 5.0
IO_TIMEOUT_S = 10.0
RECV_SIZE = 65_536
FOLD_EVERY = 10_000          # fold the µs list into the histogram after this many requests

RECORDER = Recorder()
CLOCK = {"cpu0": time.process_time(), "wall0": time.monotonic()}


class ReplyError(Exception):
    """The server answered something other than the expected reply."""


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    group = parser.add_argument_group("conclab")
    group.add_argument("--conclab-op", default="echo", choices=OPS, help="request type (default: echo)")
    group.add_argument("--conclab-size", type=int, default=64, help="payload bytes (default: 64)")
    group.add_argument("--conclab-work", default="0,0", help="--conclab-op work: IO_US,CPU_US (default: 0,0)")
    group.add_argument("--conclab-hdr-dir", default="", help="write each worker's µs HDR histogram into this directory")


@events.test_start.add_listener
def on_test_start(environment, **_) -> None:
    RECORDER.reset()
    CLOCK.update(cpu0=time.process_time(), wall0=time.monotonic())


@events.test_stop.add_listener
def on_test_stop(environment, **_) -> None:
    save_histogram(environment)


@events.quitting.add_listener
def on_quitting(environment, **_) -> None:
    save_histogram(environment)


def save_histogram(environment) -> None:
    """This worker's µs histogram and its CPU share, for the exact merge (not on the master)."""
    options = environment.parsed_options
    directory = getattr(options, "conclab_hdr_dir", "") if options else ""
    if not directory or isinstance(environment.runner, MasterRunner):
        return
    RECORDER.fold()
    record = {"pid": os.getpid(), "requests": RECORDER.histogram.get_total_count(),
              "histogram": RECORDER.encode(), "cpu_s": time.process_time() - CLOCK["cpu0"],
              "cpu_wall_s": time.monotonic() - CLOCK["wall0"]}
    path = Path(directory) / f"worker-{os.getpid()}.json"
    path.write_text(json.dumps(record))


class LabUser(User):
    """One connection, one request at a time, as fast as replies come back."""

    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        shape = LoadParams(op=getattr(options, "conclab_op", "echo"), size=getattr(options, "conclab_size", 64),
                           work=getattr(options, "conclab_work", "0,0")).validate()
        self.request, reply = shape.request_and_reply()
        ((self.reply_op, self.reply_payload),) = FrameDecoder(max(len(reply), 1 << 20)).feed(reply)
        self.name = f"{shape.op} {shape.size}B"
        self.address = parse_target(self.host or DEFAULT_TARGET)
        self.sock = None

    def on_stop(self) -> None:
        self._close()

    @task
    def request_reply(self) -> None:
        started = time.perf_counter_ns()
        error = None
        try:
            self._exchange()
        except (OSError, ReplyError) as exc:
            error = exc
            self._close()
        elapsed = time.perf_counter_ns() - started
        if error is None:
            RECORDER.values.append(elapsed // 1000)
            if len(RECORDER.values) >= FOLD_EVERY:
                RECORDER.fold()
        self.environment.events.request.fire(
            request_type="CONCLAB", name=self.name, response_time=elapsed / 1e6,
            response_length=len(self.reply_payload), exception=error, context={})

    def _exchange(self) -> None:
        if self.sock is None:
            self._connect()
        self.sock.sendall(self.request)
        op, payload = self._read_frame()
        if op == ERROR:
            raise ReplyError(f"server error: {payload.decode('utf-8', 'replace')}")
        if op != self.reply_op or payload != self.reply_payload:
            raise ReplyError(f"unexpected reply op 0x{op:02x}, {len(payload)} bytes")

    def _read_frame(self) -> tuple[int, bytes]:
        while not self.frames:
            data = self.sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionResetError("closed by the server")
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    def _connect(self) -> None:
        self.sock = gsocket.create_connection(self.address, timeout=CONNECT_TIMEOUT_S)
        self.sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        self.sock.settimeout(IO_TIMEOUT_S)
        self.decoder = FrameDecoder(max(len(self.reply_payload) + 16, 1 << 20))
        self.frames: list = []

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
