"""The ``conclab`` command: one subcommand per tool, each defined by the layer that owns it.

This module sits above every layer and only assembles them: ``serve`` and
``backends`` come from ``servers.cli``, ``load`` and ``load-worker`` from ``loadgen.cli``, ``run``
from ``experiments.harness.cli``, ``check`` from ``reliability.cli``, ``report``
from ``analysis.cli`` and ``demo`` from ``conclab.demo``. The server commands
build a parser without the other layers, so a server process never imports
pandas, matplotlib or the load generator.
"""
from __future__ import annotations

import argparse
import sys

from conclab.servers import cli as servers_cli

SERVER_COMMANDS = ("serve", "backends")      # need no analysis stack: a server process stays lean


def build_parser(prog: str = "conclab", tools: bool = True) -> argparse.ArgumentParser:
    """The conclab parser; ``tools=False`` leaves out the commands that import the analysis stack."""
    parser = argparse.ArgumentParser(prog=prog, description="conclab: thread pools vs coroutines, measured.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    servers_cli.add_parsers(commands)
    if tools:
        from conclab import demo
        from conclab.analysis.cli import add_parser as add_report
        from conclab.experiments.harness.cli import add_parser as add_run
        from conclab.loadgen.cli import add_parser as add_load
        from conclab.loadgen.cli import add_worker_parser as add_load_worker
        from conclab.reliability.cli import add_parser as add_check
        add_load(commands)
        add_load_worker(commands)
        add_run(commands)
        add_report(commands)
        demo.add_parser(commands)
        add_check(commands)
    return parser


def main(argv: list[str] | None = None, prog: str = "conclab") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(prog, tools=first not in SERVER_COMMANDS)
    return servers_cli.run(parser.parse_args(argv), prog)
