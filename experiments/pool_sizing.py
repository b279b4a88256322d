"""Experiment pool_sizing: how big should a thread pool be? Workers swept, both dispatches, two loads.

The thread pool runs with ``--workers`` W in ``profile.pool_sizes`` (2, 6, 32,
128, 512, 2048) and both ``--dispatch`` modes, under a closed loop of
``profile.pool_conns`` connections (1,000; tiny and quick use fewer, their
profiles say how many), at two loads, one server per (dispatch, W, round):

* ``io``: WORK with io_us = 10,000 and cpu_us = 0, a request that only waits.
  Little's law bounds it: at most min(W, connections) requests wait at once,
  each for 10 ms, so throughput <= min(W, connections) / 10 ms
  (``little_bound_rps``; 2 workers: 200 rps). A bigger pool helps as long as
  the measured curve follows that line; where it leaves it, something else
  (the CPU, the GIL, the load generator) is the limit and more workers only
  cost memory and context switches.
* ``echo``: plain 64 B ECHO, no wait: the pool's hand-off cost, no bound drawn.

Every row has what the point cost: RSS and threads (the sampler's peaks),
context switches and CPU µs per request (the server's /proc counters over the
measured window, as every load experiment). go, asyncio and gevent run the same
two loads beside the pool (their bound is connections / 10 ms).

Connection dispatch gives each worker a connection for the connection's whole
life: with fewer workers than connections, only W of them are ever served and
the rest wait in the pool's queue (head-of-line blocking). Those points are not
slow, they are broken: ``head_of_line`` is 1, ``bound_note`` says "not every
connection served", and the generator's own check marks them invalid (served
K of N connections), so the findings never read them as a throughput.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from .harness.run import describe, key

NAME = "pool_sizing"
BESIDE = ("go", "asyncio", "gevent")    # the models measured at the same loads, beside the pool
IO_US = 10_000                          # the I/O-bound load's wait per request
LOADS = ("io", "echo")
HEAD_OF_LINE = "not every connection served"
CONN_MARGIN = 100
US = 1e-6


@dataclass(frozen=True)
class Case:
    """One server configuration of a round: a variant, and its pool size (None: not a pool)."""
    variant: object
    workers: int | None

    @property
    def name(self) -> str:
        return self.variant.name if self.workers is None else f"{self.variant.name}@workers={self.workers}"

    @property
    def backend(self) -> str:
        return self.variant.backend


def run(run) -> None:
    run.in_rounds(NAME, cases(run), lambda case, repeat: measure_case(run, case, repeat))


def cases(run) -> list:
    """Every pool variant at every size, then the models beside it; unavailable variants recorded as skipped."""
    out = []
    for variant in run.variants:
        if not (variant.is_pool or variant.name in BESIDE):
            continue
        reason = variant.unavailable()
        if reason:
            run.skip(NAME, variant, reason)
            continue
        sizes = sorted(set(run.profile.pool_sizes)) if variant.is_pool else [None]
        out += [Case(variant, w) for w in sizes]
    return out


def dispatch(variant) -> str | None:
    """The pool's --dispatch ("connection" or "request"); None for a variant that is not a pool."""
    options = list(variant.options)
    if not variant.is_pool:
        return None
    return options[options.index("--dispatch") + 1] if "--dispatch" in options else "connection"


def in_flight(variant, workers: int | None, conns: int) -> int:
    """How many I/O waits can overlap: min(workers, connections) in a pool, every connection otherwise."""
    return min(workers, conns) if workers is not None and variant.is_pool else conns


def little_bound(variant, workers: int | None, conns: int, io_us: int) -> float:
    """Little's law: in-flight requests / time each spends waiting, requests/s."""
    return in_flight(variant, workers, conns) / (io_us * US)


def head_of_line(variant, workers: int | None, conns: int) -> bool:
    """Connection dispatch with fewer workers than connections: some connections are never served."""
    return dispatch(variant) == "connection" and workers is not None and workers < conns


def measure_case(run, case: Case, repeat: int) -> None:
    conns = run.profile.pool_conns
    with run.serve(NAME, case.variant, repeat, workers=case.workers, max_conns=conns + CONN_MARGIN) as server:
        for load in LOADS:
            started = time.monotonic()
            row = measure_load(run, server, case, load, conns)
            row.update(key(NAME, case.variant, repeat))
            run.write(NAME, row)
            run.progress(f"[{NAME}] {case.name} {load} r{repeat}: {describe(row)} "
                         f"({time.monotonic() - started:.1f} s)")


def measure_load(run, server, case: Case, load: str, conns: int) -> dict:
    """One point: the generator's and the server's columns, the bound, the head-of-line flag."""
    point = f"{load} workers={case.workers}"
    if load == "io":
        row = run.measure(server, point, "closed", conns, op="work", work=(IO_US, 0), size=0)
    else:
        row = run.measure(server, point, "closed", conns, op="echo", size=run.profile.size)
    blocked = head_of_line(case.variant, case.workers, conns)
    bound = little_bound(case.variant, case.workers, conns, IO_US) if load == "io" else None
    row.update(load=load, workers=case.workers, dispatch=dispatch(case.variant), conns=conns,
               io_us=IO_US if load == "io" else 0, little_bound_rps=bound, head_of_line=blocked,
               bound_note=bound_note(case, conns, row.get("conns_served"), blocked), server_cpus=run.server_cpus)
    return row


def bound_note(case: Case, conns: int, served, blocked: bool) -> str:
    """What the point is, in words: the head-of-line case says so instead of reading as slow."""
    if blocked:
        got = f" ({served} of {conns})" if served is not None else ""
        return (f"{HEAD_OF_LINE}{got}: connection dispatch, each of {case.workers} workers owns one connection "
                "until it closes")
    if case.workers is None:
        return f"{case.variant.name}: every connection waits at once"
    return f"{min(case.workers, conns)} requests wait at once"
