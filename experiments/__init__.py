"""The experiments harness: ``conclab run EXPERIMENT`` measures every backend and writes tidy tables.

One run = one directory results/<run-id>/ with manifest.json and one CSV per
table (experiments.tables.COLUMNS; docs/experiments.md). Each backend runs as
a pinned subprocess, driven by the load generator (a subprocess too, through
the adapter experiments.load) on the other CPUs, and sampled from /proc.

Experiments, in the order ``all`` runs them (throughput before latency and
switch, which reuse its numbers):
"""
from __future__ import annotations

import importlib

EXPERIMENTS = ("memory", "throughput", "latency", "io_bound", "cpu_bound", "switch", "c10k")
# Run only when named (`conclab run pitfalls`): not in `all`, which must stay within its budget.
SEPARATE = ("pitfalls",)
KNOWN = EXPERIMENTS + SEPARATE


def module(name: str):
    """The experiment's module: it has NAME and run(run)."""
    if name not in KNOWN:
        raise KeyError(name)
    return importlib.import_module(f"{__name__}.{name}")


__doc__ += "\n".join(f"    {name}" for name in EXPERIMENTS) + "\n"
__doc__ += "\nRun only when named (not part of ``all``):\n" + "\n".join(f"    {name}" for name in SEPARATE) + "\n"
