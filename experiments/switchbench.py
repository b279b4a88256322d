"""Context-switch microbenchmarks, one per process: ``python -m conclab.experiments.switchbench BENCH``.

Each benchmark hands control back and forth between two parties N times and
reports nanoseconds per switch (one hand-off in one direction; a round trip is
two switches):

* ``generator``: ``gen.send()`` into a generator and its ``yield`` back;
* ``greenlet``: ``greenlet.switch()`` between two greenlets;
* ``asyncio`` / ``uvloop``: two tasks completing each other's futures, every
  hand-off a trip through the event loop;
* ``thread``: two Python threads releasing each other's lock (a kernel wake-up
  plus a GIL hand-off each way); the harness runs it pinned to one CPU and
  unpinned;
* ``process_pipe``: two processes writing one byte into each other's pipe.

The caller sets the CPU affinity; the JSON on stdout has the median, min and
max over ``--rounds`` rounds, the iterations per round, and the context switches
and CPU time (getrusage: all threads, and the child) spent in the measured
rounds; experiments/switch.py turns those into per-switch figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import threading
import time

CALIBRATE_START = 1000          # iterations of the first calibration try
CALIBRATE_FRACTION = 0.2        # calibrate until one try takes this fraction of a round


def bench_generator(n: int) -> int:
    def echo():
        value = yield
        while True:
            value = yield value
    gen = echo()
    next(gen)
    send = gen.send
    t0 = time.perf_counter_ns()
    for i in range(n):
        send(i)
    return time.perf_counter_ns() - t0


def bench_greenlet(n: int) -> int:
    from greenlet import getcurrent, greenlet
    main = getcurrent()

    def other():
        while True:
            main.switch()
    peer = greenlet(other)
    switch = peer.switch
    t0 = time.perf_counter_ns()
    for _ in range(n):
        switch()
    elapsed = time.perf_counter_ns() - t0
    peer.throw()                   # end it (GreenletExit)
    return elapsed


async def _future_pingpong(n: int) -> int:
    loop = asyncio.get_running_loop()
    state = {"a": loop.create_future(), "b": loop.create_future()}

    async def other():
        for _ in range(n):
            await state["b"]
            state["b"] = loop.create_future()
            state["a"].set_result(None)
    task = loop.create_task(other())
    await asyncio.sleep(0)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        state["b"].set_result(None)
        await state["a"]
        state["a"] = loop.create_future()
    elapsed = time.perf_counter_ns() - t0
    await task
    return elapsed


def bench_asyncio(n: int) -> int:
    return asyncio.run(_future_pingpong(n))


def bench_uvloop(n: int) -> int:
    import uvloop
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_future_pingpong(n))


def bench_thread(n: int) -> int:
    ping, pong = threading.Lock(), threading.Lock()
    ping.acquire()
    pong.acquire()

    def other():
        for _ in range(n):
            ping.acquire()
            pong.release()
    peer = threading.Thread(target=other)
    peer.start()
    t0 = time.perf_counter_ns()
    for _ in range(n):
        ping.release()
        pong.acquire()
    elapsed = time.perf_counter_ns() - t0
    peer.join()
    return elapsed


def bench_process_pipe(n: int) -> int:
    from_parent, to_child = os.pipe()
    from_child, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: echo every byte back
        try:
            for _ in range(n):
                os.read(from_parent, 1)
                os.write(to_parent, b"x")
        finally:
            os._exit(0)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        os.write(to_child, b"x")
        os.read(from_child, 1)
    elapsed = time.perf_counter_ns() - t0
    os.waitpid(pid, 0)
    for fd in (to_child, from_parent, from_child, to_parent):
        os.close(fd)
    return elapsed


BENCHES = {"generator": bench_generator, "greenlet": bench_greenlet, "asyncio": bench_asyncio,
           "uvloop": bench_uvloop, "thread": bench_thread, "process_pipe": bench_process_pipe}
SWITCHES_PER_ITERATION = 2     # every iteration is a round trip: there and back


def calibrate(bench, round_s: float) -> int:
    """Iterations for one round of about ``round_s`` seconds."""
    n = CALIBRATE_START
    while True:
        elapsed_s = bench(n) / 1e9
        if elapsed_s >= round_s * CALIBRATE_FRACTION or n >= 10**9:
            return max(1, int(n * round_s / max(elapsed_s, 1e-9)))
        n *= 4


def ctx_switches() -> tuple[int, int, int]:
    """(voluntary, involuntary) context switches and CPU ns so far: this process's threads and its reaped children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return own.ru_nvcsw + children.ru_nvcsw, own.ru_nivcsw + children.ru_nivcsw, round(cpu_s * 1e9)


def measure(name: str, rounds: int, round_s: float) -> dict:
    bench = BENCHES[name]
    n = calibrate(bench, round_s)
    voluntary0, involuntary0, cpu0 = ctx_switches()
    results = [bench(n) / (n * SWITCHES_PER_ITERATION) for _ in range(rounds)]
    voluntary1, involuntary1, cpu1 = ctx_switches()
    return {"bench": name, "ns_per_switch": statistics.median(results), "ns_min": min(results),
            "ns_max": max(results), "iterations": n, "rounds": rounds,
            "ctx_voluntary": voluntary1 - voluntary0, "ctx_involuntary": involuntary1 - involuntary0,
            "cpu_ns": cpu1 - cpu0, "cpus": sorted(os.sched_getaffinity(0))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conclab.experiments.switchbench", description=__doc__.split("\n")[0])
    parser.add_argument("bench", choices=list(BENCHES))
    parser.add_argument("--rounds", type=int, default=5, help="rounds measured; the median is reported (default 5)")
    parser.add_argument("--round-s", type=float, default=0.2, help="target seconds per round (default 0.2)")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(measure(args.bench, max(1, args.rounds), args.round_s)), flush=True)
    except ImportError as exc:
        print(f"switchbench: {args.bench} unavailable: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
