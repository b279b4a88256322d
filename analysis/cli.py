"""``conclab report``: the command line of the analysis layer.

``add_parser(subparsers)`` adds the subcommand to the ``conclab`` command (it
sets ``run=`` to a function(args) -> exit status); ``main(argv)`` is
``python -m conclab.analysis``, which takes the same arguments. Exit status:
0 done, 1 an unexpected error, 2 bad usage (no such run), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from . import compare, report
from .results import DEFAULT_RESULTS, LATEST, RunNotFound, load_run

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


DESCRIPTION = ("Write RUN/report.html: first the trade-off table, one row per model, with a decision guide "
               "computed from it (also written as RUN/tradeoff.csv), then a summary, warnings, the machine, the "
               "claims of the article "
               "the lab answers (docs/article.md) vs the "
               "numbers, the performance targets, and per experiment its charts (RUN/charts/*.png and .svg), "
               "a finding computed from the data under each, and a table. Prints each page's path.")
EPILOG = ("examples:\n  conclab report                          # the latest run under results/\n"
          "  conclab report 20260101-120000-all      # a run id under results/, or a path\n"
          "  conclab report --compare RUN_A RUN_B    # side by side, with ratios B / A")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report", help="write results/<run-id>/report.html (charts, tables, findings) for one or more runs",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(run=cmd_report)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="*", metavar="RUN",
                   help="run directories or run ids under --results (default: the latest run)")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="compare two runs (before/after, or two machines): every headline number with B / A; "
                        "writes compare-A-vs-B/report.html beside RUN_B")
    p.add_argument("--results", default=DEFAULT_RESULTS, metavar="DIR",
                   help=f"where run ids are looked up (default: {DEFAULT_RESULTS}/)")
    p.add_argument("--out", metavar="DIR", help="write the page and charts/ here instead (one run or --compare)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conclab.analysis", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=cmd_report)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- report ---------------------------------------------------------------------------------------

def cmd_report(args) -> int:
    try:
        if args.compare:
            if args.runs:
                raise RunNotFound("give either RUN ... or --compare RUN_A RUN_B, not both")
            a, b = (load_run(spec, args.results) for spec in args.compare)
            print(compare.build(a, b, args.out), flush=True)
            return EXIT_OK
        specs = args.runs or [LATEST]
        if args.out and len(specs) > 1:
            raise RunNotFound("--out takes one RUN")
        runs = [load_run(spec, args.results) for spec in specs]
    except RunNotFound as exc:
        print(f"conclab report: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for run in runs:
        print(report.build(run, args.out), flush=True)
    return EXIT_OK
