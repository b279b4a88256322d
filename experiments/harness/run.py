"""The run: its directory, tables, manifest, progress lines, and the measuring of one point.

A ``Run`` owns results/<run-id>/. Experiments ask it for servers
(``run.serve(...)``: a pinned server with a sampler, always stopped), measure
points with ``run.measure(...)`` (one load generator run plus the server's CPU,
context-switch and request deltas around it), write rows with ``run.write``,
and report what they could not do with ``run.skip`` (skipped.csv: never silent).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback

import psutil

from . import loadproc, manifest
from .sampler import Probe, Sampler
from conclab.servers.launcher import ServerProcess, ServerStartError, log_stem
from .tables import COLUMNS, TableWriter

RAW_DIR = "raw"
STATS_RETRIES = 2
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
        self.t0 = time.monotonic()
        self.tables: dict = {}
        for name in ("skipped", "samples"):
            self.table(name)
        self.manifest = {"run_id": run_id, "status": "running", "start": manifest.now(), "end": None,
                         "parameters": params, "profile": profile.as_dict(), "host": manifest.host_info(),
                         "git": manifest.git_info(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "affinity": {"server_cpus": server_cpus, "loadgen_cpus": loadgen_cpus,
                                      "harness_cpus": loadgen_cpus, "available_cpus": self.all_cpus},
                         "loadgen_command": loadproc.command(), "variants": [v.__dict__ for v in variants],
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
        """body(variant, repeat) for every available variant and repeat; a failure skips that one, not the run."""
        for variant in self.variants_for(experiment):
            for repeat in range(1, self.repeat + 1):
                try:
                    body(variant, repeat)
                except ServerStartError as exc:
                    self.skip(experiment, variant, f"server did not start: {exc}")
                    break
                except (loadproc.LoadgenError, OSError, RuntimeError, psutil.Error) as exc:
                    detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
                    self.skip(experiment, variant, f"failed: {detail}", point=f"repeat={repeat}")

    def server_options(self, variant, *, max_conns: int | None = None, idle_timeout: float | None = None,
                       cpus=None) -> list:
        """The server's command-line options for one experiment (pool size fixed, Go's GOMAXPROCS = its CPUs)."""
        options = list(variant.options)
        if variant.is_pool:
            options += ["--workers", str(self.profile.pool_workers)]
        if variant.backend == "go":
            options += ["--gomaxprocs", str(len(cpus or self.server_cpus))]
        if max_conns is not None:
            options += ["--max-conns", str(max_conns)]
        if idle_timeout is not None:
            options += ["--idle-timeout", f"{idle_timeout:g}"]
        return options

    @contextlib.contextmanager
    def serve(self, experiment: str, variant, repeat: int, *, cpus=None, track_ctx: bool = True,
              stop_grace: float = SERVER_STOP_GRACE_S, **options):
        """A running, pinned, sampled server for the block; stopped (and its samples written) after it.

        ``stop_grace``: how long its graceful drain may take before SIGKILL (short where
        thousands of held connections would make a thread-per-connection drain crawl).
        """
        cpus = cpus or self.server_cpus
        stem = log_stem(self.raw_dir, experiment, variant.name, f"r{repeat}")
        server = ServerProcess(variant.backend, self.server_options(variant, cpus=cpus, **options), cpus=cpus,
                               log_stem=stem)
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

    def flush_samples(self, server) -> None:
        for row in server.sampler.take():
            self.write("samples", row)

    # -- one load point ----------------------------------------------------------------------

    def load_options(self) -> dict:
        return {"cpus": self.loadgen_cpus, "warmup": self.profile.warmup_s}

    def measure(self, server, point: str, mode: str, conns: int, **options) -> dict:
        """Run the load generator once against ``server``; LOAD + SERVER columns of that point."""
        sampler = server.sampler
        sampler.point = point
        sampler.reset_peaks()
        requests_before = self._server_requests(server)
        before = sampler.probe.counters()
        result = loadproc.run_loadgen(server.target, mode, conns, self.profile.point_s, **self.load_options(), **options)
        after = sampler.probe.counters()
        requests_after = self._server_requests(server)
        sampler.sample()
        self.flush_samples(server)
        row = loadproc.flatten(result)
        requests = (requests_after - requests_before) if None not in (requests_before, requests_after) else None
        row.update(server_deltas(before, after, requests, row.get("requests"), sampler.peaks))
        if not server.alive():
            raise RuntimeError(f"server exited during the point: {server.last_words()}")
        return row

    def _server_requests(self, server) -> int | None:
        for _ in range(STATS_RETRIES):
            stats = server.try_stats()
            if stats and isinstance(stats.get("requests_total"), int):
                return stats["requests_total"]
        return None


def server_deltas(before: dict, after: dict, server_requests, loadgen_requests, peaks: dict) -> dict:
    """The SERVER columns: CPU and context switches spent on the point, per request too."""
    user = after["cpu_user_s"] - before["cpu_user_s"]
    system = after["cpu_sys_s"] - before["cpu_sys_s"]
    wall = max(after["t"] - before["t"], 1e-9)
    ctx = {key: (after[key] - before[key]) if after[key] is not None and before[key] is not None else None
           for key in ("ctx_voluntary", "ctx_involuntary")}
    requests = server_requests if server_requests else loadgen_requests

    def per_req(value):
        return value / requests if requests and value is not None else None
    switches = None if None in ctx.values() else ctx["ctx_voluntary"] + ctx["ctx_involuntary"]
    return {"server_requests": server_requests, "server_cpu_user_s": user, "server_cpu_sys_s": system,
            "server_cpu_percent": 100.0 * (user + system) / wall,
            "server_ctx_voluntary": ctx["ctx_voluntary"], "server_ctx_involuntary": ctx["ctx_involuntary"],
            "cpu_us_per_req": per_req((user + system) * 1e6), "ctx_per_req": per_req(switches),
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
