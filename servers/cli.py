"""The ``conclab`` command: serve, backends (and the lab's other tools as they land)."""
from __future__ import annotations

import argparse
import json
import sys

from . import BACKENDS, load, metrics, unavailable_reason
from .base import StartupError, open_listener, warn
from .config import add_arguments, from_namespace
from .stats import Stats

EXIT_USAGE = 2


SERVER_COMMANDS = ("serve", "backends")      # need no pandas, no matplotlib: a server process stays lean


def build_parser(prog: str = "conclab", tools: bool = True) -> argparse.ArgumentParser:
    """The conclab parser; ``tools=False`` leaves out the commands that import the analysis stack."""
    parser = argparse.ArgumentParser(prog=prog, description="conclab: thread pools vs coroutines, measured.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run one backend in the foreground",
                                description="Serve the lab protocol with one concurrency model until SIGTERM/SIGINT.")
    serve.add_argument("backend", choices=list(BACKENDS), metavar="BACKEND",
                       help="one of: " + ", ".join(BACKENDS))
    add_arguments(serve)
    serve.set_defaults(run=cmd_serve)
    backends = commands.add_parser("backends", help="list the backends and whether each can run here")
    backends.set_defaults(run=cmd_backends)
    if tools:                                   # the lab's other tools, one subcommand each
        from analysis.cli import add_parsers as add_report_and_demo
        from experiments.cli import add_parser as add_run
        from loadgen.cli import add_parser as add_load
        from reliability.cli import add_parser as add_check
        add_load(commands)
        add_run(commands)
        add_report_and_demo(commands)
        add_check(commands)
    return parser


def main(argv: list[str] | None = None, prog: str = "conclab") -> int:
    first = next((arg for arg in (argv if argv is not None else sys.argv[1:]) if not arg.startswith("-")), None)
    parser = build_parser(prog, tools=first not in SERVER_COMMANDS)
    if prog != "conclab" and argv and argv[0] == "serve" and len(argv) == 1:
        argv = ["serve", "--help"]
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except StartupError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def cmd_serve(args) -> int:
    try:
        config = from_namespace(args)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    reason = unavailable_reason(args.backend)
    if reason:
        raise StartupError(f"backend {args.backend!r} cannot run here: {reason}")
    if not config.loopback:
        warn(f"binding {config.host}: this server is reachable from other machines")
    if config.fault != "none":
        warn(f"FAULT '{config.fault}' IS ON: a safeguard is deliberately disabled (teaching mode)")
    serve = load(args.backend)
    if args.backend == "go":                        # its own program: exec it, it prints the same lines
        return serve(config)
    stats = Stats(args.backend, config.connection_cap)
    listener = open_listener(config)
    exporter = None
    if config.metrics_port is not None:
        exporter = metrics.start(config.host, config.metrics_port, stats, listener.getsockname()[1])
    serve(listener, config, stats)
    if exporter is not None:
        exporter.shutdown()
    print(json.dumps({"event": "stopped", **stats.snapshot(), "connections_aborted": stats.aborted}), flush=True)
    return 0


def cmd_backends(args) -> int:
    width = max(map(len, BACKENDS))
    for name, (_, summary, _) in BACKENDS.items():
        reason = unavailable_reason(name)
        status = "available" if reason is None else f"unavailable: {reason}"
        print(f"{name:<{width}}  {summary:<52}  {status}")
    return 0
