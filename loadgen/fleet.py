"""Running the load from one or several processes, started together, results gathered.

A *worker function* ``fn(spec, channel)`` does one process's share: it
connects, says ``channel.ready(info)``, waits for ``channel.wait_go()`` (the
common start time), runs, and hands back ``channel.result(dict)``. The same
function runs in this process (``run_local``: one process, no spawn cost, so
``run_load`` is cheap to call) or in P spawned processes (``Fleet``), which
begin at one shared ``perf_counter_ns`` instant (CLOCK_MONOTONIC is the same
clock in every process) and publish progress through shared memory.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queue_module
import resource
import signal
import threading
import time
from dataclasses import dataclass

from .params import LoadError, LoadParams

START_DELAY_S = 0.05       # the start instant is this far after "go", so every process is waiting for it
READY_TIMEOUT_S = 120.0    # connecting (or ramping) must be over by then
RESULT_GRACE_S = 30.0      # after the planned end, how long processes may take to hand in their results
POLL_S = 0.25              # how often the parent looks at progress while it waits
FD_RESERVE = 64            # descriptors a process keeps for itself (epoll, pipes, imports)


_STOP = threading.Event()        # this process was asked to end the run early (SIGINT/SIGTERM)


def request_stop() -> None:
    """End the current run early: every process winds down at its next tick and still reports."""
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


@contextlib.contextmanager
def graceful_interrupts():
    """Within the block, the first SIGINT/SIGTERM ends the run early (results still come); a second one aborts."""
    _STOP.clear()

    def handler(signum, frame):
        if _STOP.is_set():
            raise KeyboardInterrupt
        request_stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _STOP.clear()


@dataclass
class WorkerSpec:
    """One process's share of the run."""

    index: int
    params: LoadParams
    conns: int
    rate: float | None = None
    phase: float = 0.0                   # fraction of a slot this process's schedule is shifted by
    procs: int = 1                       # how many processes share the run
    sources: list | None = None
    cpu: int | None = None


def setup_process(cpu: int | None) -> None:
    """Pin to ``cpu`` (if any) and raise the descriptor limit to the hard limit."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def fd_budget() -> int:
    """How many connections one process can hold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = hard if hard != resource.RLIM_INFINITY else soft
    return max(limit - FD_RESERVE, 1)


def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal whole shares."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


@contextlib.contextmanager
def pinned(cpu: int | None):
    """Pin this process for the block, then give the old affinity back."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class LocalChannel:
    """The channel of a worker function run in this very process."""

    def __init__(self, on_ready=None, on_progress=None) -> None:
        self.on_ready = on_ready or (lambda infos: None)
        self.on_progress = on_progress or (lambda count: None)
        self.outcome: dict | None = None
        self.start_ns = 0

    def ready(self, info: dict) -> None:
        self.on_ready([info])

    def wait_go(self) -> int:
        self.start_ns = time.perf_counter_ns()
        return self.start_ns

    def progress(self, count: int) -> None:
        self.on_progress(count)

    def result(self, outcome: dict) -> None:
        self.outcome = outcome

    def stopped(self, timeout: float = 0.0) -> bool:
        return _STOP.is_set()


def run_local(fn, spec: WorkerSpec, on_ready=None, on_progress=None) -> list[dict]:
    channel = LocalChannel(on_ready, on_progress)
    with pinned(spec.cpu):
        fn(spec, channel)
    return [channel.outcome]


class RemoteChannel:
    """The channel of a worker function in a spawned process (picklable primitives only)."""

    def __init__(self, index, results, go, start, counters, stop) -> None:
        self.index, self.results, self.go, self.start, self.counters, self.stop = index, results, go, start, counters, stop

    def ready(self, info: dict) -> None:
        self.send("ready", info)

    def send(self, kind: str, payload: dict) -> None:
        self.results.put((kind, self.index, payload))

    def wait_go(self) -> int | None:
        return self.start.value if self.go.wait(READY_TIMEOUT_S) and self.start.value else None

    def progress(self, count: int) -> None:
        self.counters[self.index] = count

    def result(self, outcome: dict) -> None:
        self.send("result", outcome)

    def stopped(self, timeout: float = 0.0) -> bool:
        return self.stop.wait(timeout) if timeout else self.stop.is_set()


def _remote_main(fn, spec: WorkerSpec, channel: RemoteChannel) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)             # the parent decides; it passes "stop" on
    try:
        setup_process(spec.cpu)
        fn(spec, channel)
    except BaseException as exc:                       # noqa: BLE001 - reported to the parent, which raises
        channel.results.put(("error", spec.index, f"{type(exc).__name__}: {exc}"))


class Fleet:
    """P spawned processes running one worker function each."""

    def __init__(self, fn, specs: list[WorkerSpec]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.results = ctx.Queue()
        self.go, self.stop = ctx.Event(), ctx.Event()
        self.start = ctx.RawValue("q", 0)
        self.counters = ctx.RawArray("q", len(specs))
        self.procs = [ctx.Process(target=_remote_main, daemon=True, name=f"conclab-load-{s.index}",
                                  args=(fn, s, RemoteChannel(s.index, self.results, self.go, self.start,
                                                             self.counters, self.stop)))
                      for s in specs]
        for proc in self.procs:
            proc.start()

    def _collect(self, kind: str, timeout: float, on_wait=None) -> list[dict]:
        """One ``kind`` message from every process, in index order; raise LoadError on failure or timeout."""
        got: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.procs):
            if time.monotonic() > deadline:
                raise LoadError(f"load processes did not report {kind!r} within {timeout:.0f} s")
            if _STOP.is_set():
                self.stop.set()                        # pass an early end on to every process
            try:
                what, index, payload = self.results.get(timeout=POLL_S)
            except queue_module.Empty:
                self._check_alive(got)
                if on_wait:
                    on_wait(sum(self.counters))
                continue
            if what == "error":
                raise LoadError(f"load process {index} failed: {payload}")
            if what == kind:
                got[index] = payload
        return [got[i] for i in range(len(self.procs))]

    def _check_alive(self, got: dict) -> None:
        for i, proc in enumerate(self.procs):
            if i not in got and not proc.is_alive() and proc.exitcode not in (0, None):
                raise LoadError(f"load process {i} died (exit status {proc.exitcode})")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> list[dict]:
        return self._collect("ready", timeout)

    def wait_for(self, kind: str, timeout: float, on_progress=None) -> list[dict]:
        """Every process's ``kind`` message (sent with ``channel.send``)."""
        return self._collect(kind, timeout, on_progress)

    def start_all(self) -> int:
        self.start.value = time.perf_counter_ns() + int(START_DELAY_S * 1e9)
        self.go.set()
        return self.start.value

    def results_within(self, timeout: float, on_progress=None) -> list[dict]:
        return self._collect("result", timeout, on_progress)

    def close(self) -> None:
        self.stop.set()
        self.go.set()                                  # a process still waiting for "go" sees start 0 and leaves
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
