"""``conclab demo``: the quick lab in one command, ending with the report's path.

It runs ``conclab run all`` in a subprocess (its progress goes straight to
stderr), then ``conclab report`` on the run it wrote. It sits above both the
harness and the analysis layer, so neither has to know the other.
Exit status: the harness's (0 when every experiment completed; a report is
still written when the run itself failed).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from conclab.analysis import report
from conclab.analysis.results import DEFAULT_RESULTS, load_run
from conclab.experiments.harness.profiles import PROFILES

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130
DEMO_PROFILE = "quick"
DEMO_BUDGET_S = 300                # what the README promises for the demo on a 2-core machine
INTERRUPT_GRACE_S = 60.0           # after Ctrl-C, how long the harness gets to stop servers and save


def add_parser(subparsers) -> argparse.ArgumentParser:
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


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def harness_command(args) -> list:
    cmd = [sys.executable, "-m", "conclab.experiments.harness", "all", "--profile", args.profile, "--results", args.results]
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
