"""Experiment 6, switch: what one context switch costs in each mechanism, and per request in each server.

Microbenchmarks (ns per switch, experiments/switchbench.py and the Go program
experiments/go/switchbench/main.go), each in its own process:

    generator send, greenlet switch, asyncio and uvloop future hand-off  (pinned to one CPU)
    Python thread hand-off, process ping-pong over a pipe               (pinned, and unpinned)
    goroutine channel ping-pong                                          (GOMAXPROCS=1 pinned, and unpinned)

Rows of microbenchmarks have backend ``micro`` and variant = the benchmark
(e.g. ``thread-pinned``). Then, per server variant, the context switches and
CPU microseconds the server spent per request at the reference point (closed
loop, 50 conns, 64 B ECHO), taken from this run's throughput rows when that
experiment ran (switch lists throughput in its registry ``needs``; ``source``
says which) or measured here.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from conclab.servers import processes
from . import registry
from .harness.run import describe, key
from conclab.servers import Variant

NAME = "switch"
MICRO = "micro"
BENCH_TIMEOUT_S = 120.0
BUILD_TIMEOUT_S = 600.0
GO_SOURCE = Path(__file__).with_name("go") / "switchbench"
GO_BINARY = "conclab-switchbench"
# (bench, pinned variants to run): pinned runs on the first server CPU, unpinned on every CPU.
PYTHON_BENCHES = (("generator", (True,)), ("greenlet", (True,)), ("asyncio", (True,)), ("uvloop", (True,)),
                  ("thread", (True, False)), ("process_pipe", (True, False)))
NEEDS = {"greenlet": "greenlet", "uvloop": "uvloop"}


def run(run) -> None:
    for bench, pinnings in PYTHON_BENCHES:
        for pinned in pinnings:
            micro(run, bench, pinned, python_command(run, bench))
    for pinned in (True, False):
        micro(run, "goroutine", pinned, go_command(run))
    per_request(run)


def label(bench: str, pinned: bool) -> str:
    return f"{bench}-{'pinned' if pinned else 'unpinned'}"


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
    try:
        binary = build_go()
    except RuntimeError as exc:
        return str(exc)
    return [str(binary), "-rounds", str(run.profile.switch_rounds), "-round-s", f"{run.profile.switch_round_s:g}"]


def micro(run, bench: str, pinned: bool, command) -> None:
    name = label(bench, pinned)
    variant = Variant(name, MICRO)
    if isinstance(command, str):
        run.skip(NAME, variant, command, point=name)
        return
    cpus = [run.server_cpus[0]] if pinned else run.all_cpus
    env = {**os.environ, "GOMAXPROCS": str(len(cpus))}
    for repeat in range(1, run.repeat + 1):
        try:
            result = run_json(command, cpus, env)
        except RuntimeError as exc:
            run.skip(NAME, variant, str(exc), point=f"repeat={repeat}")
            return
        row = {**key(NAME, variant, repeat), "bench": bench, "pinned": pinned, "cpus": cpus, "source": "micro",
               **{k: result.get(k) for k in ("iterations", "rounds", "ns_per_switch", "ns_min", "ns_max",
                                             "ctx_voluntary", "ctx_involuntary")}}
        run.write(NAME, row)
        run.progress(f"[{NAME}] {name} r{repeat}: {result['ns_per_switch']:.0f} ns/switch "
                     f"(min {result['ns_min']:.0f}, max {result['ns_max']:.0f}; CPUs {cpus})")


def run_json(command: list, cpus: list, env: dict) -> dict:
    """Run one benchmark process pinned to ``cpus``; its JSON line, or RuntimeError in one line."""
    proc = processes.spawn(command, cpus=cpus, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=BENCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{os.path.basename(command[0])} took over {BENCH_TIMEOUT_S:g} s") from None
    finally:
        processes.stop(proc, signal.SIGKILL, 1.0)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        last = (err.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise RuntimeError(last)
    return json.loads(lines[-1])


def build_go() -> Path:
    """The Go ping-pong program, built once per source version into the cache (like servers/golang.py)."""
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("no Go toolchain on PATH: install one (Debian: apt-get install -y golang-go) and retry")
    digest = hashlib.sha256()
    for path in sorted(GO_SOURCE.glob("*.go")) + [GO_SOURCE / "go.mod"]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    directory = Path(base) / "conclab" / f"switchbench-{digest.hexdigest()[:16]}"
    binary = directory / GO_BINARY
    if os.access(binary, os.X_OK):
        return binary
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{GO_BINARY}.{os.getpid()}.tmp"
    env = {**os.environ, "CGO_ENABLED": "0", "GOWORK": "off", "GOFLAGS": "-mod=mod", "GOPROXY": "off",
           "GOTOOLCHAIN": "local"}
    try:
        done = subprocess.run([go, "build", "-trimpath", "-o", str(partial), "."], cwd=GO_SOURCE, env=env,
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"building the Go switch benchmark took over {BUILD_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        first = next((line for line in done.stderr.splitlines() if line and not line.startswith("#")), "")
        raise RuntimeError(f"building the Go switch benchmark failed: {first or done.returncode}")
    os.replace(partial, binary)
    return binary


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
