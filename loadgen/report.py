"""Results out: the machine block, the self-check, the tidy CSV row and the human summary.

The JSON result (see docs/loadgen.md) is the lab's unit of measurement; the
CSV row is the same run flattened to one line with fixed columns, so many runs
append to one file and load straight into a data frame.
"""
from __future__ import annotations

import csv
import io
import os
import platform
import socket
import sys
import time
from pathlib import Path

import psutil

SATURATION_PERCENT = 90.0        # the load generator is "saturated" at this share of its CPUs
CSV_COLUMNS = (
    "started_at", "engine", "mode", "target", "op", "protocol", "size", "conns", "pipeline", "rate",
    "procs", "duration_s", "requests", "errors", "throughput_rps", "p50_us", "p90_us", "p99_us",
    "p999_us", "p9999_us", "max_us", "late", "unsent", "connected", "failed",
    "loadgen_cpu_percent", "loadgen_saturated", "cpu_busy_percent",
    "served", "unanswered", "max_unanswered_wait_us",
)


class MachineWatch:
    """The machine around a run: what it is, and how busy its CPUs were meanwhile (contention)."""

    def __init__(self) -> None:
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.load_before = os.getloadavg()
        self.cpu_before = psutil.cpu_times(percpu=True)

    def finish(self) -> dict:
        busy = [_busy_percent(a, b) for a, b in zip(self.cpu_before, psutil.cpu_times(percpu=True), strict=False)]
        return {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_model": _cpu_model(),
            "cpus_online": os.cpu_count(),
            "cpus_allowed": sorted(os.sched_getaffinity(0)),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "nofile_limit": _nofile(),
            "loadavg_before": [round(x, 2) for x in self.load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "cpu_busy_percent": busy,
        }


def _busy_percent(before, after) -> float:
    total = sum(after) - sum(before)
    idle = (after.idle + getattr(after, "iowait", 0)) - (before.idle + getattr(before, "iowait", 0))
    return round(100.0 * (total - idle) / total, 1) if total > 0 else 0.0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _nofile() -> int:
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_check(parts: list[dict], cpus_usable: int) -> dict:
    """The self-check: the load generator's CPU share, overall and per process, and the verdict.

    Each part reports ``cpu_s`` (its thread's CPU time over the measured window)
    and ``cpu_wall_s``. A single-threaded process can use one CPU at most, so
    one process at >= 90% of a core is saturated even if others idle.
    """
    per_process = [100.0 * p["cpu_s"] / p["cpu_wall_s"] for p in parts if p.get("cpu_wall_s")]
    wall = max((p["cpu_wall_s"] for p in parts if p.get("cpu_wall_s")), default=0.0)
    total = sum(p["cpu_s"] for p in parts)
    overall = 100.0 * total / (wall * max(cpus_usable, 1)) if wall else 0.0
    saturated = bool(per_process) and (max(per_process) >= SATURATION_PERCENT or overall >= SATURATION_PERCENT)
    return {
        "loadgen_cpu_percent": round(overall, 1),
        "loadgen_cpu_percent_per_process": [round(x, 1) for x in per_process],
        "loadgen_saturated": saturated,
    }


def saturation_warning(result: dict) -> str | None:
    if not result.get("loadgen_saturated"):
        return None
    busiest = max(result["loadgen_cpu_percent_per_process"], default=result["loadgen_cpu_percent"])
    return (f"the load generator used {busiest:.0f}% of a CPU: it may be the bottleneck, not the server "
            f"(try --procs, --pipeline or --cpus)")


def unserved_warning(result: dict) -> str | None:
    """Connections that never got a reply, requests never answered: the histogram cannot show them."""
    text = unserved_text(result)
    if not text:
        return None
    return f"{text}: latency and throughput describe only what was answered"


def unserved_text(result: dict) -> str | None:
    """'served 6 of 50 connections, 44 requests unanswered (oldest waited >= 1,250 ms)', or None if all were."""
    conns = result.get("connections") or {}
    served, opened, unanswered = conns.get("served"), conns.get("opened"), result.get("unanswered") or 0
    parts = []
    if served is not None and opened is not None and served < opened:
        parts.append(f"served {served:,} of {opened:,} connections")
    if unanswered:
        wait_ms = (result.get("max_unanswered_wait_us") or 0) / 1000
        parts.append(f"{unanswered:,} requests unanswered (the oldest waited >= {wait_ms:,.0f} ms)")
    return ", ".join(parts) or None


def csv_row(result: dict) -> dict:
    """The run as one flat row of CSV_COLUMNS."""
    p, lat = result["params"], result.get("latency_us", {})
    open_loop, hold = result.get("open_loop", {}), result.get("hold", {})
    busy = result.get("machine", {}).get("cpu_busy_percent", [])
    row = {
        "started_at": result.get("started_at"), "engine": p["engine"], "mode": p["mode"], "target": p["target"],
        "op": p["op"], "protocol": p["protocol"], "size": p["size"], "conns": p["conns"], "pipeline": p["pipeline"],
        "rate": p["rate"], "procs": result.get("loadgen_procs"), "duration_s": result["duration_s"],
        "requests": result["requests"], "errors": sum(result["errors"].values()),
        "throughput_rps": result["throughput_rps"], "late": open_loop.get("late"), "unsent": open_loop.get("unsent"),
        "connected": hold.get("connected"), "failed": hold.get("failed"),
        "loadgen_cpu_percent": result["loadgen_cpu_percent"], "loadgen_saturated": result["loadgen_saturated"],
        "cpu_busy_percent": " ".join(str(x) for x in busy),
        "served": result.get("connections", {}).get("served"), "unanswered": result.get("unanswered"),
        "max_unanswered_wait_us": result.get("max_unanswered_wait_us"),
    }
    for key in ("p50", "p90", "p99", "p999", "p9999", "max"):
        row[f"{key}_us"] = lat.get(key)
    return row


def csv_text(result: dict, header: bool = True) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerow(csv_row(result))
    return out.getvalue()


def append_csv(path: str | Path, result: dict) -> None:
    """Append the row to ``path``, writing the header first if the file is new or empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        f.write(csv_text(result, header=new))


def summary_text(result: dict) -> str:
    """A few human lines for the terminal."""
    p, lat = result["params"], result["latency_us"]
    lines = [f"{p['mode']} loop, {p['engine']} engine -> {p['target']}: {result['requests']:,} requests in "
             f"{result['duration_s']:.2f} s = {result['throughput_rps']:,.0f} req/s"]
    if result.get("hold"):
        h = result["hold"]
        lines = [f"hold -> {p['target']}: {h['connected']:,}/{h['requested']:,} connected, {h['failed']:,} failed "
                 f"{h['failure_reasons'] or ''}, {h['held_at_end']:,} still held at the end"]
        c = h["connect_us"]
        lines.append(f"connect µs: p50 {c['p50']}  p99 {c['p99']}  max {c['max']}")
    lines.append("latency µs: " + "  ".join(f"{k} {lat[k]:,}" for k in ("p50", "p90", "p99", "p999", "p9999", "max")))
    if result.get("open_loop"):
        o = result["open_loop"]
        lines.append(f"open loop at {o['rate']:,.0f}/s: {o['late']:,} sent late (> {o['late_threshold_us']} µs), "
                     f"{o['unsent']:,} never sent, {o['unanswered']:,} unanswered")
    if result.get("connections") and not result.get("hold"):
        c = result["connections"]
        lines.append(f"connections: {c['served']:,} of {c['requested']:,} served, {c['failed']:,} failed to open, "
                     f"{c['lost']:,} lost; {result.get('unanswered', 0):,} requests unanswered")
    errors = {k: v for k, v in result["errors"].items() if v}
    lines.append(f"errors: {errors or 'none'}")
    lines.append(f"load generator CPU: {result['loadgen_cpu_percent']}% over {result['loadgen_procs']} process(es)"
                 f"{'  SATURATED' if result['loadgen_saturated'] else ''}")
    return "\n".join(lines)


def warn(message: str) -> None:
    print(f"conclab load: warning: {message}", file=sys.stderr, flush=True)
