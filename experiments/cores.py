"""Experiment cores: what a second CPU buys each model, ECHO and CPU-bound, one process or two.

Every variant the run selected is served on 1 CPU and on 2, and each Python
model with ``--procs 1`` and ``--procs 2`` (two worker processes on one port,
SO_REUSEPORT, each with its own GIL); go runs with GOMAXPROCS = its CPUs (the
harness sets ``--gomaxprocs`` from the server's CPUs). One server per case and
round measures two closed loops of ``profile.cores_conns`` (50) connections:

* ``echo``: 64 B ECHO, the cost of the request path (system calls, the
  interpreter, hand-offs);
* ``cpu``: WORK with no wait and ``profile.cpu_us`` (200 µs) of busy loop per
  request, holding the GIL in Python: one CPython process computes on one CPU
  at a time whatever its threads, so only processes (or Go) can use the second.

The finding (analysis.gil) is the 2-CPU scaling ratio per model and load:
throughput on 2 CPUs with 2 processes (go: GOMAXPROCS 2) over throughput on 1
CPU with 1, paired within a round, with its spread; and what 2 CPUs do for
``threads`` with one process (the GIL). Memory: ``server_rss_kib`` is the
sampler's peak of RSS summed over the parent and its worker processes (shared
pages of the fork counted in each, so the sum is an upper bound),
``server_procs`` how many processes that is, ``rss_kib_per_proc`` the quotient.

CPUs. The server runs on the run's server CPU (CPU 0) or on every CPU; with 2
the load generator shares one of them with it (``shares_loadgen_cpu`` = 1 in
the row, and the report says so): the 2-CPU points then measure the server
with less than 2 whole CPUs, so a ratio below 2 is partly the generator's.
A case needing more CPUs than the machine has is skipped (skipped.csv).
"""
from __future__ import annotations

import time

from .convoy import Setting, cases, cpu_columns
from .harness.run import describe, key

NAME = "cores"
LOADS = ("echo", "cpu")
CONN_MARGIN = 100


def settings(run) -> list:
    """Per selected variant: (1 CPU, 1 process), (1 CPU, 2), (2 CPUs, 1), (2 CPUs, 2); go: GOMAXPROCS 1 on 1 CPU and
    2 on 2 (the harness ties GOMAXPROCS to the server's CPUs)."""
    out = []
    for variant in run.variants:
        if not variant.is_python:
            out += [Setting(variant.name, gomaxprocs=n) for n in (1, 2)]
            continue
        out += [Setting(variant.name, procs=procs, cpus=n) for n in (1, 2) for procs in (1, 2)]
    return out


def run(run) -> None:
    run.in_rounds(NAME, cases(run, settings(run)), lambda case, repeat: measure_case(run, case, repeat))


def measure_case(run, case, repeat: int) -> None:
    p = run.profile
    with run.serve(NAME, case.variant, repeat, cpus=list(case.cpus), max_conns=p.cores_conns + CONN_MARGIN) \
            as server:
        procs = 1 + len(server.worker_pids())
        for load in LOADS:
            started = time.monotonic()
            if load == "echo":
                row = run.measure(server, f"{case.name} echo", "closed", p.cores_conns, size=p.size, op="echo")
            else:
                row = run.measure(server, f"{case.name} cpu", "closed", p.cores_conns, op="work",
                                  work=(0, p.cpu_us), size=0)
            rss = row.get("server_rss_kib")
            row.update(key(NAME, case.variant, repeat), case=case.name, load=load, procs=case.setting.procs,
                       gomaxprocs=len(case.cpus) if case.backend == "go" else None, conns=p.cores_conns,
                       cpu_us=p.cpu_us if load == "cpu" else 0, server_procs=procs,
                       rss_kib_per_proc=rss / procs if rss else None, **cpu_columns(run, case.cpus))
            run.write(NAME, row)
            run.progress(f"[{NAME}] {case.name} {load} r{repeat}: {describe(row)}, "
                         f"RSS {(rss or 0) / 1024:.1f} MiB over {procs} process(es) "
                         f"({time.monotonic() - started:.1f} s)")
