"""``conclab check``: run the reliability scenarios against live servers, print and record the verdicts.

``add_parser(subparsers)`` adds the ``check`` subcommand (servers/cli.py does,
as it does ``load``). For each variant it prints a table (scenario, result,
figure) as the scenarios finish, and writes ``results/<run-id>/check.csv``
(one row per variant and scenario) and ``check.json`` (the same, with the
numbers behind each figure, the sizes used and where it ran).
``--soak SECONDS`` and ``--overload`` / ``--overload-seconds S`` run the soak
(reliability/soak.py) and the overload runs (reliability/overload.py) instead of
the scenarios (add ``--scenarios`` to run both), with progress every few seconds
and a table at the end; they write ``soak.csv`` (the time series),
``soak_summary.csv`` (one row per variant and criterion: value, bound, verdict
``pass``, ``FAIL`` or ``unresolved``, the reason of a FAIL or of an unresolved one)
and ``overload.csv`` (one row per variant and factor). An unresolved verdict (the
run could not decide: too short, the machine busy) is printed, not a failure.
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

from . import overload as overloadmod
from . import soak as soakmod
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
    parser.add_argument("--scenarios", default=None, metavar="S,T,...",
                        help="scenarios to run: all, or a comma list of the names above (default: all, or none "
                             "with --soak or --overload)")
    parser.add_argument("--soak", type=positive_seconds, default=None, metavar="SECONDS",
                        help="soak each variant this long: 70%% of its measured capacity in open loop, 5%% of "
                             "connections replaced a second, a fault mix; sampled every second "
                             f"(the test suite: {soakmod.CI_SECONDS:g} s, CONCLAB_FULL=1: {soakmod.FULL_SECONDS:g} s)")
    parser.add_argument("--overload", action="store_true",
                        help=f"offer each variant {' and '.join(f'{f}x' for f in overloadmod.FACTORS)} its capacity "
                             f"for {overloadmod.FULL_SECONDS:g} s each ({overloadmod.CI_SECONDS:g} s with --quick), "
                             "then measure recovery")
    parser.add_argument("--overload-seconds", type=positive_seconds, default=None, metavar="S",
                        help="--overload, each factor offered for S seconds")
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


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def cmd_check(args) -> int:
    overload_s = args.overload_seconds or ((overloadmod.CI_SECONDS if args.quick else overloadmod.FULL_SECONDS)
                                           if args.overload else None)
    extras = args.soak is not None or overload_s is not None
    try:
        names = pick(args.backends, VARIANTS, "backend")
        scenarios = pick(args.scenarios or "all", SCENARIOS, "scenario") if args.scenarios or not extras else []
    except ValueError as exc:
        print(f"conclab check: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S") + "-check"
    run_dir = os.path.join(args.results, run_id)
    planned = ([CHECK_CSV] if scenarios else []) + ([SOAK_CSV] if args.soak is not None else []) + \
        ([OVERLOAD_CSV] if overload_s is not None else [])
    taken = [name for name in planned if os.path.exists(os.path.join(run_dir, name))]
    if taken:
        print(f"conclab check: error: {run_dir} already has a {taken[0]}", file=sys.stderr)
        return EXIT_USAGE
    if not scenarios:
        return run_extras(args, names, run_dir, args.soak, overload_s)
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
    if status == EXIT_OK and any(o.status == "FAIL" for _, o in outcomes):
        status = EXIT_FAILED
    if extras and status != EXIT_INTERRUPTED:
        status = max(status, run_extras(args, names, run_dir, args.soak, overload_s))
    else:
        print(run_dir, flush=True)
    return status


# -- soak and overload ---------------------------------------------------------------------------
CHECK_CSV, SOAK_CSV, SOAK_SUMMARY_CSV, OVERLOAD_CSV = "check.csv", "soak.csv", "soak_summary.csv", "overload.csv"
SOAK_COLUMNS = ("variant", "t_s", "rss_kib", "fds", "threads", "close_wait", "replies", "p99_us", "sent", "late",
                "loadgen_cpu_percent", "loadgen_saturated")
SOAK_SUMMARY_COLUMNS = ("variant", "capacity_rps", "capacity_loadgen_saturated", "rate", "conns", "seconds",
                        "loadgen_saturated_seconds", "floor_p99_us", "others_cpu_pct", "machine_busy", "criterion",
                        "value", "bound", "verdict", "reason")


def placement() -> tuple[list[int] | None, int | None]:
    """(server CPUs, load generator CPU): CPU 0 and CPU 1 as everywhere in the lab, when there are two."""
    cpus = sorted(os.sched_getaffinity(0))
    return ([cpus[0]], cpus[1]) if len(cpus) >= 2 else (None, None)


def say(text: str) -> None:
    """A progress line of a soak or overload run, under its heading."""
    print(f"  {text}", flush=True)


def run_extras(args, names: list[str], run_dir: str, soak_s: float | None, overload_s: float | None) -> int:
    """The soak and/or overload runs for each variant, written as they finish; a table at the end."""
    server_cpus, loadgen_cpu = placement()
    soaks, overloads, status = [], [], EXIT_OK
    try:
        for name in names:
            variant = VARIANTS[name]
            reason = variant.unavailable()
            if reason:
                print(f"\n== {name}: skipped: {reason} ==", flush=True)
                continue
            options = check_options(variant)
            if soak_s is not None:
                print(f"\n== soak {name}, {soak_s:g} s ==", flush=True)
                soaks.append(soakmod.soak(variant.backend, options, soakmod.SoakSize.for_seconds(soak_s),
                                          server_cpus=server_cpus, loadgen_cpu=loadgen_cpu, progress=say))
                write_soak(run_dir, soaks)
            if overload_s is not None:
                print(f"\n== overload {name}, {overload_s:g} s per factor ==", flush=True)
                overloads += overloadmod.overload(variant.backend, options, overload_s, server_cpus=server_cpus,
                                                  loadgen_cpu=loadgen_cpu, progress=say)
                write_rows(os.path.join(run_dir, OVERLOAD_CSV), overloadmod.CSV_COLUMNS,
                           [row.as_csv() for row in overloads])
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    print_extras(soaks, overloads)
    print(run_dir, flush=True)
    failed = any(not s.passed for s in soaks) or any(r.failures for r in overloads)
    return status or (EXIT_FAILED if failed else EXIT_OK)


def soak_summary_rows(result) -> list[dict]:
    head = {"variant": result.variant, "capacity_rps": result.capacity_rps,
            "capacity_loadgen_saturated": result.capacity_loadgen_saturated, "rate": result.rate,
            "conns": result.size.conns, "seconds": result.size.seconds,
            "loadgen_saturated_seconds": result.totals.get("loadgen_saturated_seconds"),
            "floor_p99_us": result.floor_p99_us, "others_cpu_pct": result.others_cpu_pct,
            "machine_busy": result.machine_busy}
    rows = [{**head, "criterion": v.criterion, "value": v.value, "bound": v.bound,
             "verdict": v.state, "reason": v.reason} for v in result.verdicts]
    if result.error:
        rows.append({**head, "criterion": "run", "value": "", "bound": "", "verdict": "FAIL", "reason": result.error})
    return rows


def write_soak(run_dir: str, results: list) -> None:
    write_rows(os.path.join(run_dir, SOAK_CSV), SOAK_COLUMNS,
               [{"variant": r.variant, **{k: s[k] for k in SOAK_COLUMNS if k != "variant"}}
                for r in results for s in r.samples])
    write_rows(os.path.join(run_dir, SOAK_SUMMARY_CSV), SOAK_SUMMARY_COLUMNS,
               [row for r in results for row in soak_summary_rows(r)])


def write_rows(path: str, columns, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def print_extras(soaks: list, overloads: list) -> None:
    if soaks:
        print("\n== soak ==", flush=True)
        print(f"{'variant':<20} {'criterion':<13} {'verdict':<10} value", flush=True)
        for result in soaks:
            for row in soak_summary_rows(result):
                print(f"{row['variant']:<20} {row['criterion']:<13} {row['verdict']:<10} {row['value']}", flush=True)
                if row["reason"]:
                    print(f"{'':<45} {'!' if row['verdict'] == soakmod.FAIL else '?'} {row['reason']}", flush=True)
            print(f"{result.variant:<20} {'machine':<13} {'busy' if result.machine_busy else 'quiet':<10} "
                  f"latency floor p99 {result.floor_p99_us} us, other processes {result.others_cpu_pct} % of a CPU",
                  flush=True)
    if overloads:
        print("\n== overload ==", flush=True)
        print(f"{'variant':<20} {'x':>2} {'offered':>9} {'served':>9} {'p99 ms':>9} {'RSS peak':>9} {'recovery':>8}  "
              f"{'verdict':<10} errors", flush=True)
        for r in overloads:
            p99 = "-" if r.p99_us is None else f"{r.p99_us / 1000:.1f}"
            recovery = "never" if r.recovery_s is None else f"{r.recovery_s:g} s"
            print(f"{r.variant:<20} {r.factor:>2} {r.offered_rps:>9,.0f} {r.served_rps:>9,.0f} {p99:>9} "
                  f"{r.rss_peak_mib:>7.1f} M {recovery:>8}  {r.status:<10} {r.errors or '-'}"
                  f"{'  (load generator saturated)' if r.loadgen_saturated else ''}", flush=True)
            for failure in r.failures:
                print(f"{'':<22} ! {failure}", flush=True)
            for reason in r.unresolved:
                print(f"{'':<22} ? {reason}", flush=True)


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
