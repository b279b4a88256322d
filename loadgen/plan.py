"""The plan of a run and the checks before it: who runs what, from where, and is anyone there.

Shared by every mode (``runner`` for closed/open loop, ``hold``, ``locust_engine``);
it depends only on the layers below them (``conn``, ``fleet``, ``params``), so
the imports go one way: runner -> hold / locust_engine -> plan.

Planning: connections are split over ``--procs`` processes, more if one
process's descriptor limit cannot hold its share; when the connections
outnumber one source address's ephemeral ports, several 127.0.0.x source
addresses are used (loopback targets only). Checks: ``preflight`` opens one
connection before anything else, so an unreachable target is one clear line;
``check_ready`` stops the run when the processes opened no connection at all.
"""
from __future__ import annotations

import ipaddress
import math
import os
from collections import Counter
from pathlib import Path

from . import conn as connmod
from .fleet import WorkerSpec, fd_budget, split
from .params import LoadError, LoadParams

PREFLIGHT_TIMEOUT_S = 3.0      # the first connection, which tells "nothing listens there" at once
EPHEMERAL_RESERVE = 1_000      # ephemeral ports left for everyone else on the machine
PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


# -- checks -----------------------------------------------------------------------------------
def preflight(params: LoadParams) -> None:
    """One connection first, so an unreachable target is one clear line, not a wall of errors."""
    family, address = connmod.resolve(params.target)
    try:
        connmod.probe(family, address, min(params.connect_timeout, PREFLIGHT_TIMEOUT_S))
    except OSError as exc:
        reason = connmod.reason_of(exc)
        hint = " (is a server running there? e.g. `conclab serve threads --port 7878`)" if reason == "refused" else ""
        raise LoadError(f"cannot connect to {params.target}: {describe(exc)}{hint}") from None


def describe(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def check_ready(params: LoadParams, infos: list[dict]) -> None:
    """The processes' ``ready`` reports: raise LoadError if not one connection opened."""
    if sum(info["opened"] for info in infos) == 0:
        errors = Counter()
        for info in infos:
            errors.update(info["connect_errors"])
        raise LoadError(f"could not open any connection to {params.target}: {dict(errors)}")


# -- the plan ---------------------------------------------------------------------------------
def plan(params: LoadParams, conns: int, rate: float | None = None) -> list[WorkerSpec]:
    """Split ``conns`` (and the rate) over the processes."""
    rate = params.rate if rate is None else rate
    procs = min(max(params.procs, math.ceil(conns / fd_budget())), conns)
    sources = plan_sources(params, conns + (params.probe_conns if params.mode == "hold" else 0))
    cpus = params.cpu_list
    specs = []
    for i, share in enumerate(split(conns, procs)):
        specs.append(WorkerSpec(index=i, params=params, conns=share, rate=rate * share / conns if rate else None,
                                phase=i / procs, procs=procs, sources=sources, cpu=cpus[i % len(cpus)] if cpus else None))
    return specs


def plan_sources(params: LoadParams, conns: int) -> list[str] | None:
    """Source addresses: the user's, or enough 127.0.0.x when one address runs out of ports."""
    if params.sources:
        return params.sources
    per_source = ephemeral_ports() - EPHEMERAL_RESERVE
    if conns <= per_source:
        return None
    host = params.address[0]
    try:
        loopback = ipaddress.ip_address(host).version == 4 and ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise LoadError(f"{conns} connections need more than one source address ({per_source} ephemeral ports each): "
                        f"give --source-addrs")
    return [f"127.0.0.{i + 1}" for i in range(math.ceil(conns / per_source))]


def ephemeral_ports() -> int:
    try:
        low, high = map(int, PORT_RANGE_FILE.read_text().split())
        return high - low + 1
    except (OSError, ValueError):
        return 28_232                                  # Linux's default 32768..60999


def cpus_usable(params: LoadParams, procs: int) -> int:
    """How many CPUs ``procs`` load processes can use (the self-check's denominator)."""
    cpus = params.cpu_list or sorted(os.sched_getaffinity(0))
    return min(procs, len(cpus))
