"""``--engine c``: the closed and open loop as compiled C programs, with the Python engine's JSON result.

Why: on a small machine the Python engine needs about as many CPU microseconds
per request as the fastest servers, so against them it saturates first and the
point measures the client (docs/loadgen.md, "The compiled engine"). The C
loops (``loadgen/c/closedloop.c``, ``loadgen/c/openloop.c``: one source per
loop, standard C and Linux only) spend only the kernel's share of a request
(the socket calls and the loopback TCP path), none of the interpreter's.

How: ``build(loop)`` compiles the source with ``cc -O2`` on first use into the
build cache of ``servers.buildcache`` (``buildcache.build_c``: keyed by the hash
of the source and the header the two loops share, ``loadgen/c/wire.h``; a file
lock, an atomic rename: as the go backend is built). ``run_c(params)`` checks the
target with the Python engine's preflight, runs the program (pinned to
``--cpus``; with ``announce`` it prints the window line itself, on the
inherited stderr), and ``assemble`` turns its one JSON line into the same
result ``runner.run_load`` returns: the latency buckets become an HDR histogram
with loadgen/histo.py's settings (the closed loop keeps HDR's own bucket
layout, the open loop exact microseconds), so percentiles, the encoded
histogram and merging are the Python engine's.

The self-check: the program reads its own CPU time (CLOCK_PROCESS_CPUTIME_ID,
all of the process: it has one thread) at the start and the end of the
measured window and reports it; ``report.cpu_check`` judges it by the Python
engine's threshold. The open loop polls instead of sleeping in the last
50 µs before a slot (so at high rates it never sleeps, openloop.c says why);
it reports the CPU of the polls that found nothing to do apart (``wait_s``),
and the check judges the CPU the requests took: ``cpu_s - wait_s``. Both are
in ``c_engine``. ``c_engine.cpu_s_total`` adds the whole run's CPU time
from ``wait4``'s rusage (connecting, warm-up and drain included).

What it does not do (``params.c_engine_unsupported`` names the option, exit 2):
``--mode hold``, ``--protocol raw``, ``--procs`` above 1, ``--source-addrs``,
``--keepalive``, ``--probe-conns``, ``--connect-timeout``, PING or WORK payloads above
32 KiB (their bytes go on the command line). The first SIGINT/SIGTERM ends
the run early with a result, as the Python engine's.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from conclab.servers import buildcache, processes

from . import histo
from .engine import OPEN_DRAIN_S, OPEN_LATE_US
from .fleet import stop_requested
from .params import LoadError, LoadParams
from .plan import cpus_usable, preflight
from .report import MachineWatch, cpu_check

SOURCE_DIR = Path(__file__).with_name("c")
SOURCES = {"closed": SOURCE_DIR / "closedloop.c", "open": SOURCE_DIR / "openloop.c"}
RUN_SLACK_S = 30.0           # past connect + warm-up + duration + drain, a run is hung
CLOSED_DRAIN_S = 1.0         # after the closed loop's window, how long its requests in flight may answer
WAIT_POLL_S = 0.02          # how often the wrapper looks whether the program has ended
CPU_SOURCE = "CLOCK_PROCESS_CPUTIME_ID over the measured window"


def build(loop: str = "closed", source: Path | None = None) -> Path:
    """The compiled program of ``loop`` ("closed" or "open"), or of ``source``; built now unless cached.

    Raises LoadError (one line: the compiler's first error) when there is no compiler or the build fails.
    """
    source = source or SOURCES[loop]
    cc = buildcache.c_compiler()
    if cc is None:
        raise LoadError("--engine c needs a C compiler (cc or gcc) on PATH: install one, or use --engine native")
    try:
        return buildcache.build_c(cc, source)
    except buildcache.BuildError as exc:
        raise LoadError(str(exc)) from None


# -- running ------------------------------------------------------------------------------------
def command(params: LoadParams, binary: Path) -> list[str]:
    """The program's command line for ``params`` (validated, engine c)."""
    args = [str(binary), "--target", params.target, "--conns", str(params.conns),
            "--duration", repr(params.duration), "--warmup", repr(params.warmup), "--pipeline", str(params.pipeline)]
    if params.op == "echo":                 # the program builds the ECHO frame itself: no size limit on argv
        args += ["--size", str(params.size)]
    else:
        request, reply = params.request_and_reply()
        args += ["--request", request.hex(), "--reply", reply.hex()]
    if params.mode == "open":
        args += ["--rate", repr(params.rate), "--drain", repr(OPEN_DRAIN_S)]
    else:
        args += ["--drain", repr(CLOSED_DRAIN_S)]
    if params.connect_rate != LoadParams().connect_rate:           # paced only when asked (as the Python engine)
        args += ["--connect-rate", repr(params.connect_rate)]
    return args + (["--announce"] if params.announce else [])


def run_c(params: LoadParams) -> dict:
    """Run ``params`` (closed or open loop) on the compiled engine; the result as ``runner.run_load``'s."""
    params.validate()
    binary = build(params.mode)
    preflight(params)
    watch = MachineWatch()
    output, rusage = _run(command(params, binary), params)
    return assemble(params, output, watch, binary, rusage)


def _run(args: list[str], params: LoadParams) -> tuple[dict, object]:
    """Run the program to its end; (its JSON, its rusage). The window line goes straight to our stderr."""
    budget = params.warmup + params.duration + OPEN_DRAIN_S + params.conns / params.connect_rate + RUN_SLACK_S
    with tempfile.TemporaryFile() as stdout:
        proc = processes.spawn(args, cpus=params.cpu_list, stdout=stdout)
        try:
            status, rusage = _wait4(proc, time.monotonic() + budget)
        finally:
            processes.stop(proc, signal.SIGKILL, 1.0)
        if status is None:
            raise LoadError(f"the C engine ran past {budget:.0f} s and was stopped")
        if status != 0:
            raise LoadError(f"the C engine ({Path(args[0]).name}) exited with status {status}")
        stdout.seek(0)
        return json.loads(stdout.read().decode().strip().splitlines()[-1]), rusage


def _wait4(proc: subprocess.Popen, deadline: float) -> tuple[int | None, object]:
    """(exit status, rusage) once ``proc`` ends, or (None, None) at ``deadline``; it is reaped here.

    A stop asked of this process (the first SIGINT/SIGTERM, ``fleet.graceful_interrupts``) is passed on:
    the program ends its window there and still reports.
    """
    forwarded = False
    while time.monotonic() < deadline:
        if stop_requested() and not forwarded:
            proc.send_signal(signal.SIGINT)
            forwarded = True
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, rusage
        time.sleep(WAIT_POLL_S)
    return None, None


# -- the result ---------------------------------------------------------------------------------
def histogram_of(pairs: list[list[int]]) -> tuple[object, int]:
    """(HDR histogram of [[µs, count], ...], how many values were above histo.HIGHEST_US and clamped)."""
    histogram, clamped = histo.new_histogram(), 0
    for value, count in pairs:
        if value > histo.HIGHEST_US:
            clamped += count
            value = histo.HIGHEST_US
        histogram.record_value(value, count)
    return histogram, clamped


def assemble(params: LoadParams, out: dict, watch: MachineWatch, binary: Path, rusage=None) -> dict:
    """The program's JSON line -> the load generator's result (runner.assemble's keys)."""
    latency, clamped = histogram_of(out["histogram"])
    window = out["window_s"]
    requests = latency.get_total_count()
    errors = {**out["error_kinds"]}
    for kind, count in out["connect_errors"].items():
        errors[kind] = errors.get(kind, 0) + count
    part = {"cpu_s": out["cpu_s"] - out.get("wait_s", 0.0), "cpu_wall_s": window}     # waiting is not load
    result = {
        "params": params.as_dict(),
        "started_at": watch.started_at,
        "requests": requests,
        "errors": errors,
        "duration_s": round(window, 4),
        "throughput_rps": round(requests / window, 1) if window else 0.0,
        "latency_us": histo.summary(latency),
        "histogram": histo.encode(latency),
        "connections": {"requested": params.conns, "opened": out["opened"], "failed": params.conns - out["opened"],
                        "served": out["served"], "lost": out.get("lost", sum(out["error_kinds"].values())),
                        "lost_in_flight": out.get("lost_in_flight", 0)},
        "unanswered": out["unanswered"],
        "max_unanswered_wait_us": out["max_unanswered_wait_us"],
        "loadgen_procs": 1,
        **cpu_check([part], cpus_usable(params, 1)),
        "clamped_latencies": out.get("clamped", 0) + clamped,
    }
    if params.mode == "open":
        result["open_loop"] = open_block(params, out)
    result["c_engine"] = engine_block(out, binary, rusage)
    result["machine"] = watch.finish()
    return result


def open_block(params: LoadParams, out: dict) -> dict:
    """The Python engine's ``open_loop`` object from openloop.c's counts and histograms."""
    uncorrected, _ = histogram_of(out["uncorrected_histogram"])
    lateness, _ = histogram_of(out["lag_histogram"])
    return {
        "rate": params.rate,
        "offered": out["scheduled"],
        "sent": out["sent"],
        "late": out["late"],
        "late_threshold_us": OPEN_LATE_US,
        "unsent": out["unsent"],
        "unanswered": out["unanswered"],
        "not_on_schedule": out["late"] + out["unsent"],
        "achieved_send_rps": round(out["sent"] / out["window_s"], 1) if out["window_s"] else 0.0,
        "send_lateness_us": histo.summary(lateness),
        # the compiled loop's own punctuality: the sends not held by a full connection (a reply to wait for)
        "held": out["held"],
        "own_late": out["own_late"],
        "own_send_lateness_us": histo.summary(histogram_of(out["own_lag_histogram"])[0]),
        "uncorrected_latency_us": histo.summary(uncorrected),
        "uncorrected_histogram": histo.encode(uncorrected),
    }


def engine_block(out: dict, binary: Path, rusage) -> dict:
    """What only the compiled engine reports: its program, whole-run counts and CPU."""
    block = {"program": out["client"], "binary": str(binary), "cpu_measured": CPU_SOURCE,
             "replies_total": out.get("total_requests", out.get("answered")), "sent_total": out.get("sent_total"),
             "cpu_s": out["cpu_s"], "wait_s": out.get("wait_s", 0.0)}
    if rusage is not None:
        block["cpu_s_total"] = round(rusage.ru_utime + rusage.ru_stime, 4)
    return block
