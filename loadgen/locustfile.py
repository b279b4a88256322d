"""A Locust user that speaks the lab's framed protocol: distributed load for conclab.

    locust -f loadgen/locustfile.py --headless --host 127.0.0.1:7878 -u 50 -r 50 -t 30s \
           --conclab-op echo --conclab-size 64 --conclab-out result.json

Each user is a closed loop over one TCP connection: send one request (built
by the lab's codec), read frames with the codec's ``FrameDecoder`` until the
reply, fire Locust's ``request`` event (response time in milliseconds, a
float). Under Locust the process is gevent-monkey-patched; the socket here
is gevent's cooperative one explicitly, so the file says what it relies on.

Exact latencies across machines. Locust's own percentiles are rounded
millisecond buckets, so every worker also records each latency in µs into an
HDR histogram (``loadgen.histo``) and counts its failures by the lab's error
kinds. When the test stops, each worker sends that report to the master over
Locust's message channel (``runner.send_message``, ``loadgen.locust_merge``);
the master keeps one per worker and, with ``--conclab-out PATH``, writes their
exact merge to PATH on its own machine when it quits. A stand-alone
``locust`` (no master) reports to itself the same way.

The stop. Locust's headless master quits at ``--run-time`` by telling its
workers to quit and giving them half a second, too little for a worker whose
users are finishing a request to report. On the master (and a stand-alone
run) this file therefore takes ``--run-time`` over: at that time it stops the
test (the master sends "stop" and waits until every worker says it stopped;
a worker's report travels before that word on the same channel), waits for
any report still missing (at most ``REPORT_WAIT_S``) and for the stopped
workers to say they are ready again (Locust's workers do that after
``--stop-timeout``; only workers the master knows get its "quit"), then quits.
Users are stopped between requests (give ``--stop-timeout``: Locust's default
0 kills them mid-request), so every request the server answered is counted by
exactly one worker.

Locust costs far more CPU per request than the native engine (see
docs/loadgen.md): use it to spread load over machines.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import gevent
from gevent import socket as gsocket
from locust import User, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

from conclab.loadgen.histo import Recorder
from conclab.loadgen.locust_merge import REPORT_MESSAGE, failure_kind, merge_reports, worker_report
from conclab.loadgen.params import DEFAULT_TARGET, OPS, LoadParams, parse_target
from conclab.servers.protocol import ERROR, FrameDecoder

CONNECT_TIMEOUT_S = 5.0
IO_TIMEOUT_S = 10.0
RECV_SIZE = 65_536
FOLD_EVERY = 10_000          # fold the µs list into the histogram after this many requests
REPORT_WAIT_S = 30.0         # after the stop, how long the master waits for a report still missing
REPORT_POLL_S = 0.05

RECORDER = Recorder()                 # this worker's latencies (µs) of answered requests
FAILURES: Counter = Counter()         # this worker's failed requests by kind
CLOCK = {"cpu0": time.process_time(), "wall0": time.monotonic()}
MASTER = {"reports": {}, "expected": None, "run_time": None}     # the master's (or a stand-alone run's) side


class ReplyError(Exception):
    """The server answered something other than the expected reply."""


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    group = parser.add_argument_group("conclab")
    group.add_argument("--conclab-op", default="echo", choices=OPS, help="request type (default: echo)")
    group.add_argument("--conclab-size", type=int, default=64, help="payload bytes (default: 64)")
    group.add_argument("--conclab-work", default="0,0", help="--conclab-op work: IO_US,CPU_US (default: 0,0)")
    group.add_argument("--conclab-out", default="",
                       help="master: write the workers' merged reports (exact µs HDR histogram, failures by kind, "
                            "CPU) as JSON to this file when quitting")


# -- every process ---------------------------------------------------------------------------------
@events.init.add_listener
def on_init(environment, runner, **_) -> None:
    """The master (or a stand-alone run) receives the reports and owns the stop; a worker only sends."""
    if isinstance(runner, WorkerRunner):
        return
    runner.register_message(REPORT_MESSAGE, on_report)
    options = environment.parsed_options
    if options is not None and getattr(options, "run_time", None):
        MASTER["run_time"], options.run_time = options.run_time, None      # see "The stop" above


@events.test_start.add_listener
def on_test_start(environment, **_) -> None:
    RECORDER.reset()
    FAILURES.clear()
    CLOCK.update(cpu0=time.process_time(), wall0=time.monotonic())
    if not isinstance(environment.runner, WorkerRunner) and MASTER["run_time"]:
        gevent.spawn(stop_then_quit, environment, MASTER["run_time"])


@events.test_stop.add_listener
def on_test_stop(environment, **_) -> None:
    """A worker (or a stand-alone run) sends its report; the master has none of its own."""
    if isinstance(environment.runner, MasterRunner):
        return
    report = worker_report(RECORDER, FAILURES, time.process_time() - CLOCK["cpu0"], time.monotonic() - CLOCK["wall0"])
    environment.runner.send_message(REPORT_MESSAGE, report)


# -- the master ------------------------------------------------------------------------------------
def on_report(environment, msg, **_) -> None:
    MASTER["reports"][msg.node_id] = msg.data


@events.test_stopping.add_listener
def on_test_stopping(environment, **_) -> None:
    """How many reports to expect: every worker connected now is told to stop and reports."""
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        MASTER["expected"] = len(runner.clients.all)
    elif not isinstance(runner, WorkerRunner):
        MASTER["expected"] = 1


def stop_then_quit(environment, run_time: float) -> None:
    """Stop, wait for every report, wait for the workers to be ready again, quit (which tells them to quit)."""
    runner = environment.runner
    gevent.sleep(run_time)
    runner.stop()                      # the master: returns once every worker said it stopped
    deadline = time.monotonic() + REPORT_WAIT_S
    wait_for(lambda: len(MASTER["reports"]) >= (MASTER["expected"] or 0), deadline)
    if isinstance(runner, MasterRunner):           # a stopped worker is back after --stop-timeout; only then
        wait_for(lambda: all(node in runner.clients for node in MASTER["reports"]), deadline)   # it gets "quit"
    runner.quit()


def wait_for(condition, deadline: float) -> None:
    while not condition() and time.monotonic() < deadline:
        gevent.sleep(REPORT_POLL_S)


@events.quitting.add_listener
def on_quitting(environment, **_) -> None:
    options = environment.parsed_options
    path = getattr(options, "conclab_out", "") if options else ""
    if not path or isinstance(environment.runner, WorkerRunner):
        return
    merged = merge_reports(list(MASTER["reports"].values()), MASTER["expected"])
    Path(path).write_text(json.dumps(merged))


# -- the user --------------------------------------------------------------------------------------
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
        else:
            FAILURES[failure_kind(str(error))] += 1
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
