"""The adapter to the load generator: the only code that knows its command line.

The harness never imports loadgen; it runs ``python -m conclab.loadgen ... --json``
as a subprocess (docs/protocol.md, "The command line") and parses the one JSON
object it prints, so it keeps working whatever the generator's internals.
``run_loadgen`` is the whole contract; ``start_loadgen`` is the same run in the background (hold N connections
while something else is measured) and ``flatten`` maps the JSON onto the
tables' LOAD columns. With ``--json`` the generator also says on stderr, as its
run starts, when its measured window starts and ends (``WINDOW_MARK START END``,
CLOCK_MONOTONIC seconds); ``LoadRun.window`` reads that line while it runs, so the
harness reads the server's counters over exactly that window (harness.run). A
generator that does not say it is measured around its whole run instead.

``CONCLAB_LOADGEN`` (a command line, shell-split) replaces ``python -m conclab.loadgen``:
the tests point it at a stand-in; anyone can point it at another generator
that honours the same options and JSON.

The engine: ``conclab run --loadgen-engine c|python`` picks the generator's compiled
engine (``--engine c``: no interpreter per request, so the fastest servers are
less often capped by their client) or its Python one. ``engine_for`` says which a point
actually uses: closed- and open-loop points of one load process (C_MODES); points it cannot
run (``--mode hold``, ``--procs`` above 1) use the Python engine; ``flatten`` records the
engine of each point in the ``loadgen_engine`` column, read from the result's ``params.engine``.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
import tempfile
import time

from conclab.servers import buildcache, processes
from .schedule import BEHIND, behind_schedule
from .tables import OPEN

LOADGEN_ENV = "CONCLAB_LOADGEN"
EXIT_SLACK_S = 30.0         # past duration + warm-up, how long before a run counts as hung
STOP_GRACE_S = 3.0          # after SIGINT, how long a stopped run gets to print its JSON
POLL_S = 0.05
REQUIRED_KEYS = ("throughput_rps", "requests", "errors", "duration_s", "latency_us")
SATURATED = "load generator saturated"      # an invalid point's reason (analysis reads old rows the same way)
TOO_SHORT = "too short for its latency"     # an invalid point's reason: it lasted under MIN_LATENCIES x its mean
MIN_LATENCIES = 20          # a point must last at least this many mean latencies to describe a steady state
WINDOW_MARK = b"conclab load: window"        # the generator's stderr line: START END, CLOCK_MONOTONIC seconds
WINDOW_RE = re.compile(rb"^conclab load: window ([0-9.]+) ([0-9.]+)\s*$", re.MULTILINE)
WINDOW_READ_BYTES = 1 << 16   # the line comes before anything long (warnings come at the end)
ENGINES = ("c", "python")     # conclab run --loadgen-engine; "python" is the generator's "native" engine
C_MODES = ("closed", "open")  # the points the compiled engine runs (one process, the framed protocol). Its open loop
# polls between slots instead of sleeping on a timer, so it sends on time where the Python one falls behind
# (docs/performance.md, "The load generator's own cost").
PERCENTILES = {"p50_us": "p50", "p90_us": "p90", "p99_us": "p99", "p999_us": "p999", "p9999_us": "p9999",
               "max_us": "max"}


class LoadgenError(Exception):
    """The load generator failed or printed no usable JSON; the message is one line."""


def command() -> list[str]:
    """How to start the load generator: $CONCLAB_LOADGEN or ``python -m conclab.loadgen``."""
    custom = os.environ.get(LOADGEN_ENV)
    return shlex.split(custom) if custom else [sys.executable, "-m", "conclab.loadgen"]


def default_engine() -> tuple[str, str | None]:
    """(the engine ``conclab run`` uses unless told, why not the compiled one or None).

    The compiled engine needs a C compiler (it is built on first use); a generator named by
    $CONCLAB_LOADGEN is given only the contract's options.
    """
    if os.environ.get(LOADGEN_ENV):
        return "python", None
    if buildcache.c_compiler() is None:
        return "python", "no C compiler (cc or gcc): the Python load generator drives every point"
    return "c", None


def engine_for(engine: str | None, mode: str, procs: int | None = None) -> str:
    """The engine one point uses: ``engine`` ("c" or "python"; None: python) for a closed loop of one process;
    every other point (hold, several processes) uses the Python engine (see C_MODES)."""
    if engine == "c" and mode in C_MODES and (procs or 1) == 1:
        return "c"
    return "python"


def argv(target: str, mode: str, conns: int, duration: float, *, size: int | None = None,
         rate: float | None = None, op: str | None = None, work: tuple | None = None,
         pipeline: int | None = None, warmup: float | None = None, connect_rate: float | None = None,
         procs: int | None = None, cpus: list[int] | None = None, engine: str | None = None) -> list[str]:
    """The command line for one run; options left None are not passed (the generator's defaults).

    ``engine``: "c" passes ``--engine c`` when the point can use it (``engine_for``); otherwise nothing.
    """
    args = [*command(), "--target", target, "--mode", mode, "--conns", str(conns), "--duration", f"{duration:g}"]
    if engine_for(engine, mode, procs) == "c":
        args += ["--engine", "c"]
    optional = {"--size": size, "--rate": rate, "--op": op, "--pipeline": pipeline, "--warmup": warmup,
                "--connect-rate": connect_rate, "--procs": procs}
    for flag, value in optional.items():
        if value is not None:
            args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if work is not None:
        args += ["--work", f"{int(work[0])},{int(work[1])}"]
    if cpus:
        args += ["--cpus", ",".join(map(str, cpus))]
    return args + ["--json"]


class LoadRun:
    """One load generator process; its output goes to temporary files (no pipe can fill up)."""

    def __init__(self, args: list[str], budget_s: float, cpus: list[int] | None) -> None:
        self.args = args
        self.deadline = time.monotonic() + budget_s
        self._out = tempfile.TemporaryFile()
        self._err = tempfile.TemporaryFile()
        try:
            self.proc = processes.spawn(args, stdout=self._out, stderr=self._err, cpus=cpus, group=True)
        except OSError as exc:
            raise LoadgenError(f"cannot run the load generator {shlex.join(args[:3])}: {exc.strerror}") from None

    def running(self) -> bool:
        return self.proc.poll() is None

    def window(self) -> tuple[float, float] | None:
        """The measured window the generator announced ((start, end), CLOCK_MONOTONIC s = time.monotonic()),
        or None: not yet, or a generator that does not announce it. Reads stderr without moving its offset
        (the child writes through the same open file)."""
        try:
            head = os.pread(self._err.fileno(), WINDOW_READ_BYTES, 0)
        except (OSError, ValueError):
            return None
        match = WINDOW_RE.search(head)
        return (float(match[1]), float(match[2])) if match else None

    def wait(self) -> dict:
        """Wait for the run to end by itself (within its budget) and return its JSON."""
        while self.running() and time.monotonic() < self.deadline:
            time.sleep(POLL_S)
        if self.running():
            processes.stop(self.proc, signal.SIGINT, STOP_GRACE_S)
            raise LoadgenError(f"load generator still running past its time budget; stopped ({self._tail()})")
        return self._result()

    def stop(self) -> dict | None:
        """End the run early (SIGINT, then kill); its JSON if it printed any, else None."""
        if self.running():
            processes.stop(self.proc, signal.SIGINT, STOP_GRACE_S)
        try:
            return self._result()
        except LoadgenError:
            return None

    def _result(self) -> dict:
        self._out.seek(0)
        text = self._out.read().decode("utf-8", "replace")
        result = parse(text)
        if result is None:
            status = self.proc.returncode
            raise LoadgenError(f"load generator exited {status} without JSON: {self._tail()}")
        return result

    def _tail(self) -> str:
        self._err.seek(0)
        lines = [line for line in self._err.read().decode("utf-8", "replace").splitlines() if line.strip()]
        return lines[-1].strip() if lines else "no message on stderr"

    def close(self) -> None:
        processes.stop(self.proc, signal.SIGINT, STOP_GRACE_S)
        self._out.close()
        self._err.close()


def parse(text: str) -> dict | None:
    """The generator's result: the last JSON object (one line or pretty-printed) that starts a line."""
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"^[ \t]*\{", text, re.MULTILINE)]
    for start in reversed(starts):
        try:
            value, _ = decoder.raw_decode(text[start:].lstrip())
        except ValueError:
            continue
        if isinstance(value, dict) and all(key in value for key in REQUIRED_KEYS):
            return value
    return None


def start_loadgen(target: str, mode: str, conns: int, duration: float, *, cpus=None, warmup=None,
                  extra_s: float = 0.0, **options) -> LoadRun:
    """Start one run in the background; ``.wait()`` or ``.stop()`` it (``.close()`` always).

    ``extra_s``: time the run may take besides duration and warm-up (a hold's ramp).
    """
    args = argv(target, mode, conns, duration, cpus=cpus, warmup=warmup, **options)
    return LoadRun(args, duration + (warmup or 0) + extra_s + EXIT_SLACK_S, cpus)


def run_loadgen(target: str, mode: str, conns: int, duration: float, **options) -> dict:
    """Run the load generator once, to its end, and return its JSON object."""
    run = start_loadgen(target, mode, conns, duration, **options)
    try:
        return run.wait()
    finally:
        run.close()


def error_count(result: dict) -> int:
    """``errors`` as one number (a generator may report a count or a dict of counts by kind)."""
    errors = result.get("errors") or 0
    if isinstance(errors, dict):
        return int(sum(v for v in errors.values() if isinstance(v, (int, float))))
    return int(errors)


def connect_errors(result: dict | None, conns: int) -> int | None:
    """Of ``conns`` asked for, how many the generator could not open (None if it does not say)."""
    if not result:
        return None
    hold = result.get("hold") or {}
    if isinstance(hold.get("failed"), int):
        return hold["failed"]
    for key in ("connect_errors", "connect_failures"):
        if isinstance(result.get(key), (int, float)):
            return int(result[key])
    opened = (result.get("connections") or {}).get("opened")
    if isinstance(opened, int):
        return max(0, conns - opened)
    return None


def failure_reasons(result: dict | None) -> dict:
    """Why connections failed, by kind ({"timeout": 9994, ...}), if the generator says."""
    if not result:
        return {}
    reasons = (result.get("hold") or {}).get("failure_reasons")
    if isinstance(reasons, dict):
        return reasons
    errors = result.get("errors")
    return errors if isinstance(errors, dict) else {}


def flatten(result: dict) -> dict:
    """The tables' LOAD columns from one JSON result (``valid`` and ``invalid_reason``: see ``validity``)."""
    latency = result.get("latency_us") or {}
    connections = result.get("connections") or {}
    row = {"duration_s": result.get("duration_s"), "requests": result.get("requests"),
           "errors": error_count(result), "throughput_rps": result.get("throughput_rps"),
           "loadgen_cpu_percent": result.get("loadgen_cpu_percent"),
           "loadgen_saturated": result.get("loadgen_saturated"),
           "unanswered": result.get("unanswered"), "conns_served": connections.get("served"),
           "max_unanswered_wait_us": result.get("max_unanswered_wait_us"),
           "loadgen_engine": "c" if (result.get("params") or {}).get("engine") == "c" else "python"}
    opened = result.get("open_loop")
    if isinstance(opened, dict):                   # open loop: what was offered, sent, late, never sent
        row.update({key: opened.get(key) for key in OPEN})
    if result.get("requests"):                     # an empty histogram's "percentiles" are not latencies
        row.update({column: latency.get(key) for column, key in PERCENTILES.items()})
    reasons = validity(result)
    row.update(valid=not reasons, invalid_reason="; ".join(reasons) or None)
    return row


def validity(result: dict) -> list[str]:
    """Why one point cannot stand for the server (empty: it can).

    Connections that never got a reply (``connections.served`` below the connections asked for),
    requests never answered, a saturated generator, an open loop behind its schedule
    (``behind_schedule``): in each case the latency and throughput describe only what was answered
    (or carry the generator's delays); a window shorter than MIN_LATENCIES mean latencies (``too_short``) holds
    too few round trips to be a steady state. The analysis leaves such a point out of headlines,
    rankings and knees. A generator that does not report a field is not judged on it. (The harness adds
    one more reason it checks itself: the server had not accepted every connection, harness.run.)
    """
    reasons = []
    connections = result.get("connections") or {}
    served = connections.get("served")
    wanted = connections.get("requested", (result.get("params") or {}).get("conns"))
    if isinstance(served, int) and isinstance(wanted, int) and served < wanted:
        reasons.append(f"served {served} of {wanted} connections")
    unanswered = result.get("unanswered")
    if isinstance(unanswered, int) and unanswered > 0:
        reasons.append(f"{unanswered} requests unanswered")
    if result.get("loadgen_saturated"):
        reasons.append(SATURATED)
    opened = result.get("open_loop")
    if isinstance(opened, dict):
        behind = behind_schedule(*(opened.get(key) for key in ("offered", "late", "unsent", "own_late")))
        if behind:
            reasons.append(behind)
    short = too_short(result)
    if short:
        reasons.append(short)
    return reasons


def too_short(result: dict) -> str | None:
    """"too short for its latency (...)" when the measured window lasted under MIN_LATENCIES x the mean
    latency: with so few round trips per connection (or a backlog that grows for the whole window, an open
    loop past capacity) the point is no steady state. None when it is long enough or the generator does not
    report a mean."""
    mean_us = (result.get("latency_us") or {}).get("mean")
    duration = result.get("duration_s")
    if not result.get("requests") or not isinstance(mean_us, (int, float)) or not isinstance(duration, (int, float)):
        return None
    needed = MIN_LATENCIES * mean_us / 1e6
    if duration >= needed:
        return None
    return f"{TOO_SHORT} ({duration:.3g} s measured, mean latency {mean_us / 1000:.3g} ms: needs {needed:.3g} s)"
