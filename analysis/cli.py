"""``conclab report`` and ``conclab demo``: the command line of the analysis layer.

``add_parsers(subparsers)`` adds both subcommands to the ``conclab`` command
(each sets ``run=`` to a function(args) -> exit status); ``main(argv)`` is
``python -m analysis``, which takes the same subcommands. Exit status: 0 done,
1 an unexpected error, 2 bad usage (no such run), 130 interrupted; ``demo``
passes on the harness's status when the run itself failed but a report could
still be written.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from experiments.profiles import PROFILES

from . import compare, report
from .results import DEFAULT_RESULTS, LATEST, RunNotFound, load_run

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEMO_PROFILE = "quick"
DEMO_BUDGET_S = 300                # what the README promises for the demo on a 2-core machine
INTERRUPT_GRACE_S = 60.0           # after Ctrl-C, how long the harness gets to stop servers and save


def add_parsers(subparsers) -> None:
    """Add ``report`` and ``demo`` to an argparse subparsers object (the ``conclab`` command's)."""
    add_report_parser(subparsers)
    add_demo_parser(subparsers)


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report", help="write results/<run-id>/report.html (charts, tables, findings) for one or more runs",
        description="Write RUN/report.html: a summary, warnings, the machine, the seed article's claims vs the "
                    "numbers, the performance targets, and per experiment its charts (RUN/charts/*.png and .svg), "
                    "a finding computed from the data under each, and a table. Prints each page's path.",
        epilog="examples:\n  conclab report                          # the latest run under results/\n"
               "  conclab report 20260101-120000-all      # a run id under results/, or a path\n"
               "  conclab report --compare RUN_A RUN_B    # side by side, with ratios B / A",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN",
                   help="run directories or run ids under --results (default: the latest run)")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="compare two runs (before/after, or two machines): every headline number with B / A; "
                        "writes compare-A-vs-B/report.html beside RUN_B")
    p.add_argument("--results", default=DEFAULT_RESULTS, metavar="DIR",
                   help=f"where run ids are looked up (default: {DEFAULT_RESULTS}/)")
    p.add_argument("--out", metavar="DIR", help="write the page and charts/ here instead (one run or --compare)")
    p.set_defaults(run=cmd_report)
    return p


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="the quick lab: measure every available backend, write the report, print its path",
        description=f"Run `conclab run all --profile {DEMO_PROFILE}` (every experiment, every backend that can "
                    "run here; the others are listed as skipped), then `conclab report` on it. Progress goes to "
                    "stderr; the last line on stdout is the report's path.")
    p.add_argument("--profile", default=DEMO_PROFILE, choices=list(PROFILES),
                   help=f"experiments profile (default {DEMO_PROFILE}: about 5 minutes; tiny: seconds)")
    p.add_argument("--backends", metavar="A,B,...", help="only these variants (default: all)")
    p.add_argument("--results", default=DEFAULT_RESULTS, metavar="DIR",
                   help=f"parent of the run directory (default: {DEFAULT_RESULTS}/)")
    p.set_defaults(run=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description="conclab's report and demo commands.")
    add_parsers(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
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


# -- demo -----------------------------------------------------------------------------------------

def harness_command(args) -> list:
    cmd = [sys.executable, "-m", "experiments", "all", "--profile", args.profile, "--results", args.results]
    return cmd + (["--backends", args.backends] if args.backends else [])


def run_harness(cmd: list) -> tuple[int, str | None]:
    """Run the experiments (their progress goes straight to stderr); (exit status, run directory or None)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate()
    except KeyboardInterrupt:                 # the harness got the SIGINT too: let it stop servers and save
        progress("conclab demo: interrupted; waiting for the harness to stop its servers")
        out, _ = proc.communicate(timeout=INTERRUPT_GRACE_S)
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return proc.returncode, (lines[-1] if lines else None)


def cmd_demo(args) -> int:
    t0 = time.monotonic()
    progress(f"conclab demo: 1/2 measuring every available backend (profile {args.profile}; "
             f"the quick profile takes about {DEMO_BUDGET_S // 60} minutes)")
    status, run_dir = run_harness(harness_command(args))
    if run_dir is None:
        progress(f"conclab demo: the experiments wrote no run (exit status {status}); nothing to report")
        return status or EXIT_ERROR
    progress(f"conclab demo: 2/2 writing the report of {run_dir}")
    path = report.build(load_run(run_dir))
    elapsed = time.monotonic() - t0
    over = f" (over the {DEMO_BUDGET_S} s budget)" if elapsed > DEMO_BUDGET_S else ""
    progress(f"conclab demo: done in {elapsed:.0f} s{over}; open the report in a browser:")
    print(path, flush=True)
    return status
