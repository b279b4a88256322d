"""``conclab load`` (and ``python -m conclab.loadgen``): the command line of the load generator.

``add_parser(subparsers)`` adds the ``load`` subcommand to any argparse
subparsers object and sets ``run=cmd_load``; ``main()`` is the stand-alone
entry point. Every option maps onto a ``LoadParams`` field of the same name,
except Locust's ``--master`` options (a ``locust_engine.MasterSpec``).
``add_worker_parser(subparsers)`` adds ``load-worker``: a Locust worker for a
``conclab load --engine locust --master`` on another machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .locust_engine import MasterSpec, locust_env, run_locust, worker_command
from .params import DEFAULT_TARGET, ENGINES, MODES, OPS, PROTOCOLS, LoadError, LoadParams
from .progress import Progress
from .report import append_csv, saturation_warning, summary_text, unserved_warning, warn

EXIT_OK, EXIT_NOTHING, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
OUTPUT_OPTIONS = ("json", "out", "csv", "quiet")

DESCRIPTION = f"""\
Drive one lab server and measure it: throughput, HDR latency percentiles (µs),
errors by kind, and whether the load generator itself was the bottleneck.

modes:
  closed  N connections, each sends and waits for the reply (--pipeline D in flight)
  open    a constant aggregate --rate R; latency counted from the *scheduled* send
          time (coordinated-omission correction, as wrk2); late/unsent sends reported
  hold    ramp --conns N at --connect-rate C/s, PING each, hold for --duration
          (--keepalive S), report connected/failed and why; --probe-conns K drives a
          small closed loop meanwhile

The default target is {DEFAULT_TARGET}: start a server there with
`conclab serve threads --port 7878`. See docs/loadgen.md."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``load`` to an argparse subparsers object; returns the new parser."""
    parser = subparsers.add_parser("load", help="drive a server with load and measure it",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=cmd_load)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = LoadParams()
    shape = parser.add_argument_group("what to send")
    shape.add_argument("--target", default=d.target, metavar="HOST:PORT", help=f"the server (default: {d.target})")
    shape.add_argument("--mode", default=d.mode, choices=MODES, help=f"load pattern (default: {d.mode})")
    shape.add_argument("--op", default=d.op, choices=OPS, help=f"request type (default: {d.op})")
    shape.add_argument("--size", type=int, default=d.size, metavar="B",
                       help=f"payload bytes per request (ping: at most 64; raw: message size) (default: {d.size})")
    shape.add_argument("--work", default=d.work, metavar="IO_US,CPU_US",
                       help=f"--op work: server waits IO_US then computes CPU_US microseconds (default: {d.work})")
    shape.add_argument("--protocol", default=d.protocol, choices=PROTOCOLS,
                       help=f"framed lab protocol, or raw RFC 862 echo of fixed-size messages (default: {d.protocol})")
    load = parser.add_argument_group("how much, how long")
    load.add_argument("--conns", type=int, default=d.conns, metavar="N", help=f"connections (default: {d.conns})")
    load.add_argument("--pipeline", type=int, default=d.pipeline, metavar="D",
                      help=f"requests in flight per connection (default: {d.pipeline})")
    load.add_argument("--rate", type=float, default=d.rate, metavar="R", help="--mode open: requests/s, all connections together")
    load.add_argument("--duration", type=float, default=d.duration, metavar="S",
                      help=f"measured seconds (hold: seconds held after the ramp) (default: {d.duration})")
    load.add_argument("--warmup", type=float, default=d.warmup, metavar="S",
                      help=f"seconds run first and discarded (default: {d.warmup})")
    load.add_argument("--connect-timeout", type=float, default=d.connect_timeout, metavar="S",
                      help=f"give up on a connection (or its first PING) after this (default: {d.connect_timeout})")
    hold = parser.add_argument_group("--mode hold")
    hold.add_argument("--connect-rate", type=float, default=d.connect_rate, metavar="C",
                      help=f"new connections per second during the ramp (default: {d.connect_rate:g})")
    hold.add_argument("--keepalive", type=float, default=d.keepalive, metavar="S",
                      help="PING every held connection every S seconds (default: off)")
    hold.add_argument("--probe-conns", type=int, default=d.probe_conns, metavar="K",
                      help="K extra connections run a closed loop while the others are held (default: 0)")
    hold.add_argument("--source-addrs", default=d.source_addrs, metavar="LIST",
                      help="source addresses to spread connections over, e.g. 127.0.0.2,127.0.0.3 "
                           "(default: automatic 127.0.0.x when one address runs out of ephemeral ports)")
    gen = parser.add_argument_group("the load generator")
    gen.add_argument("--engine", default=d.engine, choices=ENGINES,
                     help=f"native (epoll, ~80k req/s per core), c (compiled closed and open loop: no Python "
                          f"per request, only the kernel's share; built with cc on first use) or locust "
                          f"(distributable, ~10k req/s per core) (default: {d.engine})")
    gen.add_argument("--procs", type=int, default=d.procs, metavar="P",
                     help=f"native: processes; histograms are merged exactly (default: {d.procs})")
    gen.add_argument("--cpus", default=d.cpus, metavar="LIST",
                     help="pin the load generator's processes (one CPU each, round-robin), e.g. 1 or 0,1 or 2-3")
    locust = parser.add_argument_group("--engine locust")
    locust.add_argument("--users", type=int, default=d.users, metavar="U", help=f"locust users (default: {d.users})")
    locust.add_argument("--spawn-rate", type=float, default=d.spawn_rate, metavar="S",
                        help="users started per second (default: all at once)")
    locust.add_argument("--processes", type=int, default=d.processes, metavar="P",
                        help=f"locust worker processes on this machine (default: {d.processes})")
    locust.add_argument("--run-time", type=float, default=d.run_time, metavar="T",
                        help="seconds locust runs (default: --duration)")
    locust.add_argument("--master", action="store_true",
                        help="be only the master: workers on other machines (`conclab load-worker --master "
                             "HOST:PORT`) send the load and their reports; their merge is the result")
    locust.add_argument("--expect-workers", type=int, default=1, metavar="N",
                        help="--master: start once N workers are connected (default: 1)")
    locust.add_argument("--master-bind", default=MasterSpec.bind, metavar="HOST:PORT",
                        help=f"--master: where workers connect (default: {MasterSpec.bind})")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    out.add_argument("--out", metavar="PATH", help="also write the JSON result to PATH")
    out.add_argument("--csv", metavar="PATH", help="append the result as one tidy CSV row to PATH (header if new)")
    out.add_argument("--quiet", action="store_true", help="no progress bar and no summary")


def params_from(args: argparse.Namespace) -> LoadParams:
    fields = {f.name for f in dataclasses.fields(LoadParams)}
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    values["progress"] = not args.quiet and Progress.wanted()
    values["announce"] = bool(getattr(args, "json", False))     # a program reads the result: tell it the window
    return LoadParams(**values)


def master_from(args: argparse.Namespace) -> MasterSpec | None:
    """``--master``'s spec, or None; a master option without ``--master`` is an error."""
    if not getattr(args, "master", False):
        if getattr(args, "expect_workers", 1) != 1 or getattr(args, "master_bind", MasterSpec.bind) != MasterSpec.bind:
            raise LoadError("--expect-workers and --master-bind need --master")
        return None
    if args.engine != "locust":
        raise LoadError("--master needs --engine locust")
    return MasterSpec(expect_workers=args.expect_workers, bind=args.master_bind).validate()


def cmd_load(args: argparse.Namespace) -> int:
    from .fleet import graceful_interrupts
    from .runner import run_load
    try:
        params = params_from(args).validate()
        master = master_from(args)
        with graceful_interrupts():
            result = run_locust(params, master) if master else run_load(params)
    except LoadError as exc:
        print(f"conclab load: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    result["params"].update({name: getattr(args, name) for name in OUTPUT_OPTIONS})
    emit(args, result)
    return EXIT_OK if result["requests"] or result.get("hold", {}).get("connected") else EXIT_NOTHING


def emit(args: argparse.Namespace, result: dict) -> None:
    for warning in (saturation_warning(result), unserved_warning(result)):
        if warning:
            warn(warning)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.csv:
        append_csv(args.csv, result)
    if args.json:
        print(json.dumps(result), flush=True)                  # one line: scripts take the last JSON line
    elif not args.quiet:
        print(summary_text(result), flush=True)


def build_parser(prog: str = "python -m loadgen") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=cmd_load)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m conclab.loadgen [options]``: the same as ``conclab load [options]``."""
    args = build_parser().parse_args(argv)
    return args.run(args)


WORKER_DESCRIPTION = """\
A Locust worker for `conclab load --engine locust --master` on another machine:
it connects to the master at HOST:PORT (default port 5557), takes the request
shape, target and users from it, drives the target, and when the test stops
sends the master its exact µs HDR histogram and failure counts. It exits when
the master quits. The same as
`locust -f loadgen/locustfile.py --worker --master-host HOST --master-port PORT`.
See docs/loadgen.md."""


def add_worker_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``load-worker`` to an argparse subparsers object; returns the new parser."""
    parser = subparsers.add_parser("load-worker", help="a locust worker for a `conclab load --master` elsewhere",
                                   description=WORKER_DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--master", required=True, metavar="HOST[:PORT]", help="the master (port default: 5557)")
    parser.add_argument("--processes", type=int, default=1, metavar="P",
                        help="worker processes on this machine, -1: one per core (default: 1)")
    parser.set_defaults(run=cmd_load_worker)
    return parser


def cmd_load_worker(args: argparse.Namespace) -> int:
    """Become the Locust worker (exec: signals reach Locust directly)."""
    if args.processes == 0 or args.processes < -1:
        print("conclab load-worker: error: --processes must be at least 1, or -1", file=sys.stderr)
        return EXIT_USAGE
    try:
        cmd = worker_command(args.master, args.processes)
    except LoadError as exc:
        print(f"conclab load-worker: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.flush()
    os.execve(cmd[0], cmd, locust_env())
