"""Experiment convoy: the GIL convoy. Short ECHO requests beside a few CPU-bound ones, per model.

``profile.convoy_conns`` connections send 64 B ECHO open loop at a fixed rate
(``profile.convoy_rate``, latency from the scheduled send); beside them
``profile.convoy_cpu_conns`` (K) connections send WORK with no wait and
``profile.convoy_cpu_us`` (2 ms) of busy loop, closed loop: a request is always
computing. Each case is measured twice on the same server, in this order: the
ECHO load alone (K = 0, the baseline), then with the CPU work beside it. The
finding is p99(with) / p99(without) per case, paired within a round, with its
spread over rounds (analysis.gil).

Why it differs by model. CPython runs Python on one thread at a time (the
GIL). A thread that wants the GIL while another computes waits until the
computing thread releases it by itself (a system call: a WORK request's
reply) or, at the latest, for the switch interval (``sys.setswitchinterval``,
5 ms by default), after which it asks the computing thread to drop it; an ECHO
that reads, then sends, may wait more than once. So the interval matters when
it is shorter than one computation (0.5 ms against 2 ms of work: forced
switches inside every request) and matters less once it is longer (5 and
50 ms: the 2 ms request ends first and releases the GIL as it sends). threads
are measured at 0.5, 5 and 50 ms (``--switch-interval``). An event loop
(asyncio, uvloop, gevent, epoll) cannot be interrupted at all: a 2 ms busy
loop blocks every other connection of that loop for 2 ms. Go preempts
goroutines and, with ``--gomaxprocs 2``, runs them on two threads in parallel.
The fix for the Python models is more processes (``--procs 2``: two workers
share the port with SO_REUSEPORT, each with its own GIL): measured as cases
of their own. The kernel spreads connections by a hash of their addresses and
ports, so a CPU connection may share a worker with ECHO connections or not:
the spread over rounds shows it.

The other fix, for the event loops only: ``--cpu-offload process``
(servers/offload.py) has WORK's CPU part computed in a process pool, one
worker per CPU the server may use, while the loop goes on serving ECHO. Each
event loop has two offload cases. On one CPU the pool's worker and the loop
take turns on it, but the kernel preempts a computing process when the loop
wakes for a request, which a loop blocked in its own callback cannot be:
what offloading gives where there is no spare CPU. On two CPUs, like
``--procs 2``, the pool has a CPU of its own; on a 2-CPU machine that is the
load generators' CPU, and when the pool's worker takes it from the ECHO open
loop the point is invalid (the generator fell behind its schedule), so there
the one-CPU case is the one that measures. What they measure: how much of the convoy is the loop being blocked (which offloading
removes) rather than the CPU being busy (which it does not: the work still
runs, on another CPU, shared with the load generators when the machine has no
more: ``shares_loadgen_cpu``); and, against the
``procs=2`` cases, the cost of handing each request's computation to another
process (a pickled call and its result over pipes) instead of running it in a
second copy of the server. The loop never waits for the GIL of the computing
process, so no switch interval applies.

Two load generators run side by side (one ``conclab load`` run has one mode
and one op, so it cannot mix an open and a closed loop): the CPU work is
started first, in the background, with a time budget covering the ECHO run,
and stopped (its JSON read) right after the ECHO run ends; the row is the ECHO
run's, with the CPU work's throughput and p99 beside it (``work_*``). Both
generators share the load generator's CPU.

CPUs. The server is pinned to the run's server CPUs (CPU 0); a case that needs
two CPUs (``--procs 2``, GOMAXPROCS 2) gets every CPU of the machine, and then
shares one with the load generators: ``server_cpus``, ``n_server_cpus`` and
``shares_loadgen_cpu`` say so in every row. A case needing more CPUs than the
machine has is skipped (skipped.csv).

The variant list is ``SETTINGS``, one line per case: a server option (an
event loop's ``--cpu-offload process``) is one more ``Setting`` with
``options``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

from .harness import loadproc
from .harness.run import describe, key

NAME = "convoy"
CONN_MARGIN = 50
CPU_LOAD_SLACK_S = 3.0          # the CPU work's planned duration past the ECHO run's (it is stopped at its end)
START_TIMEOUT_S = 10.0          # longest wait for the CPU work's generator to announce its window
POLL_S = 0.01


@dataclass(frozen=True)
class Setting:
    """One case: a variant of conclab.servers.VARIANTS and the server options that make the case."""
    variant: str
    switch_interval: float | None = None    # --switch-interval (Python)
    procs: int = 1                          # --procs (Python)
    gomaxprocs: int | None = None           # go: GOMAXPROCS (= the server's CPUs, set by the harness)
    options: tuple = ()                     # any further server options, as given on the command line
    cpus: int | None = None                 # the server's CPUs, when not one per process or Go thread

    @property
    def n_cpus(self) -> int:
        """CPUs the case runs on: ``cpus``, else one per process or Go thread."""
        return self.cpus or max(self.procs, self.gomaxprocs or 1)

    def server_options(self) -> tuple:
        extra = ()
        if self.switch_interval is not None:
            extra += ("--switch-interval", f"{self.switch_interval:g}")
        if self.procs > 1:
            extra += ("--procs", str(self.procs))
        return extra + tuple(self.options)

    @property
    def label(self) -> str:
        parts = [self.variant]
        if self.switch_interval is not None:
            parts.append(f"si={self.switch_interval * 1000:g}ms")
        if self.procs > 1:
            parts.append(f"procs={self.procs}")
        if self.gomaxprocs is not None:
            parts.append(f"GOMAXPROCS={self.gomaxprocs}")
        if self.cpus is not None:
            parts.append(f"cpus={self.cpus}")
        return " ".join([*parts, *self.options])


PYTHON_MODELS = ("threads", "threadpool-request", "asyncio", "uvloop", "gevent", "epoll")
EVENT_LOOPS = ("asyncio", "uvloop", "gevent", "epoll")
CPU_OFFLOAD = ("--cpu-offload", "process")
SETTINGS = (
    Setting("threads", switch_interval=0.0005),
    Setting("threads", switch_interval=0.005),
    Setting("threads", switch_interval=0.05),
    Setting("threadpool-request"),
    Setting("asyncio"),
    Setting("uvloop"),
    Setting("gevent"),
    Setting("epoll"),
    Setting("go", gomaxprocs=1),
    Setting("go", gomaxprocs=2),
    *(Setting(model, procs=2) for model in PYTHON_MODELS),       # the fix: two processes, two GILs
    *(Setting(model, options=CPU_OFFLOAD) for model in EVENT_LOOPS),           # the loop's fix: a process pool,
    *(Setting(model, options=CPU_OFFLOAD, cpus=2) for model in EVENT_LOOPS),   # on the loop's CPU, and on two
)


@dataclass(frozen=True)
class Case:
    """A Setting bound to its variant and CPUs: what ``run.in_rounds`` iterates (``name``, ``backend``)."""
    setting: Setting
    variant: object                 # the conclab.servers Variant, with the setting's options appended
    cpus: tuple

    @property
    def name(self) -> str:
        return self.setting.label

    @property
    def backend(self) -> str:
        return self.variant.backend


# Selected variants with no case here, and why (skipped.csv says so: never silently).
NO_CASE = {"threadpool": "connection dispatch ties each worker to one connection for its whole life, so ECHO "
                         "connections would queue behind the pool instead of the GIL: the convoy is measured on "
                         "threadpool-request"}


def run(run) -> None:
    covered = {s.variant for s in SETTINGS}
    for variant in run.variants:
        if variant.name not in covered:
            run.skip(NAME, variant, NO_CASE.get(variant.name, "no convoy case for this variant (SETTINGS)"))
    run.in_rounds(NAME, cases(run, SETTINGS), lambda case, repeat: measure_case(run, case, repeat))


def cases(run, settings) -> list:
    """The settings whose variant the run selected and that fit the machine; the others recorded as skipped."""
    chosen = {v.name: v for v in run.variants}
    out = []
    for setting in settings:
        variant = chosen.get(setting.variant)
        if variant is None:
            continue
        reason = variant.unavailable()
        if reason is None and setting.n_cpus > len(run.all_cpus):
            reason = f"needs {setting.n_cpus} CPUs, the machine has {len(run.all_cpus)}"
        served = replace(variant, options=tuple(variant.options) + setting.server_options())
        case = Case(setting, served, tuple(cpus_for(run, setting.n_cpus)))
        if reason:
            run.skip(NAME, case, reason)
            continue
        out.append(case)
    return out


def cpus_for(run, n: int) -> list:
    """The server's CPUs for a case needing ``n``: the run's server CPUs, or every CPU (shared with the load
    generator) when those are too few."""
    return list(run.server_cpus) if n <= len(run.server_cpus) else list(run.all_cpus)


def cpu_columns(run, cpus) -> dict:
    return {"server_cpus": list(cpus), "n_server_cpus": len(cpus),
            "shares_loadgen_cpu": bool(set(cpus) & set(run.loadgen_cpus))}


def measure_case(run, case: Case, repeat: int) -> None:
    p = run.profile
    conns = p.convoy_conns + p.convoy_cpu_conns
    with run.serve(NAME, case.variant, repeat, cpus=list(case.cpus), max_conns=conns + CONN_MARGIN) as server:
        for cpu_conns in (0, p.convoy_cpu_conns):
            started = time.monotonic()
            row = measure_point(run, server, case, cpu_conns)
            row.update(key(NAME, case.variant, repeat), case=case.name,
                       server_options=" ".join(case.setting.server_options()),
                       switch_interval=case.setting.switch_interval, procs=case.setting.procs,
                       gomaxprocs=len(case.cpus) if case.backend == "go" else None, cpu_conns=cpu_conns,
                       cpu_us=p.convoy_cpu_us, conns=p.convoy_conns, rate=p.convoy_rate,
                       **cpu_columns(run, case.cpus))
            run.write(NAME, row)
            run.progress(f"[{NAME}] {case.name} cpu_conns={cpu_conns} r{repeat}: {describe(row)}, "
                         f"work {row.get('work_rps') or 0:.0f} rps ({time.monotonic() - started:.1f} s)")


def measure_point(run, server, case: Case, cpu_conns: int) -> dict:
    """The ECHO open loop's row, with the CPU work (``cpu_conns`` > 0) running beside it for its whole span."""
    p = run.profile
    point = f"{case.name} cpu_conns={cpu_conns}"
    background = start_cpu_work(run, server, cpu_conns) if cpu_conns else None
    work = None
    try:
        row = run.measure(server, point, "open", p.convoy_conns, rate=p.convoy_rate, size=p.size, op="echo")
    finally:
        if background is not None:
            work = background.stop()
            background.close()
    row.update(work_columns(work))
    return row


def start_cpu_work(run, server, cpu_conns: int):
    """The closed loop of CPU-only WORK, started and past its warm-up (every connection open) before returning."""
    p = run.profile
    duration = p.point_s + p.warmup_s + CPU_LOAD_SLACK_S
    background = loadproc.start_loadgen(server.target, "closed", cpu_conns, duration, cpus=run.loadgen_cpus,
                                        warmup=p.warmup_s, op="work", work=(0, p.convoy_cpu_us), size=0)
    deadline = time.monotonic() + START_TIMEOUT_S
    window = None
    while window is None and background.running() and time.monotonic() < deadline:
        window = background.window()
        time.sleep(POLL_S)
    if window is None:
        background.close()
        raise loadproc.LoadgenError("the CPU work's load generator did not start its window")
    time.sleep(max(0.0, window[0] - time.monotonic()))
    return background


def work_columns(result: dict | None) -> dict:
    """What the CPU work got done beside the ECHO load (empty when its generator printed nothing)."""
    if not result:
        return {"work_rps": None, "work_p99_us": None, "work_requests": None}
    return {"work_rps": result.get("throughput_rps"), "work_p99_us": (result.get("latency_us") or {}).get("p99"),
            "work_requests": result.get("requests")}
