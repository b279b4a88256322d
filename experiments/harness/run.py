"""The run: its directory, tables, manifest, progress lines, and the measuring of one point.

A ``Run`` owns results/<run-id>/. Experiments ask it for servers
(``run.serve(...)``: a pinned server with a sampler, always stopped), measure
points with ``run.measure(...)`` (one load generator run plus the server's CPU,
context-switch and request deltas over its measured window), write rows with ``run.write``,
and report what they could not do with ``run.skip`` (skipped.csv: never silent).
``run.each_variant`` runs an experiment's body in interleaved rounds (every
variant's round 1, then every variant's round 2, ...). With ``--server-host``
the servers run on another host (a network namespace joined to this one by a
veth pair, ``servers.netns.linked_host``) and the load crosses a real network
stack instead of loopback; nothing else changes (pinning, /proc, STATS work
across it). The samples' TCP-state columns then stay empty: they are read in
this host's namespace, and the server's sockets are in the other.

The CPU window: the load generator announces on stderr, as it starts, the planned
start and end of its measured window on CLOCK_MONOTONIC (the clock of
``time.monotonic()`` in every process). The harness sleeps until those instants
and reads the server's /proc counters (CPU user/sys, context switches of every
thread) then, so ``server_cpu_percent`` = CPU over the window / the window's wall
time, and per-request costs are the window's CPU and switches over the requests
the generator counted in the window: the generator's start-up, connecting and
warm-up are in none of them. The reads land within a few milliseconds of the
instants (a sleeping thread's wake-up), and both sides of the ratio use the
instants actually read. A generator that does not announce its window is measured
around its whole run, and its CPU percentage is CPU per request x the window's
throughput (``server_deltas``).

Validity gates the harness adds to the generator's (harness.loadproc.validity):
during the warm-up it asks the server (``connections_active``) whether it has
accepted every connection; if it reports only K of N the point is invalid,
"server had accepted only K of N connections" (``ConnectionsCheck``).

The server's own counters (connections_active, connections_total,
requests_total) are read in one place, ``CounterReader``: over STATS, or, for a
server of several processes (``--procs N``), from the /metrics endpoint of its
parent. STATS reaches the one worker its connection lands on and answers with
that worker's counters alone; the parent sums every worker's. So the harness
starts every such server with ``--metrics-port`` on a free port
(``with_metrics_port``), and its rows are checked and counted like any other.
"""
from __future__ import annotations

import contextlib
import http.client
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import psutil
from prometheus_client.parser import text_string_to_metric_families

from . import loadproc, manifest
from .sampler import Probe, Sampler
from conclab.servers.launcher import STATS_TIMEOUT_S, ServerProcess, ServerStartError, free_port, log_stem
from .tables import COLUMNS, TableWriter

RAW_DIR = "raw"
STATS_RETRIES = 2
WINDOW_POLL_S = 0.005          # how often the harness looks for the generator's window line
SLEEP_CHUNK_S = 0.1            # waiting for a window instant, how often it checks the generator still runs
STATS_CHECK_TIMEOUT_S = 1.0    # the connections check: counters unanswered this long are "not known"
STATS_CHECK_GAP_S = 0.02       # ...and asks again this often until the window starts
SERVER_STOP_GRACE_S = 10.0     # a server's drain after SIGTERM, then SIGKILL
HELD_STOP_GRACE_S = 1.0        # the same after holding thousands of idle connections (memory, c10k)


class Run:
    def __init__(self, *, run_id: str, results_dir: str, experiments: list, variants: list, profile,
                 repeat: int, server_cpus: list, loadgen_cpus: list, params: dict) -> None:
        self.id = run_id
        self.dir = os.path.join(results_dir, run_id)
        self.raw_dir = os.path.join(self.dir, RAW_DIR)
        os.makedirs(self.raw_dir, exist_ok=True)
        self.experiments = experiments
        self.variants = variants
        self.profile = profile
        self.repeat = repeat
        self.server_cpus = server_cpus
        self.loadgen_cpus = loadgen_cpus
        self.all_cpus = sorted(os.sched_getaffinity(0) | set(server_cpus) | set(loadgen_cpus))
        self.params = params
        self.loadgen_engine = params.get("loadgen_engine")   # "c" or "python" (loadproc.engine_for per point)
        self.server_host = None            # --server-host: a servers.netns.Host the servers run on (cli.execute)
        self.t0 = time.monotonic()
        self.tables: dict = {}
        for name in ("skipped", "samples", "calibration"):
            self.table(name)
        self.manifest = {"run_id": run_id, "status": "running", "start": manifest.now(), "end": None,
                         "parameters": params, "profile": profile.as_dict(), "host": manifest.host_info(),
                         "git": manifest.git_info(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "affinity": {"server_cpus": server_cpus, "loadgen_cpus": loadgen_cpus,
                                      "harness_cpus": loadgen_cpus, "available_cpus": self.all_cpus},
                         "loadgen_command": loadproc.command(), "loadgen_engine": self.loadgen_engine,
                         "variants": [v.__dict__ for v in variants],
                         "experiments": experiments, "skipped": [], "tables": {}}
        self.save_manifest()

    # -- files -------------------------------------------------------------------------------

    def table(self, name: str) -> TableWriter:
        if name not in self.tables:
            self.tables[name] = TableWriter(os.path.join(self.dir, name + ".csv"), COLUMNS[name])
        return self.tables[name]

    def write(self, table: str, row: dict) -> None:
        self.table(table).write({"run_id": self.id, **row})

    def skip(self, experiment: str, variant, reason: str, point: str = "") -> None:
        """Record (and show) a backend or a point that could not be measured, with the reason."""
        backend, name = (variant.backend, variant.name) if variant is not None else ("", "")
        self.write("skipped", {"experiment": experiment, "backend": backend, "variant": name, "point": point,
                               "reason": reason})
        self.manifest["skipped"].append({"experiment": experiment, "variant": name, "point": point, "reason": reason})
        self.progress(f"[{experiment}] {name or '-'} {point} SKIPPED: {reason}".replace("  ", " "))

    def save_manifest(self) -> None:
        self.manifest["tables"] = {name: {"file": name + ".csv", "columns": list(t.columns), "rows": len(t.rows)}
                                   for name, t in self.tables.items()}
        manifest.write(os.path.join(self.dir, "manifest.json"), self.manifest)

    def finish(self, status: str) -> None:
        self.manifest.update(status=status, end=manifest.now(), elapsed_s=round(self.elapsed(), 1),
                             loadavg_at_end=os.getloadavg())
        self.save_manifest()
        for writer in self.tables.values():
            writer.close()

    # -- progress ----------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def progress(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", file=sys.stderr, flush=True)

    # -- servers -----------------------------------------------------------------------------

    def variants_for(self, experiment: str):
        """The variants to run, each available one yielded; the others recorded as skipped."""
        for variant in self.variants:
            reason = variant.unavailable()
            if reason:
                self.skip(experiment, variant, reason)
                continue
            yield variant

    def each_variant(self, experiment: str, body) -> None:
        """body(variant, repeat) in interleaved rounds: round 1 of every available variant, then round 2, ...

        Variants meet the same machine weather (A B C ... A B C ...), so a slow minute of the machine
        spreads over every variant instead of biasing one; ``repeat`` (the tables' column) is the round.
        A failure skips that one (variant, round), not the run; a server that does not start is skipped
        for the rounds left too (it would not start then either).
        """
        self.in_rounds(experiment, list(self.variants_for(experiment)), body)

    def in_rounds(self, experiment: str, cases: list, body) -> None:
        """body(case, repeat) for round 1..repeat, every case in each round (cases: Variants, or anything with a
        ``name`` and ``backend``, e.g. microbenchmarks). Errors as in ``each_variant``."""
        cases = list(cases)
        for repeat in range(1, self.repeat + 1):
            if self.repeat > 1:
                self.progress(f"[{experiment}] round {repeat}/{self.repeat}: "
                              f"{', '.join(c.name for c in cases) or 'nothing left to measure'}")
            for case in list(cases):
                try:
                    body(case, repeat)
                except ServerStartError as exc:
                    self.skip(experiment, case, f"server did not start: {exc}")
                    cases.remove(case)
                except (loadproc.LoadgenError, OSError, RuntimeError, psutil.Error) as exc:
                    detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
                    self.skip(experiment, case, f"failed: {detail}", point=f"repeat={repeat}")

    def server_options(self, variant, *, max_conns: int | None = None, idle_timeout: float | None = None,
                       cpus=None, workers: int | None = None) -> list:
        """The server's command-line options for one experiment (pool size: ``workers``, else the profile's;
        Go's GOMAXPROCS = its CPUs)."""
        options = list(variant.options)
        if variant.is_pool:
            options += ["--workers", str(workers or self.profile.pool_workers)]
        if variant.backend == "go":
            options += ["--gomaxprocs", str(len(cpus or self.server_cpus))]
        if max_conns is not None:
            options += ["--max-conns", str(max_conns)]
        if idle_timeout is not None:
            options += ["--idle-timeout", f"{idle_timeout:g}"]
        return with_metrics_port(options)

    @contextlib.contextmanager
    def serve(self, experiment: str, variant, repeat: int, *, cpus=None, track_ctx: bool = True,
              stop_grace: float = SERVER_STOP_GRACE_S, **options):
        """A running, pinned, sampled server for the block; stopped (and its samples written) after it.

        ``stop_grace``: how long its graceful drain may take before SIGKILL (short where
        thousands of held connections would make a thread-per-connection drain crawl).
        """
        cpus = cpus or self.server_cpus
        stem = log_stem(self.raw_dir, experiment, variant.name, f"r{repeat}")
        server = self._start_server(variant, self.server_options(variant, cpus=cpus, **options), cpus, stem)
        labels = {"experiment": experiment, "backend": variant.backend, "variant": variant.name, "repeat": repeat}
        sampler = None
        try:
            sampler = Sampler(Probe(server.pid, server.port, track_ctx), self.profile.sample_interval_s, labels)
            server.sampler = sampler.start()
            yield server
        finally:
            if sampler:
                sampler.stop()
            rows = sampler.take() if sampler else []
            server.stop(grace=stop_grace)
            for row in rows:
                self.write("samples", row)

    def _start_server(self, variant, options: list, cpus, stem: str) -> ServerProcess:
        """Here on loopback, or with ``--server-host`` on the other host (its own namespace, across a veth pair)."""
        if self.server_host is None:
            return ServerProcess(variant.backend, options, cpus=cpus, log_stem=stem)
        argv = [sys.executable, "-m", "conclab.servers", variant.backend, "--host", self.server_host.address,
                "--port", "0", *options]
        return ServerProcess.command(self.server_host.command(argv), name=variant.backend, cpus=cpus, log_stem=stem)

    def flush_samples(self, server) -> None:
        for row in server.sampler.take():
            self.write("samples", row)

    # -- one load point ----------------------------------------------------------------------

    def load_options(self) -> dict:
        return {"cpus": self.loadgen_cpus, "warmup": self.profile.warmup_s, "engine": self.loadgen_engine}

    def measure(self, server, point: str, mode: str, conns: int, **options) -> dict:
        """Run the load generator once against ``server``; LOAD + SERVER columns of that point.

        The generator runs in the background; when it announces its measured window the harness
        checks, during the warm-up, that the server has accepted every connection (``accepted_check``)
        and reads the server's CPU and context-switch counters at the window's start and end
        (``watch_window``), so the SERVER columns describe the window the LOAD columns describe.
        """
        sampler = server.sampler
        sampler.point = point
        sampler.reset_peaks()
        counters_before = self._server_counters(server)
        requests_before = counters_before.get("requests_total")
        before = sampler.probe.counters()
        handle = loadproc.start_loadgen(server.target, mode, conns, self.profile.point_s, **self.load_options(),
                                        **options)
        try:
            window = watch_window(handle, server, sampler.probe, conns, counters_before.get("connections_total"))
            result = handle.wait()
        finally:
            handle.close()
        after = sampler.probe.counters()
        requests_after = self._server_requests(server)
        sampler.sample()
        self.flush_samples(server)
        row = loadproc.flatten(result)
        requests = (requests_after - requests_before) if None not in (requests_before, requests_after) else None
        row.update(server_deltas(before, after, requests, row.get("requests"), sampler.peaks, window=window,
                                 throughput=row.get("throughput_rps")))
        accepted_check(row, window.active, conns)
        if not server.alive():
            raise RuntimeError(f"server exited during the point: {server.last_words()}")
        return row

    def _server_counters(self, server) -> dict:
        """The server's counters (``CounterReader``) with an integer requests_total, or {} if it does not answer."""
        reader = CounterReader(server)
        for _ in range(STATS_RETRIES):
            counters = reader.read(STATS_TIMEOUT_S)
            if counters and isinstance(counters.get("requests_total"), int):
                return counters
        return {}

    def _server_requests(self, server) -> int | None:
        return self._server_counters(server).get("requests_total")


def with_metrics_port(options: list) -> list:
    """``options``, plus ``--metrics-port`` on a free port when they ask for several processes (``--procs N``,
    N > 1): the harness reads such a server's counters from its parent's /metrics (``CounterReader``)."""
    if procs_of(options) > 1 and not any(str(o).startswith("--metrics-port") for o in options):
        return [*options, "--metrics-port", str(free_port())]
    return list(options)


def procs_of(options) -> int:
    """The ``--procs`` of a server's command-line options (the last one given, as argparse takes it); 1 without."""
    procs = 1
    for i, option in enumerate(map(str, options)):
        if option == "--procs" and i + 1 < len(options):
            procs = int(options[i + 1])
        elif option.startswith("--procs="):
            procs = int(option.split("=", 1)[1])
    return procs


class CounterReader:
    """How the harness reads a server's own counters: the one place that decides between STATS and /metrics.

    A server with a metrics endpoint (``with_metrics_port`` gives one to every server of several processes) is
    scraped: its parent sums every worker's counters there, where STATS reaches the one worker its connection
    lands on and answers with that worker's alone. Any other server answers STATS. ``read`` gives the counters
    under STATS's names either way. A STATS connection lands on the served port, so the server counts it in its
    own connections_active and connections_total (``opens`` = 1 per reading, answered or not: it may have been
    accepted before the answer timed out); a scrape reaches the parent's HTTP endpoint and counts in neither
    (``opens`` = 0).
    """

    def __init__(self, server) -> None:
        self.server = server
        self.scrapes = bool(server.metrics_port)
        self.opens = 0 if self.scrapes else 1

    def read(self, timeout: float) -> dict | None:
        """The counters, or None if the server does not answer within ``timeout`` (or answers nonsense)."""
        if not self.scrapes:
            return self.server.try_stats(timeout=timeout)
        try:
            return scraped(self.server.metrics(timeout))
        except (OSError, ValueError, http.client.HTTPException):
            return None


def scraped(text: str) -> dict:
    """A /metrics page's counters and gauges under their STATS names (conclab_requests_total: requests_total)."""
    from conclab.servers.metrics import PREFIX as METRIC_PREFIX   # here: the analysis imports this module, no server
    return {sample.name.removeprefix(METRIC_PREFIX): int(sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name.startswith(METRIC_PREFIX)}


@dataclass
class Window:
    """What the harness saw of one point's measured window: the server's counters at its start and end
    (None: the generator did not announce it) and the connections the server had accepted by its start."""
    start: dict | None = None
    end: dict | None = None
    active: int | None = None          # None: not known (STATS unanswered, or no window announced)

    @property
    def known(self) -> bool:
        return self.start is not None and self.end is not None


def watch_window(handle, server, probe, conns: int, total_before: int | None = None) -> Window:
    """Follow one background load run: wait for its window (``LoadRun.window``), check the server's
    connections during the warm-up (``total_before``: its connections_total before the run), read the
    counters at the window's start and end."""
    announced = None
    while announced is None and handle.running():
        announced = handle.window()
        if announced is None:
            time.sleep(WINDOW_POLL_S)
    announced = announced or handle.window()
    if announced is None or not handle.running():
        return Window()
    start, end = announced
    check = ConnectionsCheck(server, conns, start, total_before).begin()
    _sleep_until(start, handle)
    first = probe.counters()
    _sleep_until(end, handle)
    last = probe.counters()
    return Window(first, last, check.result())


def _sleep_until(instant: float, handle) -> None:
    """Sleep until time.monotonic() reaches ``instant`` (or the load run ends)."""
    while handle.running():
        left = instant - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, SLEEP_CHUNK_S))


class ConnectionsCheck:
    """During the warm-up: how many of the generator's connections the server has accepted.

    Reads the server's counters (``CounterReader``: STATS, or a server of several processes' /metrics)
    until it reports all ``conns`` or the window starts; ``result`` is the most it reported (None if it
    never answered: a connection-dispatch pool with every worker busy cannot answer STATS, and is then
    judged by the generator's ``connections.served`` alone). One answer counts the connections open now
    less the reading's own (``connections_active`` - 1 over STATS), and, when ``total_before`` (the
    server's connections_total before the run) is known, no more than it accepted since, less the
    check's own connections: a closed STATS connection the server has not reaped yet is not counted as
    one of the generator's. Without a warm-up the one answer comes just after the window starts.
    """

    def __init__(self, server, conns: int, window_start: float, total_before: int | None = None) -> None:
        self.server, self.conns, self.window_start, self.total_before = server, conns, window_start, total_before
        self.best: int | None = None
        self.opened = 0                # connections the check's readings opened on the server
        self._thread = threading.Thread(target=self._run, name="connections-check", daemon=True)

    def begin(self) -> "ConnectionsCheck":
        self._thread.start()
        return self

    def _run(self) -> None:
        reader = CounterReader(self.server)
        while True:
            self.opened += reader.opens
            counters = reader.read(STATS_CHECK_TIMEOUT_S)
            active = counters.get("connections_active") if counters else None
            if isinstance(active, int):
                accepted = active - reader.opens                       # a STATS connection counts itself
                total = counters.get("connections_total")
                if isinstance(total, int) and isinstance(self.total_before, int):
                    accepted = min(accepted, total - self.total_before - self.opened)
                self.best = max(self.best or 0, accepted)
            if (self.best is not None and self.best >= self.conns) or time.monotonic() >= self.window_start:
                return
            time.sleep(STATS_CHECK_GAP_S)

    def result(self) -> int | None:
        self._thread.join(STATS_CHECK_TIMEOUT_S + STATS_CHECK_GAP_S)
        return self.best


def accepted_check(row: dict, active: int | None, conns: int) -> None:
    """Mark the row invalid when the server had accepted fewer than ``conns`` connections before measuring.

    ``server_conns_active`` is at most ``conns``: a count above it is a connection of the generator's own
    start-up check (it opens one first and closes it) the server had not reaped yet, not one of the point's.
    """
    row["server_conns_active"] = min(active, conns) if active is not None else None
    if active is None or active >= conns:
        return
    reasons = [r for r in (row.get("invalid_reason") or "").split("; ") if r]
    row.update(valid=False, invalid_reason="; ".join([f"server had accepted only {active} of {conns} connections",
                                                      *reasons]))


def server_deltas(before: dict, after: dict, server_requests, loadgen_requests, peaks: dict,
                  window: Window | None = None, throughput=None) -> dict:
    """The SERVER columns: CPU and context switches spent on the point, per request too.

    With the generator's window (``window.known``: the server's counters read when it started and
    ended), CPU time and context switches are the window's, per request over the requests the generator
    counted in it, and server_cpu_percent = window CPU / window wall time. Without one (a generator that
    does not announce its window) the counters around the whole run (start-up, connecting and warm-up
    included) give the per-request costs (over the server's own request count in that span), and
    server_cpu_percent = CPU per request x the window's throughput: dividing that span's CPU by its wall
    time would count the idle start-up as the server's and understate the load.
    """
    windowed = window is not None and window.known
    first, last = (window.start, window.end) if windowed else (before, after)
    user = last["cpu_user_s"] - first["cpu_user_s"]
    system = last["cpu_sys_s"] - first["cpu_sys_s"]
    ctx = {key: (last[key] - first[key]) if last[key] is not None and first[key] is not None else None
           for key in ("ctx_voluntary", "ctx_involuntary")}
    requests = (loadgen_requests or server_requests) if windowed else (server_requests or loadgen_requests)

    def per_req(value):
        return value / requests if requests and value is not None else None
    switches = None if None in ctx.values() else ctx["ctx_voluntary"] + ctx["ctx_involuntary"]
    cpu_us_per_req = per_req((user + system) * 1e6)
    if windowed:
        percent = 100.0 * (user + system) / max(last["t"] - first["t"], 1e-9)
    else:
        percent = cpu_us_per_req * throughput / 1e4 if cpu_us_per_req is not None and throughput else None
    return {"server_requests": server_requests, "server_cpu_user_s": user, "server_cpu_sys_s": system,
            "server_cpu_percent": percent,
            "server_ctx_voluntary": ctx["ctx_voluntary"], "server_ctx_involuntary": ctx["ctx_involuntary"],
            "cpu_us_per_req": cpu_us_per_req, "ctx_per_req": per_req(switches),
            "server_rss_kib": peaks.get("rss_kib"), "server_threads": peaks.get("threads"),
            "server_fds": peaks.get("fds")}




def key(experiment: str, variant, repeat: int) -> dict:
    """The KEY columns of a row (run_id is added by Run.write)."""
    return {"experiment": experiment, "backend": variant.backend, "variant": variant.name, "repeat": repeat}


def describe(row: dict) -> str:
    """One progress line's worth of a load point."""
    def num(value, scale=1.0, fmt="{:.0f}"):
        return "-" if value in (None, "") else fmt.format(float(value) * scale)
    text = (f"{num(row.get('throughput_rps'))} rps, p50 {num(row.get('p50_us'), 1e-3, '{:.2f}')} ms, "
            f"p99 {num(row.get('p99_us'), 1e-3, '{:.2f}')} ms, errors {num(row.get('errors'))}")
    if row.get("server_cpu_percent") is not None:
        text += (f", server CPU {num(row['server_cpu_percent'])}%, {num(row.get('cpu_us_per_req'), 1, '{:.1f}')} "
                 f"us/req, {num(row.get('ctx_per_req'), 1, '{:.2f}')} ctx/req")
    if row.get("invalid_reason"):
        text += f" [INVALID: {row['invalid_reason']}]"
    elif row.get("loadgen_saturated"):
        text += " [LOADGEN SATURATED]"
    return text
