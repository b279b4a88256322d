"""Experiment 5, cpu_bound: every request computes cpu_us (200 us) holding the GIL.

A CPython server can compute on one core at a time whatever its model (the
GIL), so every Python backend meets the same ceiling, 1e6 / cpu_us requests/s
(5000 at 200 us), however many connections or threads. Go runs goroutines on
GOMAXPROCS threads in parallel: with GOMAXPROCS = its CPUs its ceiling is
CPUs x 1e6 / cpu_us. Each variant runs pinned to the server CPUs; the variants
of ``cpu_wide_variants`` also run on every CPU of the machine (sharing one with
the generator: the row says so) to show what more cores buy, or do not.
"""
from __future__ import annotations

import time

from .harness.run import describe, key

NAME = "cpu_bound"


def run(run) -> None:
    run.each_variant(NAME, lambda variant, repeat: measure_variant(run, variant, repeat))


def cpu_settings(run, variant) -> list:
    """The CPU sets to run this variant on: the server's, and all of them if the profile asks."""
    settings = [list(run.server_cpus)]
    everything = run.all_cpus
    wide = run.profile.cpu_wide_variants
    if ("*" in wide or variant.name in wide) and len(everything) > len(run.server_cpus):
        settings.append(everything)
    return settings


def ceiling(variant, cpus: list, cpu_us: int) -> float:
    usable = len(cpus) if not variant.is_python else 1
    return usable * 1e6 / cpu_us


def measure_variant(run, variant, repeat: int) -> None:
    profile = run.profile
    for cpus in cpu_settings(run, variant):
        with run.serve(NAME, variant, repeat, cpus=cpus, max_conns=max(profile.cpu_conns) + 100) as server:
            for conns in sorted(set(profile.cpu_conns)):
                started = time.monotonic()
                label = f"conns={conns} cpus={','.join(map(str, cpus))}"
                row = run.measure(server, label, "closed", conns, op="work", work=(0, profile.cpu_us), size=0)
                row.update(key(NAME, variant, repeat), conns=conns, cpu_us=profile.cpu_us, server_cpus=cpus,
                           n_server_cpus=len(cpus), gomaxprocs=len(cpus) if not variant.is_python else None,
                           ceiling_rps=ceiling(variant, cpus, profile.cpu_us))
                run.write(NAME, row)
                run.progress(f"[{NAME}] {variant.name} {label} r{repeat}: {describe(row)} "
                             f"({time.monotonic() - started:.1f} s)")
