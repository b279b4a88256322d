"""manifest.json: everything needed to judge or repeat a run (in the spirit of pyperf's metadata).

Host, CPU model and count, kernel, Python and package versions, the Go
toolchain, git commit, CPU affinity, limits and kernel knobs that shape the
results (file limit, port range, somaxconn), the load average when the run
started (this machine may be shared), every parameter, and start/end times.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys

PACKAGES = ("conclab", "psutil", "pandas", "numpy", "matplotlib", "hdrhistogram", "gevent", "greenlet", "uvloop",
            "prometheus_client", "pytest")
KERNEL_KNOBS = {"ip_local_port_range": "/proc/sys/net/ipv4/ip_local_port_range",
                "somaxconn": "/proc/sys/net/core/somaxconn", "tcp_tw_reuse": "/proc/sys/net/ipv4/tcp_tw_reuse",
                "threads_max": "/proc/sys/kernel/threads-max", "pid_max": "/proc/sys/kernel/pid_max"}
COMMAND_TIMEOUT_S = 10.0


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as file:
            return " ".join(file.read().split())
    except OSError:
        return None


def _command(*args: str, cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, cwd=cwd,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str | None:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_info(repo: str) -> dict:
    commit = _command("git", "rev-parse", "HEAD", cwd=repo)
    # results/ holds outputs (a run replacing the committed reference among them), not code: it does not make a run dirty
    status = _command("git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results", cwd=repo)
    return {"commit": commit, "dirty": bool(status) if status is not None else None,
            "branch": _command("git", "rev-parse", "--abbrev-ref", "HEAD", cwd=repo)}


def host_info() -> dict:
    uname = platform.uname()
    memory = None
    with contextlib.suppress(ImportError):
        import psutil
        memory = psutil.virtual_memory().total // 1024
    go = shutil.which("go")
    return {
        "hostname": socket.gethostname(), "os": uname.system, "kernel": uname.release, "kernel_version": uname.version,
        "machine": uname.machine, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "cpu_affinity_available": sorted(os.sched_getaffinity(0)), "memory_total_kib": memory,
        "loadavg_at_start": os.getloadavg(),
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable, "build": list(platform.python_build())},
        "packages": package_versions(), "go": _command(go, "version") if go else None,
        "rlimit_nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "rlimit_stack": list(resource.getrlimit(resource.RLIMIT_STACK)),
        "kernel_knobs": {name: _read(path) for name, path in KERNEL_KNOBS.items()},
    }


def write(path: str, manifest: dict) -> None:
    """Write atomically (a reader never sees half a manifest)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as file:
        json.dump(manifest, file, indent=2, sort_keys=False, default=str)
        file.write("\n")
    os.replace(tmp, path)
