"""Calibration: how quiet the machine was, measured at the start and at the end of every run.

A benchmark on a shared machine measures the machine as much as the servers.
Before the first experiment and after the last one the harness measures the
machine itself, in a few seconds, and judges the run ``quiet`` or ``noisy``:

* **timer wake-up jitter**, on every CPU the run uses (server and load
  generator CPUs): a child process pinned to that CPU sleeps 1 ms
  ``timer_samples`` times and records how late each wake-up was (actual minus
  requested, µs: p50, p99, max). The children run side by side, one per CPU,
  and start their loops together (a shared CLOCK_MONOTONIC deadline), so no
  child's interpreter start-up lands in another's loop. The p50 includes the
  kernel's timer slack (50 µs by default, recorded as ``timer_slack_ns``); the
  p99 and max are what other work and the hypervisor add.
* **CPU use during the run**: /proc/stat deltas between the start and the end,
  per CPU of the run and for the whole machine: busy % and steal %. The run's
  own CPU (this process and every child it has reaped: servers, load
  generators, benchmarks, the calibration's own children; getrusage SELF +
  CHILDREN) is subtracted from the process time (user + nice + system) of the
  run's CPUs: what is left is **other processes' CPU**, in % of one CPU.
  Interrupt time (irq, softirq: loopback networking largely runs there) is
  busy but in neither account, so it is left out of both sides. Tick
  accounting makes the difference coarse (a jiffy per CPU); a negative
  remainder is shown as 0.
* **load average** (1 minute) at the start (judged: was the machine busy
  before the run?) and at the end (recorded, not judged). At the end it is
  mostly the run's own tasks: the load average counts runnable tasks, not CPU
  use, and the last experiments wake thousands of server threads at once (a
  thread per connection holding 10,000 connections); no estimate of the run's
  own share separates that from other processes. Other processes during the
  run are judged by what they did measure exactly: their CPU time on the
  run's CPUs (above).
* **the latency floor**: the load generator against the go backend (the
  epoll backend when go cannot run here) at a low open-loop rate, the server
  pinned to the server CPUs, the generator to the load generator CPUs: p50,
  p99, max. A request that does nothing costs this much on this machine now;
  a difference between backends smaller than the floor's p99 is not a
  finding (analysis.trust.below_floor).

The verdict is ``noisy`` when any measure passes its limit (the ``*_LIMIT``
constants below; each breach is one reason, in words, with its numbers),
``quiet`` otherwise. A measure that could not be taken is listed under
``not_measured`` and judges nothing. Everything goes to manifest.json
(``calibration``) and to calibration.csv, one row per measure (phase
``start``, ``end``, or ``run`` for the deltas between them).

Hooks: ``start(run)`` after the harness pins itself, before the first
experiment; ``end(run, status)`` after every child is stopped. An incomplete
run (interrupted, error) gets only the cheap end measures (load average, CPU
use), not a few more seconds of timers and load.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from conclab import servers
from conclab.servers import processes
from conclab.servers.cpustat import (  # noqa: F401 - the /proc/stat arithmetic, shared with reliability: re-exported
    PROC_STAT,
    Snapshot,
    own_cpu_s,
    parse_proc_stat,
    snapshot,
    usage,
)
from conclab.servers.launcher import ServerProcess, ServerStartError, log_stem

from . import loadproc

# -- the limits: a run passing any of them is noisy ---------------------------------------------------

TIMER_P99_LIMIT_US = 200.0      # a 1 ms sleep's p99 overshoot on any CPU of the run (slack is 50 µs)
STEAL_LIMIT_PCT = 2.0           # steal time, % of the run's CPUs' time, between start and end
OTHERS_LIMIT_PCT = 10.0         # other processes' CPU on the run's CPUs, % of one CPU, between start and end
LOAD_PER_CPU_LIMIT = 0.5        # 1-minute load average per CPU of the machine, at start
FLOOR_P99_LIMIT_US = 1000.0     # the latency floor's p99: an idle echo at 1,000 req/s should answer within 1 ms

LIMITS = {"timer_p99_us": TIMER_P99_LIMIT_US, "steal_pct": STEAL_LIMIT_PCT, "others_cpu_pct": OTHERS_LIMIT_PCT,
          "load_per_cpu": LOAD_PER_CPU_LIMIT, "floor_p99_us": FLOOR_P99_LIMIT_US}

TABLE = "calibration"
PHASES = ("start", "end")
FLOOR_BACKENDS = ("go", "epoll")  # the first that can run here serves the latency floor
FLOOR_STOP_GRACE_S = 2.0
TIMER_START_DELAY_S = 0.3         # the timer children start their loops this long after the first is spawned
TIMER_WARMUP = 5                  # sleeps each child makes first and drops
TIMER_SLACK_S = 15.0              # past its expected time, how long a timer child may take before it is killed
SLACK_FILE = "/proc/self/timerslack_ns"


@dataclass(frozen=True)
class Settings:
    """How much calibration a profile gets (about 2.5 s per phase for tiny, 4 s for quick, 6 s for standard
    and full: the runs meant for conclusions get the longer floor)."""
    timer_samples: int             # 1 ms sleeps per CPU
    floor_s: float                 # measured seconds of the latency floor
    floor_warmup_s: float          # its warm-up (not counted)
    timer_sleep_us: int = 1000
    floor_rate_rps: float = 1000.0
    floor_conns: int = 10
    floor_size: int = 64


SETTINGS = {"tiny": Settings(timer_samples=200, floor_s=1.0, floor_warmup_s=0.0),
            "quick": Settings(timer_samples=500, floor_s=2.0, floor_warmup_s=0.2),
            "standard": Settings(timer_samples=1000, floor_s=3.0, floor_warmup_s=0.5),
            "full": Settings(timer_samples=1000, floor_s=3.0, floor_warmup_s=0.5)}
DEFAULT_SETTINGS = SETTINGS["quick"]   # a profile not listed here


def settings_for(profile_name: str) -> Settings:
    return SETTINGS.get(profile_name, DEFAULT_SETTINGS)


# -- timer wake-up jitter -------------------------------------------------------------------------------

# The child: pin itself, wait for the common start, sleep, print the overshoots (ns) as one JSON list.
TIMER_CHILD = """
import json, os, sys, time
cpu, n, sleep_ns, warmup = (int(a) for a in sys.argv[1:5])
start_at = float(sys.argv[5])
os.sched_setaffinity(0, {cpu})
clock, sleep, seconds = time.perf_counter_ns, time.sleep, sleep_ns / 1e9
late = []
for i in range(n + warmup):
    if i == warmup:
        time.sleep(max(0.0, start_at - time.monotonic()))
    t0 = clock()
    sleep(seconds)
    late.append(clock() - t0 - sleep_ns)
print(json.dumps(late[warmup:]))
"""


def percentile(sorted_values: list, q: float):
    """Nearest-rank percentile (q in 0..100) of an ascending list; None if empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def overshoot_summary(late_ns) -> dict:
    """p50, p99, max (µs) and n of wake-up overshoots given in ns."""
    values = sorted(v / 1000 for v in late_ns)
    return {"p50_us": percentile(values, 50), "p99_us": percentile(values, 99),
            "max_us": values[-1] if values else None, "n": len(values)}


def timer_jitter(cpus, samples: int, sleep_us: int = 1000) -> dict:
    """{"<cpu>": overshoot_summary} for each CPU, measured by one pinned child per CPU, side by side.

    A CPU whose child failed gets {"error": why} instead.
    """
    start_at = time.monotonic() + TIMER_START_DELAY_S
    budget = TIMER_START_DELAY_S + samples * (sleep_us / 1e6 + 0.001) + TIMER_SLACK_S
    children = {}
    try:
        for cpu in cpus:
            out = tempfile.TemporaryFile()
            args = [sys.executable, "-S", "-c", TIMER_CHILD, str(cpu), str(samples), str(sleep_us * 1000),
                    str(TIMER_WARMUP), repr(start_at)]
            children[cpu] = (processes.spawn(args, stdout=out, stderr=subprocess.DEVNULL, cpus=[cpu]), out)
        deadline = time.monotonic() + budget
        result = {}
        for cpu, (proc, out) in children.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                result[str(cpu)] = {"error": f"no result within {budget:.0f} s"}
                continue
            out.seek(0)
            try:
                result[str(cpu)] = overshoot_summary(json.loads(out.read().decode() or "null") or [])
            except ValueError:
                result[str(cpu)] = {"error": f"the timer child exited {proc.returncode} without a result"}
        return result
    finally:
        for proc, out in children.values():
            processes.stop(proc, signal.SIGKILL, 1.0)
            out.close()


def timer_slack_ns() -> int | None:
    try:
        with open(SLACK_FILE, encoding="ascii") as file:
            return int(file.read())
    except (OSError, ValueError):
        return None


# -- CPU use between start and end: conclab.servers.cpustat (snapshot, usage), imported above ------------

# -- the latency floor ---------------------------------------------------------------------------------

def floor_backend() -> str | None:
    """go when it can run here, else epoll (pure Python, always there)."""
    return next((b for b in FLOOR_BACKENDS if servers.unavailable_reason(b) is None), None)


def latency_floor(run, settings: Settings, phase: str) -> dict:
    """The load generator at a low open-loop rate against the floor backend, pinned as the experiments are."""
    backend = floor_backend()
    if backend is None:
        return {"error": f"none of {', '.join(FLOOR_BACKENDS)} can run here"}
    variant = servers.VARIANTS[backend]
    server = ServerProcess(variant.backend, run.server_options(variant), cpus=run.server_cpus,
                           log_stem=log_stem(run.raw_dir, TABLE, backend, phase))
    try:
        result = loadproc.run_loadgen(server.target, "open", settings.floor_conns, settings.floor_s,
                                      rate=settings.floor_rate_rps, size=settings.floor_size, op="echo",
                                      cpus=run.loadgen_cpus, warmup=settings.floor_warmup_s)
    finally:
        server.stop(grace=FLOOR_STOP_GRACE_S)
    row = loadproc.flatten(result)
    return {"backend": backend, "p50_us": row.get("p50_us"), "p99_us": row.get("p99_us"),
            "max_us": row.get("max_us"), "throughput_rps": row.get("throughput_rps"),
            "requests": row.get("requests"), "errors": row.get("errors"), "valid": row.get("valid"),
            "invalid_reason": row.get("invalid_reason")}


# -- the verdict ---------------------------------------------------------------------------------------

def _n(value, digits: int = 3) -> str:
    """A number for a reason's words: 3 significant digits, thousands separated."""
    if value is None:
        return "?"
    if value == 0 or abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def verdict(cal: dict) -> tuple[str, list]:
    """("quiet" | "noisy", the reasons): every measure of ``cal`` (the manifest's calibration) against LIMITS.

    Missing measures judge nothing. The limits are the module's constants unless ``cal["limits"]`` says
    otherwise (a run records the ones it was judged by).
    """
    limits = {**LIMITS, **(cal.get("limits") or {})}
    reasons = []
    cpu_count = cal.get("cpu_count") or os.cpu_count() or 1
    load_limit = limits["load_per_cpu"] * cpu_count
    for phase in PHASES:
        p = cal.get(phase) or {}
        for cpu, t in sorted((p.get("timer") or {}).items(), key=lambda kv: int(kv[0])):
            if t.get("p99_us") is not None and t["p99_us"] > limits["timer_p99_us"]:
                reasons.append(f"timer p99 overshoot {_n(t['p99_us'])} µs on CPU {cpu} at {phase} "
                               f"(limit {_n(limits['timer_p99_us'])} µs)")
        load = (p.get("loadavg") or [None])[0]
        if phase == "start" and load is not None and load > load_limit:     # the end's is the run's own (doc)
            reasons.append(f"load average {_n(load)} at {phase} on {cpu_count} CPUs (limit {_n(load_limit)})")
        floor = p.get("floor") or {}
        if floor.get("p99_us") is not None and floor["p99_us"] > limits["floor_p99_us"]:
            reasons.append(f"latency floor p99 {_n(floor['p99_us'])} µs at {phase} "
                           f"(limit {_n(limits['floor_p99_us'])} µs)")
    during = cal.get("run") or {}
    if during.get("steal_pct") is not None and during["steal_pct"] > limits["steal_pct"]:
        reasons.append(f"steal {_n(during['steal_pct'])} % of the run's CPUs' time (limit {_n(limits['steal_pct'])} %)")
    if during.get("others_cpu_pct") is not None and during["others_cpu_pct"] > limits["others_cpu_pct"]:
        reasons.append(f"other processes used {_n(during['others_cpu_pct'])} % of a CPU on the run's CPUs "
                       f"(limit {_n(limits['others_cpu_pct'])} %)")
    return ("noisy" if reasons else "quiet"), reasons


def floor_summary(cal: dict) -> dict:
    """The floor analysis compares differences with: the worse phase's latency figures, the worst timer p99."""
    floors = [(cal.get(p) or {}).get("floor") or {} for p in PHASES]
    floors = [f for f in floors if f.get("p99_us") is not None]
    worst = max(floors, key=lambda f: f["p99_us"]) if floors else {}
    timers = [t["p99_us"] for p in PHASES for t in ((cal.get(p) or {}).get("timer") or {}).values()
              if t.get("p99_us") is not None]
    return {"backend": worst.get("backend"), "latency_p50_us": worst.get("p50_us"),
            "latency_p99_us": worst.get("p99_us"), "latency_max_us": worst.get("max_us"),
            "timer_p99_us": max(timers) if timers else None}


def not_measured(cal: dict) -> list:
    """What could not be measured, and why, in words."""
    out = []
    for phase in PHASES:
        p = cal.get(phase)
        if p is None:
            continue
        if p.get("skipped"):
            out.append(f"{phase}: {p['skipped']}")
            continue
        if p.get("timer_error"):
            out.append(f"timer at {phase}: {p['timer_error']}")
        for cpu, t in sorted((p.get("timer") or {}).items(), key=lambda kv: int(kv[0])):
            if t.get("error"):
                out.append(f"timer on CPU {cpu} at {phase}: {t['error']}")
        floor = p.get("floor") or {}
        if floor.get("error"):
            out.append(f"latency floor at {phase}: {floor['error']}")
        elif floor and not floor.get("valid", True):
            out.append(f"latency floor at {phase} is invalid: {floor.get('invalid_reason')}")
    if cal.get("end") is not None and not cal.get("run"):
        out.append("CPU use during the run: not measured")
    return out


# -- calibration.csv ------------------------------------------------------------------------------------

def rows(cal: dict, phase: str) -> list:
    """calibration.csv rows of one phase: "start", "end" (point measures) or "run" (deltas between them).

    ``cpu`` is the CPU a measure is about, the CPUs of the floor's server (``0`` or ``0,1``), or empty for
    the machine as a whole.
    """
    out = []

    def add(cpu, metric, value, unit):
        if value is not None:
            out.append({"phase": phase, "cpu": cpu, "metric": metric, "value": value, "unit": unit})
    if phase == "run":
        during = cal.get("run") or {}
        cpus = ",".join(map(str, cal.get("cpus") or []))
        for cpu, shares in sorted((during.get("per_cpu") or {}).items(), key=lambda kv: int(kv[0])):
            add(cpu, "busy_pct", shares.get("busy_pct"), "%")
            add(cpu, "steal_pct", shares.get("steal_pct"), "%")
        add(cpus, "busy_pct", during.get("busy_pct"), "%")
        add(cpus, "steal_pct", during.get("steal_pct"), "%")
        add(cpus, "own_cpu_pct", during.get("own_cpu_pct"), "% of a CPU")
        add(cpus, "others_cpu_pct", during.get("others_cpu_pct"), "% of a CPU")
        machine = during.get("machine") or {}
        add("", "busy_pct", machine.get("busy_pct"), "%")
        add("", "steal_pct", machine.get("steal_pct"), "%")
        add("", "wall_s", during.get("wall_s"), "s")
        return out
    p = cal.get(phase) or {}
    for name, value in zip(("loadavg_1m", "loadavg_5m", "loadavg_15m"), p.get("loadavg") or ()):
        add("", name, value, "load")
    add("", "own_load", p.get("own_load"), "load")
    for cpu, t in sorted((p.get("timer") or {}).items(), key=lambda kv: int(kv[0])):
        for stat in ("p50", "p99", "max"):
            add(cpu, f"timer_overshoot_{stat}", t.get(f"{stat}_us"), "us")
    floor = p.get("floor") or {}
    server_cpus = ",".join(map(str, cal.get("server_cpus") or []))
    for stat in ("p50", "p99", "max"):
        add(server_cpus, f"floor_{stat}", floor.get(f"{stat}_us"), "us")
    add(server_cpus, "floor_throughput", floor.get("throughput_rps"), "rps")
    add(server_cpus, "floor_errors", floor.get("errors"), "count")
    return out


# -- the hooks -----------------------------------------------------------------------------------------

def judge(cal: dict) -> dict:
    """Add the verdict, its reasons, the floor and what was not measured to ``cal`` (in place); return it."""
    cal["verdict"], cal["reasons"] = verdict(cal)
    cal["floor"] = floor_summary(cal)
    cal["not_measured"] = not_measured(cal)
    return cal


def _measure(run, cal: dict, phase: str, settings: Settings) -> dict:
    """One phase's timer jitter and latency floor into cal[phase] (a failure is recorded, not raised)."""
    p = cal[phase]
    began = time.monotonic()
    try:
        p["timer"] = timer_jitter(cal["cpus"], settings.timer_samples, settings.timer_sleep_us)
    except (OSError, ValueError) as exc:
        p["timer_error"] = f"{type(exc).__name__}: {exc}"
    try:
        p["floor"] = latency_floor(run, settings, phase)
    except (ServerStartError, loadproc.LoadgenError, OSError, RuntimeError, ValueError) as exc:
        p["floor"] = {"error": f"{type(exc).__name__}: {exc}"}
    p["seconds"] = time.monotonic() - began
    return p


def _describe(p: dict) -> str:
    timers = p.get("timer") or {}
    worst = max((t["p99_us"] for t in timers.values() if t.get("p99_us") is not None), default=None)
    floor = p.get("floor") or {}
    text = f"load {_n((p.get('loadavg') or [None])[0])}, timer p99 {_n(worst)} us (worst CPU)"
    if floor.get("p99_us") is not None:
        text += f", floor ({floor['backend']}) p50 {_n(floor['p50_us'])} us p99 {_n(floor['p99_us'])} us"
    return text + f" ({_n(p.get('seconds'))} s)"


def start(run) -> dict:
    """Measure the start phase; the calibration goes to run.manifest["calibration"] and calibration.csv."""
    settings = settings_for(run.profile.name)
    cal = {"settings": asdict(settings), "limits": dict(LIMITS),
           "cpus": sorted(set(run.server_cpus) | set(run.loadgen_cpus)), "server_cpus": list(run.server_cpus),
           "loadgen_cpus": list(run.loadgen_cpus),
           "cpu_count": os.cpu_count(), "timer_slack_ns": timer_slack_ns(),
           "start": {"loadavg": list(os.getloadavg())}}
    run.calibration = cal
    run.calibration_snapshot = snapshot()
    _measure(run, cal, "start", settings)
    judge(cal)
    for row in rows(cal, "start"):
        run.write(TABLE, row)
    run.manifest["calibration"] = cal
    run.save_manifest()
    run.progress(f"[calibration] start: {_describe(cal['start'])}")
    return cal


def end(run, status: str) -> bool:
    """Measure the end phase (everything for a complete run, the cheap measures otherwise) and judge the run.

    Runs in the harness's clean-up: an interrupt while it measures keeps what was measured, and is returned
    (True) so the run ends interrupted, not complete.
    """
    cal = getattr(run, "calibration", None)
    if cal is None:
        return False
    interrupted = False
    p = cal["end"] = {"loadavg": list(os.getloadavg())}
    before = getattr(run, "calibration_snapshot", None)
    try:
        if before is not None:
            cal["run"] = usage(before, snapshot(), cal["cpus"])
            p["own_load"] = cal["run"]["own_cpu_pct"] / 100.0
        if status == "complete":
            _measure(run, cal, "end", settings_for(run.profile.name))
        else:
            p["skipped"] = f"timer and floor not measured: the run's status is {status}"
    except BaseException as exc:               # Ctrl-C or SIGTERM during the last seconds: keep the run's files
        if isinstance(exc, SystemExit):
            raise
        p["skipped"] = f"interrupted while measuring ({type(exc).__name__})"
        interrupted = True
        processes.stop_all()
    judge(cal)
    for phase in ("end", "run"):
        for row in rows(cal, phase):
            run.write(TABLE, row)
    run.manifest["calibration"] = cal
    run.save_manifest()
    if "timer" in p or "floor" in p:
        run.progress(f"[calibration] end: {_describe(p)}")
    reasons = f": {'; '.join(cal['reasons'])}" if cal["reasons"] else ""
    run.progress(f"[calibration] verdict {cal['verdict']}{reasons}")
    return interrupted
