"""Child processes of a run: started pinned, always stopped, never leaked.

Every server, load generator and microbenchmark the harness starts goes through
``spawn`` and is registered; ``stop`` ends one (a signal, a grace period, then
SIGKILL) and ``stop_all`` (also run at interpreter exit) ends whatever is left,
so Ctrl-C, SIGTERM or an exception anywhere leaves no process behind. Servers
also get PR_SET_PDEATHSIG: if the harness itself is killed with SIGKILL, the
kernel sends them SIGTERM (``signal_on_parent_death``; the workers of a server's
``--procs`` ask for it too).

Pinning uses ``os.sched_setaffinity`` on the child right after it starts (one
thread exists then; threads created later inherit the mask); ``pin_all_tasks``
re-applies it to every thread of a process that is already running.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import resource
import signal
import subprocess

STOP_GRACE_S = 10.0         # after SIGTERM, how long a server may drain before SIGKILL
PR_SET_PDEATHSIG = 1

_live: set = set()
_libc = None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl = _libc.prctl
except (OSError, AttributeError):      # not Linux/glibc: no parent-death signal, the registry still works
    _prctl = None


def signal_on_parent_death(sig=signal.SIGTERM) -> bool:
    """Have the kernel send this process ``sig`` when the thread that started it dies (Linux
    PR_SET_PDEATHSIG); False where that cannot be asked for."""
    return _prctl is not None and _prctl(PR_SET_PDEATHSIG, int(sig)) == 0


def _in_child(die_with_parent: bool, nofile: int | None):
    """The preexec_fn: SIGTERM this child when its parent dies (Linux); RLIMIT_NOFILE soft = hard = ``nofile``."""
    def preexec() -> None:
        if die_with_parent:
            signal_on_parent_death(signal.SIGTERM)
        if nofile is not None:           # soft = hard: Go raises its soft limit to the hard one at start
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    return preexec


def spawn(args: list[str], *, cpus=None, die_with_parent: bool = False, group: bool = False,
          nofile: int | None = None, **popen) -> subprocess.Popen:
    """Start and register a child, pinned to ``cpus`` if given.

    ``die_with_parent`` and ``nofile`` use a preexec_fn: only pass them when the
    caller runs no thread that could hold a lock the child needs (subprocess's
    rule), which is how servers are started.
    ``nofile``: the child's RLIMIT_NOFILE (soft and hard), to run it out of fds.
    ``group``: the child leads its own process group, and ``stop`` signals the
    whole group (a load generator's worker processes go with it).
    """
    popen.setdefault("stdin", subprocess.DEVNULL)
    if (die_with_parent and _prctl is not None) or nofile is not None:
        popen["preexec_fn"] = _in_child(die_with_parent, nofile)
    if group:
        popen["start_new_session"] = True
    proc = subprocess.Popen(args, **popen)
    proc.conclab_group = group
    _live.add(proc)
    if cpus:
        try:
            os.sched_setaffinity(proc.pid, cpus)
        except ProcessLookupError:
            pass                         # it already exited; its caller sees that
        except OSError as exc:
            stop(proc, signal.SIGKILL, 1.0)
            raise OSError(exc.errno, f"cannot pin to CPUs {cpus}: {exc.strerror}") from None
    return proc


def pin_all_tasks(pid: int, cpus) -> None:
    """Set the affinity of every thread of ``pid`` (threads it started before it was pinned)."""
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError, OSError):
                os.sched_setaffinity(int(tid), cpus)


def _signal(proc: subprocess.Popen, sig) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if getattr(proc, "conclab_group", False):
            os.killpg(proc.pid, sig)
        elif proc.poll() is None:
            proc.send_signal(sig)


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, grace: float = STOP_GRACE_S) -> int | None:
    """Signal, wait ``grace`` seconds, SIGKILL if still there; return the exit status.

    For a group leader the signals go to the whole group, and whatever of the
    group outlives the leader is killed.
    """
    try:
        if proc.poll() is None:
            _signal(proc, sig)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                proc.wait()
        if getattr(proc, "conclab_group", False):
            _signal(proc, signal.SIGKILL)          # stragglers of the group (the leader is gone)
    finally:
        _live.discard(proc)
    return proc.returncode


def stop_all() -> None:
    """Stop every child still registered (servers drain on SIGTERM, the rest are killed)."""
    for proc in list(_live):
        stop(proc, signal.SIGTERM, grace=3.0)


def live_count() -> int:
    return sum(1 for proc in _live if proc.poll() is None)


atexit.register(stop_all)
