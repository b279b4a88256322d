"""``conclab run EXPERIMENT``: the command line of the harness.

``add_parser(subparsers)`` adds the ``run`` subcommand to the ``conclab``
command (it sets ``run=cmd_run``); ``main(argv)`` is
``python -m conclab.experiments.harness``, which takes the same arguments as ``conclab run``. Progress goes to stderr (one
line per point); stdout gets one line, the run's directory. Exit status: 0 the
run completed (skipped backends are recorded, not failures), 2 bad usage or the
load generator cannot run, 130 interrupted (SIGINT or SIGTERM: SIGINT too when the run was started with it
ignored, as a script's background job is), 1 an unexpected error.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import traceback

from conclab.servers import VARIANTS, netns, processes, select_variants

from .. import registry
from . import calibrate, loadproc, summary
from .run import Run
from .profiles import PROFILES

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_RESULTS = "results"
PREFLIGHT_TIMEOUT_S = 60.0
DEFAULT_PROFILE = "quick"
HELP_WIDTH = 100


class UsageError(Exception):
    """Bad arguments or an environment that cannot run: one line for the user."""


class Interrupted(BaseException):
    """SIGTERM: unwind like Ctrl-C so every child is stopped."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    only_named = [e.name for e in registry.EXPERIMENTS if not e.in_all]
    parser.add_argument("experiment", metavar="EXPERIMENT",
                        help=f"all ({', '.join(registry.names(in_all=True))}), or one or more of "
                             f"{', '.join(registry.names())} (comma-separated; {', '.join(only_named)} "
                             "only when named)")
    parser.add_argument("--backends", metavar="A,B,...",
                        help="variants to run (default all): " + ", ".join(VARIANTS))
    parser.add_argument("--profile", choices=list(PROFILES), default=DEFAULT_PROFILE,
                        help="quick (about 5 minutes for all: the demo), standard (at most 20 minutes for all, 3 "
                             "rounds: the reference), full (the real sweep), tiny (seconds; tests)")
    parser.add_argument("--repeat", type=int, default=None, metavar="N",
                        help="rounds: measure every point N times, interleaved (round 1 of every variant, then "
                             "round 2, ...); tables keep each, summaries use the median and its interval "
                             "(default: the profile's rounds: " + ", ".join(f"{p.name} {p.rounds}"
                                                                            for p in PROFILES.values()) + ")")
    parser.add_argument("--server-cpus", metavar="LIST", help="CPUs the servers are pinned to (default: the first)")
    parser.add_argument("--loadgen-cpus", metavar="LIST",
                        help="CPUs the load generator (and this harness) use (default: all the others)")
    parser.add_argument("--loadgen-engine", choices=loadproc.ENGINES, default=None,
                        help="the load generator's engine: c (compiled, less CPU per request, so the "
                             "fastest servers are less often capped by their client; closed loops) or python; open "
                             "loops and points c cannot run (hold, several load processes) use python, and the loadgen_engine column says which "
                             "(default: c when a C compiler is available, else python)")
    parser.add_argument("--server-host", metavar="NAME",
                        help="run the servers on another host: a network namespace NAME made for the run (root), "
                             "joined to this one by a veth pair, so the load crosses a real network stack, not "
                             "loopback (docs/scaling.md)")
    parser.add_argument("--results", default=DEFAULT_RESULTS, metavar="DIR",
                        help=f"where run directories go (default: {DEFAULT_RESULTS}/)")
    parser.add_argument("--run-id", metavar="ID", help="name of the run directory (default: time and experiment)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("run", help="run experiments against every backend, write results/<run-id>/",
                                   description="Measure the backends. Writes results/<run-id>/manifest.json and "
                                   "tidy CSV tables (docs/experiments.md).", epilog=experiments_help(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conclab.experiments.harness", description="Same as `conclab run`.",
                                     epilog=experiments_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return cmd_run(parser.parse_args(argv))


def experiments_help() -> str:
    """The experiments, in run order (registry: name, what it shows, what it needs, whether `all` runs it)."""
    size, width = PROFILES[DEFAULT_PROFILE].size, max(len(e.name) for e in registry.EXPERIMENTS)
    lines = ["experiments, in run order:"]
    for e in registry.EXPERIMENTS:
        notes = [f"needs {n}: takes its results when the run has it, else measures its own" for n in e.needs]
        notes += [] if e.in_all else ["not part of all: runs only when named"]
        for i, text in enumerate([e.what.format(size=size), *notes]):
            lines += textwrap.wrap(text, HELP_WIDTH, initial_indent=f"  {e.name if i == 0 else '':<{width}}  ",
                                   subsequent_indent=" " * (width + 4))
    return "\n".join(lines)


# -- argument checks ------------------------------------------------------------------------------

def parse_experiments(spec: str) -> list[str]:
    """The experiments named, in run order (registry.plan: what one needs runs before it).

    ``all`` stands for the experiments in all, alone or beside others (``all,convoy``)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["all"]:
        return registry.names(in_all=True)
    if "all" in names:
        names = [*registry.names(in_all=True), *(n for n in names if n != "all")]
    known = registry.names()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UsageError(f"unknown experiment {(unknown or [spec])[0]!r}: choose all or {', '.join(known)}")
    return registry.plan(names)


def parse_cpus(spec: str, option: str) -> list[int]:
    """'0', '0,2', '0-3' -> sorted CPU numbers, each one this process may use."""
    cpus = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UsageError(f"{option} {spec!r} is not a CPU list like 0 or 0,1 or 0-3")
        first, last = int(match[1]), int(match[2] or match[1])
        cpus.update(range(first, last + 1))
    allowed = os.sched_getaffinity(0)
    if not cpus or not cpus <= allowed:
        raise UsageError(f"{option} {spec}: CPU {min(cpus - allowed or cpus)} is not available "
                         f"(this process may use {sorted(allowed)})")
    return sorted(cpus)


def choose_cpus(args) -> tuple[list[int], list[int]]:
    allowed = sorted(os.sched_getaffinity(0))
    server = parse_cpus(args.server_cpus, "--server-cpus") if args.server_cpus else allowed[:1]
    rest = [c for c in allowed if c not in server] or server
    loadgen = parse_cpus(args.loadgen_cpus, "--loadgen-cpus") if args.loadgen_cpus else rest
    return server, loadgen


def preflight_loadgen() -> None:
    """Fail fast, in one line, if the load generator cannot even show its help."""
    command = loadproc.command()
    try:
        done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=PREFLIGHT_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"load generator {' '.join(command)!r} cannot run: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise UsageError(f"load generator {' '.join(command)!r} cannot run: {last}")


def choose_engine(asked: str | None) -> str:
    """--loadgen-engine, or the default (c when a C compiler is available; else python, with one warning)."""
    engine, why_not_c = loadproc.default_engine()
    if asked == "c" and why_not_c:
        raise UsageError(f"--loadgen-engine c: {why_not_c.split(':')[0]}")
    if asked is None and why_not_c:
        print(f"conclab run: warning: {why_not_c}", file=sys.stderr, flush=True)
    return asked or engine


def rounds(args, profile) -> int:
    """How many interleaved rounds: --repeat if given, else the profile's ``rounds``."""
    return args.repeat if args.repeat is not None else profile.rounds


def new_run_id(results: str, experiments: list[str]) -> str:
    label = "all" if experiments == registry.names(in_all=True) else "+".join(experiments)
    base = time.strftime("%Y%m%d-%H%M%S") + "-" + label
    run_id, n = base, 1
    while os.path.exists(os.path.join(results, run_id)):
        n += 1
        run_id = f"{base}-{n}"
    return run_id


# -- the run --------------------------------------------------------------------------------------

def cmd_run(args) -> int:
    prog = "conclab run"
    try:
        run = prepare(args)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return execute(run, prog)


def prepare(args) -> Run:
    experiments = parse_experiments(args.experiment)
    try:
        variants = select_variants(args.backends)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.repeat is not None and args.repeat < 1:
        raise UsageError("--repeat must be at least 1")
    server_cpus, loadgen_cpus = choose_cpus(args)
    server_host = getattr(args, "server_host", None)
    if server_host is not None:
        if not re.fullmatch(r"[A-Za-z0-9_]{1,32}", server_host):
            raise UsageError(f"--server-host {server_host!r}: use letters, digits and _ only")
        reason = netns.unavailable_reason()
        if reason:
            raise UsageError(f"--server-host: {reason}")
    if any(registry.get(name).loadgen for name in experiments):
        preflight_loadgen()
    loadgen_engine = choose_engine(getattr(args, "loadgen_engine", None))
    profile = PROFILES[args.profile]
    repeat = rounds(args, profile)
    run_id = args.run_id or new_run_id(args.results, experiments)
    if args.run_id and os.path.exists(os.path.join(args.results, run_id)):
        raise UsageError(f"--run-id {run_id}: {os.path.join(args.results, run_id)} already exists")
    params = {"argv": sys.argv, "experiments": experiments, "backends": [v.name for v in variants],
              "backends_option": args.backends,
              "profile": profile.name, "repeat": repeat, "server_cpus": server_cpus,
              "loadgen_cpus": loadgen_cpus, "results": args.results, "server_host": server_host,
              "loadgen_engine": loadgen_engine}
    return Run(run_id=run_id, results_dir=args.results, experiments=experiments, variants=variants,
               profile=profile, repeat=repeat, server_cpus=server_cpus, loadgen_cpus=loadgen_cpus,
               params=params)


def execute(run: Run, prog: str) -> int:
    """Run every experiment; whatever happens, stop the children and write summaries and the manifest."""
    status, code = "complete", EXIT_OK
    own_cpus = os.sched_getaffinity(0)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)   # even when started with it ignored
                                                                              # (a script's background job)
    run.progress(f"{prog}: {', '.join(run.experiments)} (profile {run.profile.name}, {run.repeat} interleaved "
                 f"round(s)) on "
                 f"{len(run.variants)} variants; server CPUs {run.server_cpus}, load generator CPUs "
                 f"{run.loadgen_cpus} -> {run.dir}")
    hosts = contextlib.ExitStack()
    try:
        if run.params.get("server_host"):
            run.server_host, here = hosts.enter_context(netns.linked_host(run.params["server_host"]))
            run.manifest["server_host"] = {"namespace": run.server_host.namespace,
                                           "address": run.server_host.address, "loadgen_address": here}
            run.progress(f"{prog}: servers on {run.server_host.address} (namespace {run.server_host.namespace}), "
                         f"load from {here}")
        os.sched_setaffinity(0, run.loadgen_cpus)        # the sampler stays off the server's CPUs
        calibrate.start(run)                              # how quiet the machine is (timers, latency floor)
        run.manifest["needs"] = registry.sources(run.experiments)
        for name in run.experiments:
            experiment = registry.get(name)
            for table in experiment.tables:
                run.table(table.name)
            started = time.monotonic()
            experiment.load().run(run)
            run.manifest.setdefault("experiment_s", {})[name] = round(time.monotonic() - started, 1)
            run.save_manifest()
    except (KeyboardInterrupt, Interrupted):
        status, code = "interrupted", EXIT_INTERRUPTED
        print(f"{prog}: interrupted; stopping servers and load generators", file=sys.stderr)
    except Exception as exc:                              # one line here, the traceback in raw/error.log
        status, code = "error", EXIT_ERROR
        with open(os.path.join(run.raw_dir, "error.log"), "w", encoding="utf-8") as log:
            traceback.print_exc(file=log)
        print(f"{prog}: error: {type(exc).__name__}: {exc} (traceback: {run.raw_dir}/error.log)", file=sys.stderr)
    finally:
        processes.stop_all()
        hosts.close()                                     # the namespace goes after every server in it
        if calibrate.end(run, status):                    # every child stopped: the machine as the run leaves it
            status, code = "interrupted", EXIT_INTERRUPTED    # (a Ctrl-C in its last seconds still interrupts)
            print(f"{prog}: interrupted while measuring the machine at the end", file=sys.stderr)
        os.sched_setaffinity(0, own_cpus)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        write_summaries(run)
        run.finish(status)
    run.progress(f"{prog}: {status} in {run.elapsed():.0f} s; {len(run.manifest['skipped'])} skipped; {run.dir}")
    print(run.dir, flush=True)
    return code


def write_summaries(run: Run) -> None:
    rows = {name: writer.rows for name, writer in run.tables.items()}
    summary_rows = summary.summarize(rows)
    for row in summary_rows:
        run.write("summary", row)
    for row in summary.targets(summary_rows, run.profile.reference_conns, rows.get("skipped", [])):
        run.write("targets", row)


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)
