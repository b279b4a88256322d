"""``conclab serve`` and ``conclab backends``: the servers' own command line.

``add_parsers(subparsers)`` adds both subcommands (the ``conclab`` command
builds its parser from each layer's ``add_parser(s)``); ``main`` is
``python -m conclab.servers BACKEND ...``, the same as ``conclab serve``. This
module imports nothing above the servers layer, so a server process stays lean:
no pandas, no matplotlib, no load generator.

``cmd_serve`` picks how to run: ``--python PATH`` first (this process becomes
``PATH -m conclab.servers BACKEND`` with the same options but that one), then
the go backend (its own program), ``--procs N`` over 1 (servers/prefork.py), and
otherwise the one process this has always been, in ``serve_here``. The Python
backends' own options are refused for go in one line, and ``--cpu-offload``
for every backend but the event loops.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from . import BACKENDS, load, metrics, unavailable_reason
from .base import StartupError, final_counters, open_listener, process_facts, warn
from .config import OFFLOAD_BACKENDS, ServerConfig, add_arguments, from_namespace
from .stats import Stats

EXIT_USAGE = 2
PROBE_TIMEOUT_S = 60           # --python: how long the interpreter may take to import the servers
GO_REFUSES = {"--procs": "--procs is for Python backends; go uses GOMAXPROCS (--gomaxprocs)",
              "--switch-interval": "--switch-interval is for Python backends (the GIL's); go has no GIL",
              "--python": "--python is for Python backends; go is compiled"}
CPU_OFFLOAD_REFUSED = "--cpu-offload is for event-loop backends only (" + ", ".join(OFFLOAD_BACKENDS) + ")"


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
    if config.cpu_offload != "none" and args.backend not in OFFLOAD_BACKENDS:
        raise StartupError(CPU_OFFLOAD_REFUSED)
    if args.backend == "go" and config.python_only():
        raise StartupError(GO_REFUSES[config.python_only()[0]])
    if config.python is not None:
        return reexec(config.python, args.backend, config)
    reason = unavailable_reason(args.backend)
    if reason:
        raise StartupError(f"backend {args.backend!r} cannot run here: {reason}")
    if not config.loopback:
        warn(f"binding {config.host}: this server is reachable from other machines")
    if config.fault != "none":
        warn(f"FAULT '{config.fault}' IS ON: a safeguard is deliberately disabled (teaching mode)")
    if args.backend == "go":                        # its own program: exec it, it prints the same lines
        return load("go")(config)
    if config.switch_interval is not None:
        sys.setswitchinterval(config.switch_interval)
    if config.procs > 1:
        from . import prefork
        return prefork.serve(args.backend, config)
    return serve_here(args.backend, config)


def serve_here(backend: str, config: ServerConfig) -> int:
    """One process serves: the listener, the metrics thread, the backend, the final line."""
    stats = Stats(backend, config.connection_cap)
    stats.facts = {**process_facts(config), "cpu_offload": config.cpu_offload}
    listener = open_listener(config)
    exporter = None
    if config.metrics_port is not None:
        exporter = metrics.start(config.host, config.metrics_port, stats, listener.getsockname()[1])
    load(backend)(listener, config, stats)
    if exporter is not None:
        exporter.shutdown()
    print(json.dumps(final_counters(stats)), flush=True)
    return 0


def reexec(python: str, backend: str, config: ServerConfig) -> int:
    """Become ``PYTHON -m conclab.servers BACKEND`` with these options minus --python (never returns on
    success); StartupError in one line if PYTHON is no executable or cannot import the servers. A bare
    name (``python3.13``) is looked up on PATH."""
    executable = shutil.which(python)
    if executable is None or not os.path.isfile(executable):
        raise StartupError(f"--python {python}: not an executable file")
    try:
        probe = subprocess.run([executable, "-c", "import conclab.servers.cli"], capture_output=True, text=True,
                               timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StartupError(f"--python {python} did not run: {exc}") from None
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
        raise StartupError(f"--python {python} cannot import conclab.servers: {last}")
    options = config.argv()
    at = options.index("--python")
    del options[at:at + 2]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(executable, [executable, "-m", "conclab.servers", backend, *options])
    return 1                                        # not reached


def cmd_backends(args) -> int:
    width = max(map(len, BACKENDS))
    for name, backend in BACKENDS.items():
        reason = unavailable_reason(name)
        status = "available" if reason is None else f"unavailable: {reason}"
        print(f"{name:<{width}}  {backend.summary:<52}  {status}")
    return 0
