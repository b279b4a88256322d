"""``--engine locust``: run Locust headless with loadgen/locustfile.py, return the native result shape.

Locust runs as a child process (``python -m locust ... --processes P``: one
master plus P forked workers, talking over a free loopback port); its CSV
gives the request and failure counts, and each worker's µs HDR histogram
(written by the locustfile) gives the exact latency percentiles. The CPU
self-check uses the workers' own CPU time, as for the native engine.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from conclab.servers.launcher import free_port

from . import histo
from .params import LoadError, LoadParams
from .plan import cpus_usable, preflight
from .report import MachineWatch, cpu_check

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
REPO_ROOT = LOCUSTFILE.parent.parent
LOCUST_GRACE_S = 60.0        # start-up, spawning and the final stats on top of --run-time
STOP_TIMEOUT_S = 2           # how long locust lets users finish their request at the end


def run_locust(params: LoadParams) -> dict:
    preflight(params)
    watch = MachineWatch()
    run_time = max(1, round(params.run_time or params.duration))
    with tempfile.TemporaryDirectory(prefix="conclab-locust-") as tmp:
        began = time.monotonic()
        completed = run_process(command(params, run_time, Path(tmp)), run_time)
        elapsed = time.monotonic() - began
        stats = read_rows(Path(tmp) / "run_stats.csv")
        failures = read_rows(Path(tmp) / "run_failures.csv")
        workers = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("worker-*.json"))]
    total = next((row for row in stats if row.get("Name") == "Aggregated"), None)
    if total is None:
        raise LoadError(f"locust wrote no statistics: {last_line(completed.stderr)}")
    return assemble(params, total, failures, workers, run_time, elapsed, watch)


def command(params: LoadParams, run_time: int, tmp: Path) -> list[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "--host", params.target, "--users", str(params.users),
           "--spawn-rate", f"{params.spawn_rate or params.users:g}", "--run-time", f"{run_time}s",
           "--stop-timeout", str(STOP_TIMEOUT_S), "--csv", str(tmp / "run"), "--loglevel", "WARNING",
           "--master-bind-port", str(port), "--master-port", str(port), "--exit-code-on-error", "0",
           "--conclab-op", params.op, "--conclab-size", str(params.size), "--conclab-work", params.work,
           "--conclab-hdr-dir", str(tmp)]
    if params.processes > 1:
        cmd += ["--processes", str(params.processes)]
    return cmd


def run_process(cmd: list[str], run_time: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    try:
        completed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=run_time + LOCUST_GRACE_S)
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


def assemble(params: LoadParams, total: dict, failures: list[dict], workers: list[dict], run_time: int,
             elapsed: float, watch: MachineWatch) -> dict:
    """Locust's CSV plus the workers' HDR files -> the same result shape as the native engine."""
    merged = histo.merge([w["histogram"] for w in workers])
    errors = Counter()
    for row in failures:
        errors[failure_kind(row.get("Error", ""))] += int(row.get("Occurrences", 0) or 0)
    requests = int(total["Request Count"]) - int(total["Failure Count"])
    return {
        "params": params.as_dict(),
        "started_at": watch.started_at,
        "requests": requests,
        "errors": dict(errors),
        "duration_s": float(run_time),
        "throughput_rps": round(requests / run_time, 1),
        "latency_us": histo.summary(merged),
        "histogram": histo.encode(merged),
        "histograms_per_process": [w["histogram"] for w in workers],
        "locust": {"users": params.users, "processes": params.processes, "run_time_s": run_time,
                   "wall_s": round(elapsed, 2), "requests_total": int(total["Request Count"]),
                   "failures": int(total["Failure Count"]), "rps": float(total["Requests/s"]),
                   "median_ms": float(total["Median Response Time"] or 0),
                   "p99_ms": float(total.get("99%") or 0) if total.get("99%") not in ("N/A", None) else None,
                   "hdr_requests": merged.get_total_count()},
        "loadgen_procs": len(workers),
        **cpu_check(workers, cpus_usable(params, max(len(workers), 1))),
        "machine": watch.finish(),
    }


def failure_kind(error: str) -> str:
    """Locust's failure text -> one of the lab's error kinds."""
    text = error.lower()
    for needle, kind in (("server busy", "server_busy"), ("rate limited", "rate_limited"), ("refused", "refused"),
                         ("reset", "reset"), ("closed by the server", "closed"), ("timed out", "timeout"),
                         ("unexpected reply", "protocol"), ("server error", "server_error")):
        if needle in text:
            return kind
    return "other"
