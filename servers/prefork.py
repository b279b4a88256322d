"""``--procs N``: N worker processes of one Python backend serve one port.

One interpreter runs Python on one core at a time (the GIL); N processes are the
standard way past it. The parent opens the port, forks N workers, and from then
on only supervises: every worker runs the backend exactly as a single-process
server would (``serve(listener, config, stats)``), on a listener of its own.

**One listener per worker, SO_REUSEPORT.** The parent binds N sockets to the
port with SO_REUSEPORT before forking, and worker i keeps socket i. The kernel
spreads new connections over them by a hash of the 4-tuple, so the workers never
compete for one accept queue: no thundering herd whatever the backend's accept
loop (a blocking accept, a selector, asyncio, libuv, gevent's hub), and each
backend sees what it sees alone. The price: a busy worker still gets its share
of new connections (they wait in its queue while an idle sibling could take
them), where one shared listener lets whoever is free accept. To keep a stranger
from joining our port (any process of the same user that also sets
SO_REUSEPORT could), the port is first reserved by a plain bound socket: it
fails with "address already in use" as a single-process server would, and the
reuse-port listeners bind next to it, then it is closed.

**What the parent does.** It forks before any thread exists, then waits on the
workers' report sockets and SIGTERM/SIGINT (``StopSignals``):

* each worker says ``ready`` where a single-process server prints
  ``listening on`` (``base.announce_to``); once all have, the parent prints the
  one ``listening on HOST:PORT`` line;
* SIGTERM or SIGINT: the parent sends every worker SIGTERM, so each drains by
  the contract's rules at the same moment (stops accepting, answers what it
  received, closes idle connections, aborts the rest at --drain-timeout), and
  reports its final counters as one JSON line over its socket; the parent
  prints one final line with the workers' counters summed (``pid``: the
  parent's; ``procs``; ``workers_failed``) and exits 0;
* a worker that exits by itself ends the server: the others are drained as
  above. A worker that died without its final line (a crash, a kill) is named
  on stderr, counted in ``workers_failed``, and makes the exit status 1;
* a worker still there ``STRAGGLER_GRACE_S`` after the drain deadline is
  killed (and counted failed).

**No worker outlives the parent.** Each asks the kernel for SIGTERM when the
parent dies (PR_SET_PDEATHSIG), so a SIGKILLed parent's workers drain and exit
by themselves; a worker whose parent died before it could ask exits at once.

**Controls across workers.** ``--max-conns`` and ``--max-buffered`` are split:
each worker gets ceil(cap / N) (``ServerConfig.per_worker``): no counter shared
across processes to lock, and the server admits at most N - 1 connections over
the cap (it may turn one away while a sibling has room; the kernel's even spread
makes that rare once the cap is large). STATS is answered by one worker, with its own counters, its
``pid`` and ``procs``. ``--metrics-port`` is served by the parent alone, one
endpoint per server as with one process: at each scrape it asks every worker
for its counters and open fds over a private socket (``WorkerView``) and sums
them; the CLOSE_WAIT count is by port, so it covers every worker already.
"""
from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace

import psutil

from . import load, metrics, processes
from .base import (ABORT_GRACE, StartupError, StopSignals, address_of, announce_to, final_counters, open_listener,
                   process_facts, warn)
from .config import ServerConfig
from .stats import COUNTERS, Stats

STRAGGLER_GRACE_S = 5.0        # past the drain deadline (and ABORT_GRACE): a worker still there is killed
CONTROL_TIMEOUT_S = 2.0        # a scrape waits this long for each worker's counters
SUMMED = (*COUNTERS, "connections_aborted")
EXIT_WORKER_FAILED = 1


@dataclass
class Worker:
    """The parent's handle on one worker: its pid, its report socket (``ready``, then the final JSON line;
    EOF when it exits), and its control socket (one byte asks for its counters: the metrics endpoint)."""
    pid: int
    report: socket.socket
    control: socket.socket | None
    received: bytes = b""
    ready: bool = False
    final: dict | None = None
    status: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def read(self) -> bool:
        """Take what the worker reported; False at EOF (it has exited, or is about to)."""
        try:
            data = self.report.recv(65536)
        except OSError:
            data = b""
        self.received += data
        *lines, self.received = self.received.split(b"\n")
        for line in lines:
            if line == b"ready":
                self.ready = True
            elif line.startswith(b"{"):
                with contextlib.suppress(ValueError):     # a torn line is no final line: the worker failed
                    self.final = json.loads(line)
        return bool(data)

    def signal(self, sig) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def reap(self) -> int:
        """Wait for the exited worker (its report socket is at EOF): its exit status, as Popen gives it."""
        if self.status is None:
            self.status = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            self.report.close()
            if self.control is not None:
                with self.lock:
                    self.control.close()
        return self.status

    @property
    def failed(self) -> bool:
        return self.final is None or self.status != 0

    def counters(self) -> dict | None:
        """Its live counters and open fds (a scrape), or None if it does not answer."""
        if self.control is None or self.status is not None:
            return None
        with self.lock, contextlib.suppress(OSError, ValueError):
            self.control.settimeout(CONTROL_TIMEOUT_S)
            self.control.sendall(b"?")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = self.control.recv(65536)
                if not chunk:
                    return None
                answer += chunk
            return json.loads(answer)
        return None


# -- the parent -----------------------------------------------------------------------------------

def serve(backend: str, config: ServerConfig) -> int:
    """Serve with ``config.procs`` workers until SIGTERM/SIGINT; print the summed final line."""
    listeners = open_listeners(config)
    address, port = address_of(listeners[0]), listeners[0].getsockname()[1]
    workers = start_workers(backend, config, listeners)
    exporter = None
    try:
        with StopSignals(config) as stop:
            if config.metrics_port is not None:
                exporter = metrics.start(config.host, config.metrics_port, WorkerView(backend, workers), port)
            serve_until_stopped(workers, stop, address)
        drain(workers, config)
    finally:
        for worker in workers:                        # only after an error: a drained worker is reaped already
            worker.signal(signal.SIGKILL)
            worker.reap()
        if exporter is not None:
            exporter.shutdown()
    print(json.dumps(summed(backend, config, workers)), flush=True)
    return EXIT_WORKER_FAILED if any(worker.failed for worker in workers) else 0


def open_listeners(config: ServerConfig) -> list[socket.socket]:
    """``config.procs`` SO_REUSEPORT listeners on one port, reserved first by a plain bound socket."""
    reserved = open_listener(config, listen=False)    # "address already in use" if anyone listens there
    port = reserved.getsockname()[1]
    listeners: list[socket.socket] = []
    try:
        for _ in range(config.procs):
            listeners.append(open_listener(replace(config, port=port), reuse_port=True))
    except StartupError:
        for listener in listeners:
            listener.close()
        raise
    finally:
        reserved.close()
    return listeners


def start_workers(backend: str, config: ServerConfig, listeners: list[socket.socket]) -> list[Worker]:
    """Fork one worker per listener; the parent keeps none of the listeners."""
    sys.stdout.flush()                                # buffered output would be written by every fork
    sys.stderr.flush()
    parent = os.getpid()
    workers: list[Worker] = []
    for listener in listeners:
        report, report_end = socket.socketpair()
        control, control_end = socket.socketpair() if config.metrics_port is not None else (None, None)
        try:
            pid = os.fork()
        except OSError as exc:                        # out of processes or memory: none of this server stays
            for worker in workers:
                worker.signal(signal.SIGKILL)
                worker.reap()
            raise StartupError(f"cannot start worker {len(workers) + 1} of {len(listeners)}: {exc.strerror}") from None
        if pid == 0:                                  # the worker: never returns
            inherited = [other for other in listeners if other is not listener]
            inherited += [s for w in workers for s in (w.report, w.control) if s is not None]
            inherited += [s for s in (report, control) if s is not None]
            worker_main(backend, config, listener, report_end, control_end, parent, inherited)
        for end in (report_end, control_end):
            if end is not None:
                end.close()
        workers.append(Worker(pid, report, control))
    for listener in listeners:
        listener.close()
    return workers


def serve_until_stopped(workers: list[Worker], stop: StopSignals, address: str) -> None:
    """Print the ready line once every worker is ready; return at a stop signal, or once a worker exits."""
    selector = selectors.DefaultSelector()
    selector.register(stop, selectors.EVENT_READ)
    for worker in workers:
        selector.register(worker.report, selectors.EVENT_READ, worker)
    announced = False
    with selector:
        while not stop.requested:
            for key, _ in selector.select():
                if key.data is None:
                    stop.check()
                elif not key.data.read():
                    exited(key.data)
                    return
            if not announced and all(worker.ready for worker in workers):
                print(f"listening on {address}", flush=True)
                announced = True


def exited(worker: Worker) -> None:
    """A worker's report socket is at EOF: reap it, and name it on stderr if it failed."""
    status = worker.reap()
    if worker.failed:
        warn(f"worker {worker.pid} exited with status {status} without its final counters: "
             "its counters are missing from the final line, and the exit status will be 1")


def drain(workers: list[Worker], config: ServerConfig) -> None:
    """SIGTERM every worker (each drains by the contract), collect their final lines, kill stragglers."""
    for worker in workers:
        worker.signal(signal.SIGTERM)
    deadline = time.monotonic() + config.drain_timeout + ABORT_GRACE + STRAGGLER_GRACE_S
    selector = selectors.DefaultSelector()
    with selector:
        for worker in workers:
            if worker.status is None:
                selector.register(worker.report, selectors.EVENT_READ, worker)
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                if not key.data.read():
                    selector.unregister(key.fileobj)
                    exited(key.data)
    for worker in workers:
        if worker.status is None:
            warn(f"worker {worker.pid} still running {STRAGGLER_GRACE_S:g} s past the drain deadline: killed")
            worker.signal(signal.SIGKILL)
            worker.reap()


def summed(backend: str, config: ServerConfig, workers: list[Worker]) -> dict:
    """The final line: the workers' counters summed, under the parent's pid."""
    total = {"event": "stopped", "backend": backend, "pid": os.getpid(), **process_facts(config),
             "cpu_offload": config.cpu_offload,
             **dict.fromkeys(SUMMED, 0), "workers_failed": sum(worker.failed for worker in workers)}
    for worker in workers:
        for key in SUMMED:
            total[key] += (worker.final or {}).get(key, 0)
    return total


class WorkerView:
    """What the metrics endpoint reads in the parent: every worker's counters and open fds, summed."""

    def __init__(self, backend: str, workers: list[Worker]) -> None:
        self.backend = backend
        self.workers = workers
        self.fds = 0

    def snapshot(self) -> dict:
        answers = [answer for answer in (worker.counters() for worker in self.workers) if answer is not None]
        self.fds = sum(answer.get("open_fds", 0) for answer in answers)
        total = dict.fromkeys(COUNTERS, 0)
        for answer in answers:
            for key in COUNTERS:
                total[key] += answer.get(key, 0)
        return {"backend": self.backend, "pid": os.getpid(), **total}

    def open_fds(self) -> int:
        """The workers' open fds at the last snapshot, plus the parent's own."""
        return self.fds + psutil.Process().num_fds()


# -- a worker -------------------------------------------------------------------------------------

def worker_main(backend: str, config: ServerConfig, listener, report, control, parent: int, inherited) -> None:
    """Run the backend on this worker's listener, report to the parent, and leave the process (os._exit)."""
    status = 1
    try:
        processes.signal_on_parent_death(signal.SIGTERM)
        for sock in inherited:
            sock.close()
        if os.getppid() == parent:                    # else the parent died before we asked: nothing to serve
            run_worker(backend, config.per_worker(), listener, report, control)
        status = 0
    except BaseException:                             # noqa: BLE001 - a worker must never return into the parent's code
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


def run_worker(backend: str, config: ServerConfig, listener, report, control) -> None:
    stats = Stats(backend, config.connection_cap)
    stats.facts = {**process_facts(config), "cpu_offload": config.cpu_offload}
    announce_to(lambda: tell(report, b"ready\n"))
    if control is not None:
        threading.Thread(target=answer_scrapes, args=(control, stats), name="counters", daemon=True).start()
    load(backend)(listener, config, stats)
    tell(report, json.dumps(final_counters(stats)).encode() + b"\n")


def tell(report: socket.socket, line: bytes) -> None:
    """Report to the parent; a parent that is gone hears nothing (and sends us SIGTERM as it dies)."""
    with contextlib.suppress(OSError):
        report.sendall(line)


def answer_scrapes(control: socket.socket, stats: Stats) -> None:
    """The worker's side of ``Worker.counters``: each byte from the parent gets one JSON line."""
    process = psutil.Process()
    with contextlib.suppress(OSError):
        while control.recv(1):
            answer = {**stats.snapshot(), "open_fds": process.num_fds()}
            control.sendall(json.dumps(answer).encode() + b"\n")
