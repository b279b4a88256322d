"""``--engine locust``: run Locust headless with loadgen/locustfile.py, return the native result shape.

Two ways to run it, one result:

* **Here** (``conclab load --engine locust --processes P``): Locust runs as a
  child process, one master plus P forked workers talking over a free port on
  127.0.0.1.
* **Across machines** (``conclab load --engine locust --master --expect-workers N``):
  the child is only the master, listening on ``--master-bind`` (default
  0.0.0.0:5557); the workers are ``conclab load-worker --master HOST:PORT`` on
  other machines (``worker_command``). It starts once N workers are connected.
  The master does not connect to the target itself: only the workers must reach it.

Either way each worker sends its µs HDR histogram, failures by kind and CPU
time to the master over Locust's message channel when the test stops
(locustfile.py, locust_merge.py); the master writes the exact merge into a
temporary file here, and this module turns it into the same JSON (and CSV row)
as the native engine: ``requests``, ``errors`` and the latencies are the
workers' merged reports; the ``locust`` block keeps Locust's own CSV numbers
and every worker's part. The CPU self-check uses the workers' CPU time, each
worker process counting as one CPU.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from conclab.servers.launcher import free_port

from . import histo
from .params import LoadError, LoadParams, parse_target
from .plan import cpus_usable, preflight
from .report import MachineWatch, cpu_check, warn

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
REPO_ROOT = LOCUSTFILE.parent.parent
LOCUST_GRACE_S = 60.0        # start-up, spawning, the stop and the reports on top of --run-time
STOP_TIMEOUT_S = 2           # how long locust lets users finish their request at the end
WORKER_WAIT_S = 120.0        # --master: how long to wait for --expect-workers to connect
DEFAULT_MASTER_PORT = 5557   # Locust's own default


@dataclass(frozen=True)
class MasterSpec:
    """``--master``: listen on ``bind`` (HOST:PORT) and start once ``expect_workers`` workers are connected."""

    expect_workers: int = 1
    bind: str = f"0.0.0.0:{DEFAULT_MASTER_PORT}"

    def validate(self) -> "MasterSpec":
        if self.expect_workers < 1:
            raise LoadError("--expect-workers must be at least 1")
        host_port(self.bind, "--master-bind")
        return self


def run_locust(params: LoadParams, master: MasterSpec | None = None) -> dict:
    if master is None:
        preflight(params)                # across machines only the workers need to reach the target
    else:
        master.validate()
    watch = MachineWatch()
    run_time = max(1, round(params.run_time or params.duration))
    with tempfile.TemporaryDirectory(prefix="conclab-locust-") as tmp:
        began = time.monotonic()
        wait = WORKER_WAIT_S if master else 0.0
        completed = run_process(command(params, run_time, Path(tmp), master), run_time + wait)
        elapsed = time.monotonic() - began
        total = next((row for row in read_rows(Path(tmp) / "run_stats.csv") if row.get("Name") == "Aggregated"), None)
        merged_path = Path(tmp) / "merged.json"
        merged = json.loads(merged_path.read_text()) if merged_path.exists() else None
    if total is None or merged is None or not merged["workers"]:
        raise LoadError(f"no locust worker sent its report: {last_line(completed.stderr)}")
    if merged["workers_missing"]:
        warn(f"{merged['workers_missing']} of {merged['workers_missing'] + merged['workers_reported']} locust workers "
             f"sent no report: their requests are in no count")
    return assemble(params, total, merged, run_time, elapsed, watch, master)


def command(params: LoadParams, run_time: int, tmp: Path, master: MasterSpec | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "--host", params.target, "--users", str(params.users),
           "--spawn-rate", f"{params.spawn_rate or params.users:g}", "--run-time", f"{run_time}s",
           "--stop-timeout", str(STOP_TIMEOUT_S), "--csv", str(tmp / "run"), "--loglevel", "WARNING",
           "--exit-code-on-error", "0", "--conclab-op", params.op, "--conclab-size", str(params.size),
           "--conclab-work", params.work, "--conclab-out", str(tmp / "merged.json")]
    if master is not None:
        host, port = host_port(master.bind, "--master-bind")
        return cmd + ["--master", "--master-bind-host", host, "--master-bind-port", str(port),
                      "--expect-workers", str(master.expect_workers),
                      "--expect-workers-max-wait", f"{WORKER_WAIT_S:g}"]
    port = free_port()
    cmd += ["--master-bind-host", "127.0.0.1", "--master-bind-port", str(port), "--master-port", str(port)]
    if params.processes > 1:
        cmd += ["--processes", str(params.processes)]
    return cmd


def worker_command(master: str, processes: int = 1) -> list[str]:
    """``conclab load-worker``: a Locust worker (``processes`` of them; -1: one per core) for the master at HOST:PORT."""
    host, port = host_port(master if ":" in master else f"{master}:{DEFAULT_MASTER_PORT}", "--master")
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker", "--master-host", host,
           "--master-port", str(port), "--loglevel", "WARNING"]
    if processes != 1:
        cmd += ["--processes", str(processes)]
    return cmd


def host_port(text: str, option: str) -> tuple[str, int]:
    try:
        return parse_target(text)
    except LoadError:
        raise LoadError(f"{option} {text!r} is not HOST:PORT (for example 10.0.0.1:{DEFAULT_MASTER_PORT})") from None


def locust_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))


def run_process(cmd: list[str], run_time: float) -> subprocess.CompletedProcess:
    try:
        completed = subprocess.run(cmd, capture_output=True, text=True, env=locust_env(),
                                   timeout=run_time + LOCUST_GRACE_S)
    except FileNotFoundError:
        raise LoadError("cannot run locust: pip install locust") from None
    except subprocess.TimeoutExpired:
        raise LoadError(f"locust did not finish within {run_time + LOCUST_GRACE_S:.0f} s") from None
    if completed.returncode != 0:
        raise LoadError(f"locust failed (exit {completed.returncode}): {last_line(completed.stderr)}")
    return completed


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def last_line(text: str) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def assemble(params: LoadParams, total: dict, merged: dict, run_time: int, elapsed: float, watch: MachineWatch,
             master: MasterSpec | None = None) -> dict:
    """The workers' merged reports (counts, histogram) plus Locust's CSV -> the native engine's result shape."""
    workers = merged["workers"]
    requests = merged["requests"]
    usable = len(workers) if master else cpus_usable(params, max(len(workers), 1))
    return {
        "params": params.as_dict(),
        "started_at": watch.started_at,
        "requests": requests,
        "errors": merged["errors"],
        "duration_s": float(run_time),
        "throughput_rps": round(requests / run_time, 1),
        "latency_us": histo.summary(histo.decode(merged["histogram"])),
        "histogram": merged["histogram"],
        "histograms_per_process": [w["histogram"] for w in workers],
        "locust": {"users": params.users, "processes": params.processes, "run_time_s": run_time,
                   "wall_s": round(elapsed, 2), "requests_total": int(total["Request Count"]),
                   "failures": int(total["Failure Count"]), "rps": float(total["Requests/s"]),
                   "median_ms": float(total["Median Response Time"] or 0),
                   "p99_ms": float(total.get("99%") or 0) if total.get("99%") not in ("N/A", None) else None,
                   "hdr_requests": merged["hdr_count"],
                   "master": None if master is None else {"bind": master.bind, "expect_workers": master.expect_workers},
                   "workers": [{k: w[k] for k in ("host", "pid", "requests", "errors")} for w in workers],
                   "workers_missing": merged["workers_missing"]},
        "loadgen_procs": len(workers),
        **cpu_check(workers, usable),
        "machine": watch.finish(),
    }
