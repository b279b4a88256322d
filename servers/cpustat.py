"""CPU use between two moments, from /proc/stat: how busy the machine was, and how much of it was not us.

Shared by the experiments' calibration (experiments/harness/calibrate.py) and the reliability soak
and overload runs (reliability/soak.py): both judge whether a timing measurement can be trusted on
a shared machine, so both need the same account of *other processes' CPU*.

* ``snapshot()`` reads /proc/stat's cpu lines (jiffies per field, per CPU and for the machine), the
  time, and this process's own CPU seconds: itself plus every child it has reaped (getrusage SELF +
  CHILDREN), plus ``extra_own_s`` for processes it has not reaped yet (a server still running).
* ``usage(before, after, cpus)`` turns two snapshots into busy % and steal % per CPU, for the given
  CPUs together and for the machine, and **other processes' CPU** on those CPUs (% of one CPU): the
  process time (user + nice + system) of those CPUs minus our own. Interrupt time (irq, softirq:
  loopback networking largely runs there) is busy but in neither account, so it is left out of both
  sides. Tick accounting makes the difference coarse (a jiffy per CPU); a negative remainder is 0.

Pure functions over plain data (``parse_proc_stat``, ``usage``), so tests feed them synthetic text.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

PROC_STAT = "/proc/stat"
# /proc/stat cpu line fields: user nice system idle iowait irq softirq steal guest guest_nice (guest is in user)
USER, NICE, SYSTEM, IDLE, IOWAIT, IRQ, SOFTIRQ, STEAL = range(8)


@dataclass
class Snapshot:
    """What a later moment is compared with: /proc/stat, our own CPU seconds, the time."""
    t: float
    stat: dict                    # "cpu" (the machine) and "0", "1", ... -> [jiffies per field]
    own_cpu_s: float


def parse_proc_stat(text: str) -> dict:
    """/proc/stat's cpu lines: {"cpu": [...], "0": [...], ...}, the first 8 fields (user ... steal) in jiffies."""
    out = {}
    for line in text.splitlines():
        if not line.startswith("cpu"):
            continue
        name, *fields = line.split()
        values = [int(f) for f in fields[:8]] + [0] * max(0, 8 - len(fields))
        out["cpu" if name == "cpu" else name[3:]] = values
    return out


def own_cpu_s() -> float:
    """User + system CPU seconds of this process and of every child it has waited for (and theirs)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage_ = resource.getrusage(who)
        total += usage_.ru_utime + usage_.ru_stime
    return total


def snapshot(extra_own_s: float = 0.0) -> Snapshot:
    """Now: /proc/stat ({} if unreadable), the time, our CPU seconds plus ``extra_own_s`` (unreaped children)."""
    try:
        with open(PROC_STAT, encoding="ascii") as file:
            stat = parse_proc_stat(file.read())
    except OSError:
        stat = {}
    return Snapshot(t=time.monotonic(), stat=stat, own_cpu_s=own_cpu_s() + extra_own_s)


def usage(before: Snapshot, after: Snapshot, cpus, hz: int | None = None) -> dict:
    """CPU use between two snapshots: busy % and steal % (per CPU of ``cpus``, those CPUs, the machine),
    our own CPU and other processes' CPU on those CPUs (% of one CPU; see the module docstring)."""
    hz = hz or os.sysconf("SC_CLK_TCK")
    wall = max(after.t - before.t, 1e-9)

    def delta(name):
        if name not in before.stat or name not in after.stat:
            return None
        return [a - b for a, b in zip(after.stat[name], before.stat[name])]

    def shares(d):
        total = sum(d)
        if total <= 0:
            return {"busy_pct": None, "steal_pct": None}
        return {"busy_pct": 100.0 * (total - d[IDLE] - d[IOWAIT]) / total, "steal_pct": 100.0 * d[STEAL] / total}

    per_cpu, summed = {}, [0] * 8
    for cpu in cpus:
        d = delta(str(cpu))
        if d is None:
            continue
        per_cpu[str(cpu)] = shares(d)
        summed = [s + v for s, v in zip(summed, d)]
    machine = delta("cpu")
    out = {"wall_s": wall, "per_cpu": per_cpu, "machine": shares(machine) if machine else None}
    own = max(0.0, after.own_cpu_s - before.own_cpu_s)
    out["own_cpu_pct"] = 100.0 * own / wall
    if per_cpu:
        out.update(shares(summed))
        process_s = (summed[USER] + summed[NICE] + summed[SYSTEM]) / hz
        out["others_cpu_pct"] = 100.0 * max(0.0, process_s - own) / wall
    else:
        out.update(busy_pct=None, steal_pct=None, others_cpu_pct=None)
    return out
