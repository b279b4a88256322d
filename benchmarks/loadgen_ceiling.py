"""How fast is the load generator itself? (a benchmark, not a test)

    python benchmarks/loadgen_ceiling.py                  # go server, 3 x 10 s, the reference setup
    python benchmarks/loadgen_ceiling.py --quick          # 3 x 3 s
    python benchmarks/loadgen_ceiling.py --python-backends --duration 3
    python benchmarks/loadgen_ceiling.py --quick --engine c   # the compiled engine (conclab load --engine c)

The ceiling run: the fastest server there is (the ``go`` backend, else
``epoll``, else ``threads``) pinned to CPU 0; one load-generator process
pinned to CPU 1; closed loop, 50 connections, 64-byte ECHO, every latency
recorded; repeated, median reported with the spread. Next to each run: the
load generator's CPU share (its self-check) and the server's, and how busy
the machine's CPUs were meanwhile (other people's work shows up there).

Then the open loop against the same server (``--no-open`` skips it): at
half the ceiling's median rate, how late the generator sends (the p99 of
actual minus scheduled send time, target <= 100 µs), then at rising
fractions of the ceiling (0.6x .. 1.0x) until it flags itself saturated or
falls behind its schedule (more than 1% of the requests late by over 1 ms or
never sent): the highest fraction it kept is reported (target >= 0.9x). With
one request in flight per connection (``--pipeline 1``) a request whose
connection still waits for a reply is *held* until it comes: that lateness is
the server's, not the generator's. The compiled engine counts those sends
apart and is judged on the others (its own punctuality); both figures are
printed. The Python engine is judged on every send. So that the open loop
measures the generator and not how often a slow reply holds a connection,
it runs with up to ``--open-pipeline`` (64) requests in flight per
connection: a request is held only when its connection has 64 outstanding. The open loop's cost per request is shown
next to the closed loop's: the generator CPU µs per request sent.

``--python-backends`` then drives every Python backend the same way and shows
which side saturates first: the server (CPU 0 near 100%) or the load
generator (its self-check).

Results are printed and written as JSON to ``--out`` (default
results/loadgen_ceiling.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from conclab.loadgen import LoadParams, run_load  # noqa: E402
from conclab.servers import BACKENDS, unavailable_reason  # noqa: E402
from conclab.servers.launcher import ServerProcess, ServerStartError  # noqa: E402

SERVER_CPU, LOADGEN_CPU = 0, 1
CEILING_BACKENDS = ("go", "epoll", "threads")       # first available is the ceiling server
PYTHON_BACKENDS = ("threads", "threadpool", "asyncio", "uvloop", "gevent", "epoll")
TARGET_RPS = 120_000
OPEN_HALF = 0.5                                      # the fraction of the ceiling where send lateness is judged
OPEN_FRACTIONS = (0.6, 0.7, 0.8, 0.9, 1.0)           # then rising until the open loop no longer keeps up
OPEN_TARGET_FRACTION, OPEN_TARGET_LATENESS_US = 0.9, 100
OPEN_MAX_BEHIND = 0.01                               # more of the schedule late or unsent than this: fell behind


def start_server(backend: str, cmd: list | None = None) -> ServerProcess:
    """``python -m conclab.servers BACKEND`` (or any ``cmd`` that prints the ready line) pinned to SERVER_CPU."""
    try:
        if cmd:
            return ServerProcess.command(cmd, name=backend, cpus=[SERVER_CPU])
        return ServerProcess(backend, ["--max-conns", "20000"], cpus=[SERVER_CPU])
    except ServerStartError as exc:
        raise SystemExit(f"{backend} did not start: {exc}") from None


def one_run(server: ServerProcess, args) -> dict:
    params = LoadParams(target=server.target, mode="closed", conns=args.conns, size=64, op="echo",
                        duration=args.duration, warmup=args.warmup, pipeline=args.pipeline, cpus=str(LOADGEN_CPU),
                        engine=args.engine)
    cpu0, wall0 = server.cpu_seconds(), time.monotonic()
    result = run_load(params)
    server_share = 100.0 * (server.cpu_seconds() - cpu0) / (time.monotonic() - wall0)
    rps = max(result["throughput_rps"], 1.0)
    return {"throughput_rps": result["throughput_rps"], "requests": result["requests"],
            "errors": result["errors"], "latency_us": result["latency_us"],
            # CPU microseconds each side spends per request: 1e6 / this is the rate at which it would saturate a core
            "loadgen_cpu_us_per_request": round(10_000 * result["loadgen_cpu_percent"] / rps, 2),
            "server_cpu_us_per_request": round(10_000 * server_share / rps, 2),
            "loadgen_cpu_percent": result["loadgen_cpu_percent"], "loadgen_saturated": result["loadgen_saturated"],
            "server_cpu_percent": round(server_share, 1),
            "cpu_busy_percent": result["machine"]["cpu_busy_percent"],
            "loadavg_after": result["machine"]["loadavg_after"]}


def open_run(server: ServerProcess, args, rate: float) -> dict:
    """One open-loop run at ``rate`` req/s: kept its schedule or not, its send lateness, its CPU per request."""
    params = LoadParams(target=server.target, mode="open", rate=rate, conns=args.conns, size=64, op="echo",
                        duration=args.duration, warmup=args.warmup, pipeline=args.open_pipeline, cpus=str(LOADGEN_CPU),
                        engine=args.engine)
    cpu0 = server.cpu_seconds()
    result = run_load(params)
    server_s = server.cpu_seconds() - cpu0
    ol = result["open_loop"]
    sent = max(ol["sent"], 1)
    own = own_punctuality(ol)
    loadgen_cpu_s = result["loadgen_cpu_percent"] / 100 * result["duration_s"]    # the window's, as the closed loop's
    return {"rate": round(rate, 1), "throughput_rps": result["throughput_rps"], "achieved_send_rps": ol["achieved_send_rps"],
            "offered": ol["offered"], "sent": ol["sent"], "late": ol["late"], "unsent": ol["unsent"],
            "unanswered": ol["unanswered"], "errors": result["errors"], "latency_us": result["latency_us"],
            "send_lateness_us": ol["send_lateness_us"], "held": ol.get("held"),
            "own_send_lateness_us": own["lateness"], "loadgen_cpu_percent": result["loadgen_cpu_percent"],
            "loadgen_saturated": result["loadgen_saturated"],
            "loadgen_cpu_us_per_request": round(1e6 * loadgen_cpu_s / sent, 2),
            # the server's CPU covers the warm-up too: per request of the whole schedule
            "server_cpu_us_per_request": round(1e6 * server_s / max(rate * (args.warmup + args.duration), 1), 2),
            "cpu_busy_percent": result["machine"]["cpu_busy_percent"],
            "loadavg_after": result["machine"]["loadavg_after"],
            "kept_up": not result["loadgen_saturated"] and own["behind"] <= OPEN_MAX_BEHIND * max(ol["offered"], 1)}


def own_punctuality(ol: dict) -> dict:
    """The generator's own lateness and how many requests it left behind schedule.

    With ``--pipeline 1`` a request whose connection still waits for a reply is held until the reply
    comes: that lateness is the server's (it is behind), not the generator's. The compiled engine counts
    those sends apart (``held``) and reports the lateness of the others (``own_send_lateness_us``,
    ``own_late``); the Python engine does not, and is judged on every send."""
    if "own_send_lateness_us" not in ol:
        return {"lateness": ol["send_lateness_us"], "behind": ol["not_on_schedule"]}
    return {"lateness": ol["own_send_lateness_us"], "behind": ol["own_late"] + ol["unsent"]}


def open_series(backend: str, args, ceiling_rps: float) -> dict:
    """At half the ceiling (send lateness), then rising fractions until the open loop does not keep up."""
    with start_server(backend) as server:
        half = open_run(server, args, OPEN_HALF * ceiling_rps)
        show_open(OPEN_HALF, half)
        rising, kept = [], None
        for fraction in OPEN_FRACTIONS:
            run = open_run(server, args, fraction * ceiling_rps)
            show_open(fraction, run)
            rising.append({"fraction": fraction, **run})
            if not run["kept_up"]:
                break
            kept = fraction
    return {"backend": backend, "ceiling_rps": ceiling_rps, "half": half, "rising": rising,
            "highest_fraction_kept": kept, "half_lateness_p99_us": half["own_send_lateness_us"]["p99"]}


def show_open(fraction: float, r: dict) -> None:
    lat, late, own = r["latency_us"], r["send_lateness_us"], r["own_send_lateness_us"]
    held = "" if r["held"] is None else f" (held by a full connection {r['held']:,}; the others: p50 {own['p50']} p99 {own['p99']} µs)"
    print(f"  open {fraction:.1f}x = {r['rate']:>9,.0f} req/s: sent {r['achieved_send_rps']:>9,.0f}/s  "
          f"unsent {r['unsent']:,}  late(>1 ms) {r['late']:,}  send lateness p50 {late['p50']} p99 {late['p99']} µs{held}  "
          f"latency p50 {lat['p50']} p99 {lat['p99']} µs  loadgen CPU {r['loadgen_cpu_percent']:5.1f}%"
          f"{' (SATURATED)' if r['loadgen_saturated'] else ''}  CPU µs/request loadgen "
          f"{r['loadgen_cpu_us_per_request']} server {r['server_cpu_us_per_request']}  "
          f"machine busy {r['cpu_busy_percent']} load {r['loadavg_after']}  -> {'kept up' if r['kept_up'] else 'did NOT keep up'}")


def series(backend: str, args, repeats: int) -> dict:
    with start_server(backend) as server:
        runs = [one_run(server, args) for _ in range(repeats)]
    rps = [r["throughput_rps"] for r in runs]
    loadgen_us = statistics.median(r["loadgen_cpu_us_per_request"] for r in runs)
    server_us = statistics.median(r["server_cpu_us_per_request"] for r in runs)
    first = "server" if server_us >= loadgen_us else "loadgen"      # the side that needs more CPU per request
    return {"backend": backend, "runs": runs, "saturates_first": first, "median_rps": statistics.median(rps), "min_rps": min(rps),
            "max_rps": max(rps), "median_loadgen_cpu_percent": statistics.median(r["loadgen_cpu_percent"] for r in runs),
            "median_server_cpu_percent": statistics.median(r["server_cpu_percent"] for r in runs)}


def available(name: str) -> bool:
    return unavailable_reason(name) is None


def show(s: dict) -> None:
    for i, r in enumerate(s["runs"], 1):
        lat = r["latency_us"]
        print(f"  run {i}: {r['throughput_rps']:>10,.0f} req/s  p50 {lat['p50']:>6} µs  p99 {lat['p99']:>6} µs  "
              f"p99.9 {lat['p999']:>6} µs  loadgen CPU {r['loadgen_cpu_percent']:5.1f}%"
              f"{' (SATURATED)' if r['loadgen_saturated'] else ''}  server CPU {r['server_cpu_percent']:5.1f}%  "
              f"CPU µs/request loadgen {r['loadgen_cpu_us_per_request']} server {r['server_cpu_us_per_request']}  "
              f"machine busy {r['cpu_busy_percent']} load {r['loadavg_after']}  errors {r['errors'] or 0}")
    print(f"  median {s['median_rps']:,.0f} req/s (spread {s['min_rps']:,.0f} .. {s['max_rps']:,.0f}), "
          f"loadgen CPU {s['median_loadgen_cpu_percent']:.1f}%, server CPU {s['median_server_cpu_percent']:.1f}%, "
          f"saturates first: {s['saturates_first']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=list(BACKENDS), help="ceiling server (default: go, else epoll, else threads)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (default: 10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="discarded seconds before each run (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per series (default: 3)")
    parser.add_argument("--conns", type=int, default=50, help="connections (default: 50)")
    parser.add_argument("--pipeline", type=int, default=1, help="requests in flight per connection (default: 1)")
    parser.add_argument("--open-pipeline", type=int, default=64,
                        help="requests in flight per connection in the open loop (default: 64, so a request waits for "
                             "a reply only when the server is far behind)")
    parser.add_argument("--quick", action="store_true", help="3 s runs")
    parser.add_argument("--no-open", action="store_true", help="skip the open-loop runs after the ceiling")
    parser.add_argument("--python-backends", action="store_true", help="also drive every Python backend once")
    parser.add_argument("--engine", choices=("native", "c"), default="native",
                        help="the load generator's engine: native (Python, the default) or c (compiled)")
    parser.add_argument("--out", help="JSON results file (default: results/loadgen_ceiling.json, "
                                      "results/loadgen_ceiling_c.json with --engine c)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 3.0
    args.out = args.out or str(REPO / "results" / ("loadgen_ceiling_c.json" if args.engine == "c" else "loadgen_ceiling.json"))
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPUs (server on CPU 0, load generator on CPU 1)")
    backend = args.backend or next(b for b in CEILING_BACKENDS if available(b))
    print(f"ceiling: {backend} server on CPU {SERVER_CPU}, one load generator process ({args.engine} engine) on CPU {LOADGEN_CPU}, "
          f"closed loop, {args.conns} conns, pipeline {args.pipeline}, 64-byte ECHO, {args.repeats} x {args.duration:g} s")
    ceiling = series(backend, args, args.repeats)
    show(ceiling)
    verdict = "meets" if ceiling["median_rps"] >= TARGET_RPS else "is below"
    print(f"  -> {verdict} the {TARGET_RPS:,} req/s target")
    report = {"ceiling": ceiling, "target_rps": TARGET_RPS, "args": vars(args), "python_backends": []}
    if not args.no_open:
        print(f"open loop against {backend} (pipeline {args.open_pipeline}): {OPEN_HALF}x the ceiling, then {', '.join(map(str, OPEN_FRACTIONS))}x "
              f"until it does not keep up (saturated, or > {OPEN_MAX_BEHIND:.0%} late or unsent)")
        report["open_loop"] = opened = open_series(backend, args, ceiling["median_rps"])
        kept = opened["highest_fraction_kept"]
        print(f"  -> kept up to {f'{kept:.1f}x' if kept else 'none of the rates from 0.6x'} of the closed-loop ceiling "
              f"(target {OPEN_TARGET_FRACTION}x); own send lateness p99 at {OPEN_HALF}x: {opened['half_lateness_p99_us']} µs "
              f"(target <= {OPEN_TARGET_LATENESS_US} µs); load generator CPU µs/request: closed "
              f"{statistics.median(r['loadgen_cpu_us_per_request'] for r in ceiling['runs'])}, open at {OPEN_HALF}x "
              f"{opened['half']['loadgen_cpu_us_per_request']}")
    if args.python_backends:
        for name in PYTHON_BACKENDS:
            if available(name):
                print(f"{name}: server on CPU {SERVER_CPU}, load generator on CPU {LOADGEN_CPU}")
                s = series(name, args, 1)
                show(s)
                report["python_backends"].append(s)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
