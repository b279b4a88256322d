"""``conclab check``: run the reliability scenarios against live servers, print and record the verdicts.

``add_parser(subparsers)`` adds the ``check`` subcommand (servers/cli.py does,
as it does ``load``). For each variant it prints a table (scenario, result,
figure) as the scenarios finish, and writes ``results/<run-id>/check.csv``
(one row per variant and scenario) and ``check.json`` (the same, with the
numbers behind each figure, the sizes used and where it ran).
Exit status: 0 every scenario passed or failed only by a documented limit of
its model, 1 a real failure, 2 bad usage, 130 interrupted (what ran is kept).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import textwrap
import time

from conclab.servers import VARIANTS

from .scenarios import CI, FULL, SCENARIOS, run

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# The connection-dispatch pool's workers for the scenarios. Its default (ThreadPoolExecutor's,
# min(32, CPUs + 4)) would make every scenario that holds more connections than CPUs + 4 at once
# (shutdown's 100 closed-loop connections, the emfile crowd, the slowloris newcomer) measure
# head-of-line blocking instead of what it is about; with 32 only slowloris does, and that is its
# documented limit (docs/reliability.md). Every other variant runs with the table's options.
CHECK_POOL_WORKERS = 32
CSV_COLUMNS = ("run_id", "variant", "backend", "scenario", "status", "passed", "figure", "failures", "limit",
               "seconds", "metrics")

INTRO = """\
Run the reliability scenarios against live servers of each backend and say, per
scenario, whether the server kept serving and lost nothing, with the figure that
shows it. Sizes are the full ones (20,000 churn cycles, 2,000 resets, 400 slow
clients, ...); --quick uses the test suite's. About 40 s per variant at full size."""


def first_sentence(doc: str | None) -> str:
    """A docstring's first sentence, on one line."""
    text = " ".join((doc or "").split())
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


def describe_scenarios(scenarios=SCENARIOS) -> str:
    """--help's list of scenarios: each name and the first sentence of its docstring (the one description)."""
    lines, width = [], max(map(len, scenarios), default=0) + 4
    for name, check in scenarios.items():
        lines += textwrap.wrap(first_sentence(check.__doc__), 100, initial_indent=f"  {name:<{width - 2}}",
                               subsequent_indent=" " * width)
    return "\n".join(lines)


DESCRIPTION = f"{INTRO}\n\nscenarios:\n{describe_scenarios()}\n\nSee docs/reliability.md."


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("check", help="run the reliability scenarios against every backend",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="all", metavar="A,B,...",
                        help="variants to check: all, or a comma list of " + ", ".join(VARIANTS) + " (default: all)")
    parser.add_argument("--scenarios", default="all", metavar="S,T,...",
                        help="scenarios to run: all, or a comma list of the names above (default: all)")
    parser.add_argument("--quick", action="store_true", help="the test suite's smaller sizes (about 25 s per variant)")
    parser.add_argument("--results", default="results", metavar="DIR", help="parent of the run directory (default: results)")
    parser.add_argument("--run-id", default=None, metavar="ID",
                        help="the run directory's name (default: YYYYmmdd-HHMMSS-check); an existing run directory "
                             "(e.g. an experiments run) gets check.csv and check.json added")
    parser.set_defaults(run=cmd_check)
    return parser


def pick(text: str, known, what: str) -> list[str]:
    if text == "all":
        return list(known)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"unknown {what} {', '.join(unknown) or text!r}: choose from {', '.join(known)}")
    return names


def cmd_check(args) -> int:
    try:
        names = pick(args.backends, VARIANTS, "backend")
        scenarios = pick(args.scenarios, SCENARIOS, "scenario")
    except ValueError as exc:
        print(f"conclab check: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S") + "-check"
    run_dir = os.path.join(args.results, run_id)
    if os.path.exists(os.path.join(run_dir, "check.csv")):
        print(f"conclab check: error: {run_dir} already has a check.csv", file=sys.stderr)
        return EXIT_USAGE
    scale = CI if args.quick else FULL
    record = {"run_id": run_id, "kind": "check", "status": "running", "started_at": now(), "finished_at": None,
              "scale": dataclasses.asdict(scale), "variants": names, "scenarios": scenarios,
              "skipped": [], "host": host_info(), "git": git_info(), "results": []}
    outcomes = []
    status = EXIT_OK
    try:
        for name in names:
            variant = VARIANTS[name]
            backend, options = variant.backend, check_options(variant)
            print(f"\n== {name} ({' '.join(['conclab serve', backend, *options])}) ==", flush=True)
            reason = variant.unavailable()
            if reason:
                print(f"skipped: {reason}", flush=True)
                record["skipped"].append({"variant": name, "reason": reason})
                continue
            print(f"{'scenario':<15} {'result':<6} {'time':>6}  figure", flush=True)
            for scenario in scenarios:
                outcome = run(scenario, backend, options, scale)
                outcomes.append((backend, outcome))
                print(f"{scenario:<15} {outcome.status:<6} {outcome.seconds:5.1f}s  {outcome.figure}", flush=True)
                for failure in outcome.failures:
                    print(f"{'':<15} {'':<6} {'':>6}  ! {failure}", flush=True)
                if outcome.limit:
                    print(f"{'':<15} {'':<6} {'':>6}  (a limit of the model: {outcome.limit})", flush=True)
        record["status"] = "completed"
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        status = EXIT_INTERRUPTED
    record["finished_at"] = now()
    record["host"]["loadavg_at_end"] = os.getloadavg()
    record["results"] = [{"backend": backend, **result_of(o)} for backend, o in outcomes]
    record["summary"] = summary(outcomes)
    write(run_dir, run_id, outcomes, record)
    print_summary(record["summary"])
    print(run_dir, flush=True)
    if status == EXIT_OK and any(o.status == "FAIL" for _, o in outcomes):
        status = EXIT_FAILED
    return status


def check_options(variant) -> list[str]:
    """The variant's options from the table, plus the pool size the scenarios need (CHECK_POOL_WORKERS)."""
    options = list(variant.options)
    if variant.name == "threadpool":
        options += ["--workers", str(CHECK_POOL_WORKERS)]
    return options


def result_of(outcome) -> dict:
    return {"variant": outcome.variant, "scenario": outcome.scenario, "status": outcome.status,
            "passed": outcome.passed, "figure": outcome.figure, "metrics": outcome.metrics,
            "failures": outcome.failures, "limit": outcome.limit, "seconds": round(outcome.seconds, 2)}


def summary(outcomes) -> dict:
    table: dict = {}
    for _, outcome in outcomes:
        counts = table.setdefault(outcome.variant, {"pass": 0, "limit": 0, "FAIL": 0})
        counts[outcome.status] += 1
    return table


def print_summary(table: dict) -> None:
    if not table:
        return
    print("\n== summary ==", flush=True)
    for variant, counts in table.items():
        print(f"{variant:<20} {counts['pass']} passed, {counts['limit']} model limits, {counts['FAIL']} failed",
              flush=True)


def write(run_dir: str, run_id: str, outcomes, record: dict) -> None:
    """check.csv (tidy, one row per variant and scenario) and check.json, each written atomically."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "check.csv")
    with open(path + ".tmp", "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for backend, o in outcomes:
            writer.writerow({"run_id": run_id, "variant": o.variant, "backend": backend, "scenario": o.scenario,
                             "status": o.status, "passed": o.passed, "figure": o.figure,
                             "failures": "; ".join(o.failures), "limit": o.limit or "",
                             "seconds": round(o.seconds, 2), "metrics": json.dumps(o.metrics, sort_keys=True)})
    os.replace(path + ".tmp", path)
    path = os.path.join(run_dir, "check.json")
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(record, file, indent=2, default=str)
        file.write("\n")
    os.replace(path + ".tmp", path)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def host_info() -> dict:
    uname = platform.uname()
    go = shutil.which("go")
    return {"hostname": uname.node, "kernel": uname.release, "machine": uname.machine, "cpu_count": os.cpu_count(),
            "cpu_affinity": sorted(os.sched_getaffinity(0)), "python": platform.python_version(),
            "go": command(go, "version") if go else None, "loadavg_at_start": os.getloadavg(),
            "rlimit_nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE))}


def git_info() -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    return {"commit": command("git", "rev-parse", "HEAD", cwd=here),
            "dirty": bool(command("git", "status", "--porcelain", "--untracked-files=no", cwd=here))}


def command(*args: str, cwd: str | None = None) -> str | None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, cwd=cwd, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
