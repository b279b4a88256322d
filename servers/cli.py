"""``conclab serve`` and ``conclab backends``: the servers' own command line.

``add_parsers(subparsers)`` adds both subcommands (the ``conclab`` command
builds its parser from each layer's ``add_parser(s)``); ``main`` is
``python -m conclab.servers BACKEND ...``, the same as ``conclab serve``. This
module imports nothing above the servers layer, so a server process stays lean:
no pandas, no matplotlib, no load generator.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import BACKENDS, load, metrics, unavailable_reason
from .base import StartupError, open_listener, warn
from .config import add_arguments, from_namespace
from .stats import Stats

EXIT_USAGE = 2


def add_parsers(commands) -> None:
    """Add ``serve`` and ``backends`` to an argparse subparsers object."""
    serve = commands.add_parser("serve", help="run one backend in the foreground", description=SERVE_DESCRIPTION)
    add_serve_arguments(serve)
    backends = commands.add_parser("backends", help="list the backends and whether each can run here")
    backends.set_defaults(run=cmd_backends)


SERVE_DESCRIPTION = "Serve the lab protocol with one concurrency model until SIGTERM/SIGINT."


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("backend", choices=list(BACKENDS), metavar="BACKEND", help="one of: " + ", ".join(BACKENDS))
    add_arguments(parser)
    parser.set_defaults(run=cmd_serve)


def main(argv: list[str] | None = None, prog: str = "python -m conclab.servers") -> int:
    """``python -m conclab.servers BACKEND [options]``: ``conclab serve`` without the rest of the lab."""
    parser = argparse.ArgumentParser(prog=prog, description=SERVE_DESCRIPTION)
    add_serve_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(parser.parse_args(argv or ["--help"]), prog)


def run(args, prog: str) -> int:
    """Run a parsed command: a StartupError is one line on stderr and exit status 2."""
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
    for name, backend in BACKENDS.items():
        reason = unavailable_reason(name)
        status = "available" if reason is None else f"unavailable: {reason}"
        print(f"{name:<{width}}  {backend.summary:<52}  {status}")
    return 0
