"""Experiment 6, switch: what one context switch costs in each mechanism, and per request in each server.

Microbenchmarks (ns per switch), each in its own process:

    kernel thread switch, two OS threads via futex and via a pipe pair    (same CPU, and across two CPUs)
        experiments/c/threadswitch.c: the baseline, no runtime in the way
    Python thread hand-off (lock + GIL), process ping-pong over a pipe     (pinned, and unpinned)
    generator send, greenlet switch, asyncio and uvloop future hand-off     (pinned to one CPU)
        experiments/switchbench.py
    goroutine channel ping-pong (GOMAXPROCS=1 pinned, and unpinned)
        experiments/go/switchbench/main.go

The C and Go programs are compiled on first use into the lab's build cache,
keyed by their sources' hash (``servers/buildcache.py``, as the compiled load
generator and the go backend are built). Rows of microbenchmarks have backend
``micro`` and variant = the benchmark and its placement (``thread-pinned``,
``futex-cross-cpu``); ``pinned`` is 1 when everything ran on one CPU. Besides the
ns per switch, every row carries what it cost the kernel: ``ctx_per_req`` is OS
context switches per switch (both parties together) and ``cpu_us_per_req`` CPU
time per switch (both parties), so a figure says what it measures.

Then, per server variant, the context switches and CPU microseconds the server
spent per request at the reference point (closed loop, 50 conns, 64 B ECHO),
taken from this run's throughput rows when that experiment ran (switch lists
throughput in its registry ``needs``; ``source`` says which) or measured here.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from conclab.servers import buildcache, processes

from . import registry
from .harness.run import describe, key

NAME = "switch"
MICRO = "micro"
BENCH_TIMEOUT_S = 120.0
SWITCHES_PER_ROUND_TRIP = 2
GO_SOURCE = Path(__file__).with_name("go") / "switchbench"
GO_BINARY = "conclab-switchbench"
C_SOURCE = Path(__file__).with_name("c") / "threadswitch.c"
C_BINARY = "conclab-threadswitch"
C_FLAGS = ("-O2", "-Wall", "-pthread")
NO_C_COMPILER = "no C compiler on PATH: install one (Debian: apt-get install -y gcc) and retry"
# The kernel baselines (threadswitch --mode) and their placements: both threads on one CPU, or one per CPU.
KERNEL_BENCHES = ("futex", "pipe")
SAME_CPU, CROSS_CPU = "same-cpu", "cross-cpu"
# (bench, pinned variants to run): pinned runs on the first server CPU, unpinned on every CPU.
PYTHON_BENCHES = (("generator", (True,)), ("greenlet", (True,)), ("asyncio", (True,)), ("uvloop", (True,)),
                  ("thread", (True, False)), ("process_pipe", (True, False)))
NEEDS = {"greenlet": "greenlet", "uvloop": "uvloop"}


def run(run) -> None:
    """Every microbenchmark in interleaved rounds (all of them once, then again...), then the per-request costs."""
    command, cases = c_command(run), []
    for bench in KERNEL_BENCHES:
        for placement, cpus in kernel_placements(run).items():
            cases.append(kernel_case(bench, placement, cpus, command))
    for bench, pinnings in PYTHON_BENCHES:
        for pinned in pinnings:
            cases.append(Micro(label(bench, pinned), bench, placement_cpus(run, pinned), pinned,
                               python_command(run, bench)))
    for pinned in (True, False):
        cases.append(Micro(label("goroutine", pinned), "goroutine", placement_cpus(run, pinned), pinned,
                           go_command(run)))
    runnable = []
    for case in cases:
        if isinstance(case.command, str):
            run.skip(NAME, case, case.command, point=case.name)
        else:
            runnable.append(case)
    run.in_rounds(NAME, runnable, lambda case, repeat: micro(run, case, repeat))
    per_request(run)


@dataclass(frozen=True)
class Micro:
    """One microbenchmark at one placement: its command, or the one-line reason it cannot run here."""
    name: str
    bench: str
    cpus: list
    pinned: bool
    command: list | str
    backend: str = MICRO
    options: tuple = ()


def label(bench: str, pinned: bool) -> str:
    return f"{bench}-{'pinned' if pinned else 'unpinned'}"


def placement_cpus(run, pinned: bool) -> list:
    return [run.server_cpus[0]] if pinned else run.all_cpus


def kernel_placements(run) -> dict:
    """placement -> the CPUs of threads A and B ([one] for the same CPU), or why it cannot run here."""
    first = run.server_cpus[0]
    others = [c for c in [*run.server_cpus, *run.all_cpus] if c != first]
    return {SAME_CPU: [first],
            CROSS_CPU: [first, others[0]] if others else "only one CPU is available: nothing to cross to"}


def kernel_case(bench: str, placement: str, cpus, command) -> Micro:
    """One kernel baseline (``futex`` or ``pipe``) at one placement; ``command`` or ``cpus`` may be why it cannot run."""
    why = command if isinstance(command, str) else cpus if isinstance(cpus, str) else None
    args = why or [*command, "--mode", bench, "--cpus", ",".join(map(str, cpus))]
    return Micro(f"{bench}-{placement}", bench, [] if why else cpus, placement == SAME_CPU, args)


def python_command(run, bench: str):
    """The Python microbenchmark's command, or the reason it cannot run."""
    need = NEEDS.get(bench)
    if need:
        import importlib.util
        if importlib.util.find_spec(need) is None:
            return f"Python package {need!r} is not installed: pip install {need}"
    return [sys.executable, "-m", "conclab.experiments.switchbench", bench, "--rounds", str(run.profile.switch_rounds),
            "--round-s", f"{run.profile.switch_round_s:g}"]


def go_command(run):
    """The Go microbenchmark's command (building it into the cache if needed), or the reason it cannot run."""
    return built_command(run, build_go, "-")


def c_command(run):
    """The kernel baseline's command without --mode/--cpus (built into the cache if needed), or why it cannot run."""
    return built_command(run, build_c, "--")


def built_command(run, build, dash: str):
    """A compiled benchmark's command with the profile's rounds, or the one-line reason it cannot be built."""
    try:
        binary = build()
    except RuntimeError as exc:           # buildcache.BuildError included
        return str(exc)
    return [str(binary), f"{dash}rounds", str(run.profile.switch_rounds),
            f"{dash}round-s", f"{run.profile.switch_round_s:g}"]


def micro(run, case: Micro, repeat: int) -> None:
    """One round of one microbenchmark: a switch.csv row (a failure raises RuntimeError: in_rounds skips it)."""
    env = {**os.environ, "GOMAXPROCS": str(len(case.cpus))}
    result = run_json(case.command, case.cpus, env)
    row = {**key(NAME, case, repeat), **micro_row(result, case.bench, case.pinned, case.cpus)}
    run.write(NAME, row)
    cpu_ns = None if row["cpu_us_per_req"] is None else row["cpu_us_per_req"] * 1000
    run.progress(f"[{NAME}] {case.name} r{repeat}: {result['ns_per_switch']:.0f} ns/switch "
                 f"(min {result['ns_min']:.0f}, max {result['ns_max']:.0f}; per switch "
                 f"{_shown(row['ctx_per_req'], '.2f')} OS context switches, {_shown(cpu_ns, '.0f')} ns CPU"
                 f"{idle_note(result)}; CPUs {case.cpus})")


def micro_row(result: dict, bench: str, pinned: bool, cpus: list) -> dict:
    """A switch.csv row (without its key) from a benchmark's JSON: per switch, the OS context switches and CPU
    time of both parties over the measured rounds (None where the program did not count them)."""
    switches = SWITCHES_PER_ROUND_TRIP * (result.get("iterations") or 0) * (result.get("rounds") or 0)
    counted = [result.get(k) for k in ("ctx_voluntary", "ctx_involuntary")]
    ctx = sum(counted) / switches if switches and None not in counted else None
    cpu_ns = result.get("cpu_ns")
    return {"bench": bench, "pinned": pinned, "cpus": cpus, "source": "micro",
            **{k: result.get(k) for k in ("iterations", "rounds", "ns_per_switch", "ns_min", "ns_max",
                                          "ctx_voluntary", "ctx_involuntary")},
            "ctx_per_req": ctx, "cpu_us_per_req": cpu_ns / switches / 1000 if switches and cpu_ns is not None
            else None}


def idle_note(result: dict) -> str:
    """How often the CPUs used went idle per round trip (the C baseline reads /sys cpuidle), for the progress line."""
    trips = (result.get("iterations") or 0) * (result.get("rounds") or 0)
    idle = result.get("idle") or []
    entered = [s for s in idle if s.get("entries")]
    if not trips or not entered:
        return ""
    return "; idle entries per round trip " + ", ".join(
        f"cpu{s['cpu']} {s['state']} {s['entries'] / trips:.2g}" for s in entered)


def _shown(value, spec: str) -> str:
    return "?" if value is None else format(value, spec)


def run_json(command: list, cpus: list, env: dict) -> dict:
    """Run one benchmark process pinned to ``cpus``; its JSON line, or RuntimeError in one line."""
    proc = processes.spawn(command, cpus=cpus, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=BENCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{os.path.basename(command[0])} took over {BENCH_TIMEOUT_S:g} s") from None
    finally:
        processes.stop(proc, signal.SIGKILL, 1.0)
    return parse_json(out, err, proc.returncode)


def parse_json(out: str, err: str, returncode: int) -> dict:
    """A benchmark's last JSON line on stdout; RuntimeError with its last stderr line if it failed or printed none."""
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if returncode != 0 or not lines:
        last = (err.strip().splitlines() or [f"exit status {returncode}"])[-1]
        raise RuntimeError(last)
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"unreadable benchmark output: {exc}") from None


def build_go() -> Path:
    """The Go ping-pong program, built once per source version into the cache."""
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("no Go toolchain on PATH: install one (Debian: apt-get install -y golang-go) and retry")
    env = {**os.environ, "CGO_ENABLED": "0", "GOWORK": "off", "GOFLAGS": "-mod=mod", "GOPROXY": "off",
           "GOTOOLCHAIN": "local"}
    sources = sorted(GO_SOURCE.glob("*.go")) + [GO_SOURCE / "go.mod"]
    return buildcache.build_once(
        buildcache.cache_dir("switchbench", sources), GO_BINARY,
        lambda out: buildcache.run_compiler([go, "build", "-trimpath", "-o", str(out), "."], "the Go switch benchmark",
                                            cwd=GO_SOURCE, env=env))


def build_c() -> Path:
    """The C kernel thread-switch baseline, built once per source version into the cache."""
    cc = buildcache.c_compiler()
    if cc is None:
        raise RuntimeError(NO_C_COMPILER)
    return buildcache.build_c(cc, C_SOURCE, C_FLAGS, C_BINARY, "the C thread-switch benchmark")


def per_request(run) -> None:
    """Context switches and CPU per request of every server variant at the reference point."""
    run.each_variant(NAME, lambda variant, repeat: per_request_row(run, variant, repeat))


def per_request_row(run, variant, repeat: int) -> None:
    conns = run.profile.reference_conns
    rows = [r for r in registry.results(run, NAME, "throughput")
            if r["variant"] == variant.name and r["conns"] == conns and r["repeat"] == repeat]
    if rows:
        row, source = rows[0], f"throughput conns={conns}"
    else:
        registry.measured_itself(run, NAME, "throughput", variant)
        with run.serve(NAME, variant, repeat, max_conns=conns + 100) as server:
            row = run.measure(server, f"conns={conns}", "closed", conns, size=run.profile.size, op="echo")
        source = f"switch conns={conns}"
        run.progress(f"[{NAME}] {variant.name} conns={conns} r{repeat}: {describe(row)}")
    run.write(NAME, {**key(NAME, variant, repeat), "bench": "server_per_request", "pinned": True,
                     "cpus": run.server_cpus, "source": source, "cpu_us_per_req": row.get("cpu_us_per_req"),
                     "ctx_per_req": row.get("ctx_per_req"), "ctx_voluntary": row.get("server_ctx_voluntary"),
                     "ctx_involuntary": row.get("server_ctx_involuntary")})
