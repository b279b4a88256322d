"""Is the lab's overhead small and equal in every model? Full backends vs bare twins (a benchmark, not a test)

    python benchmarks/full_vs_minimal.py                          # 5 rounds x 5 s per server
    python benchmarks/full_vs_minimal.py --quick                  # 3 rounds x 2 s
    python benchmarks/full_vs_minimal.py --models epoll,go --rounds 7

For every model (threads, threadpool with connection dispatch, asyncio, uvloop,
gevent, epoll, go) two servers run: the lab's full backend (``python -m
conclab.servers BACKEND``, every control on at its default) and its bare twin in
benchmarks/minimal/ (a framed ECHO loop and nothing else; go: go_echo, built with
``go build`` into the cache). Both thread pools get ``--workers`` = ``--conns``, so
every connection of the closed loop is served. A model whose bare server or
backend is missing here is skipped with a one-line note.

Each server, pinned to CPU 0, is measured in turn:

1. load: a closed loop, ``--conns`` connections, one 64-byte ECHO in flight
   each, ``--warmup`` then ``--duration`` seconds, by the compiled client
   ``loadgen/c/closedloop.c`` pinned to CPU 1 (built with cc on first use; the
   Python load generator needs about as much CPU per request as the fastest
   servers and would squeeze their ratios towards 1, so it is only the
   fallback, with a warning, when there is no C compiler): req/s, and the
   server's CPU microseconds per request (its CPU time over the client's whole
   run / the replies of that run), which other people's load moves much less;
2. memory: ``--held`` idle connections opened from this process, each after
   one ECHO sent: the server's RSS before vs while they are held (once the
   server has accepted them all, plus a short settle), / the count, in KiB
   (a thread pool answers only --workers of them; the rest wait in its queue,
   in both twins alike).

Every server runs once per round, for ``--rounds`` rounds; the order is rotated
each round and reversed every other round, so each twin runs both before and
after its full backend. Ratios full / bare are taken within a round (a round's
two twins saw nearly the same weather) and reported as the median over rounds
with min-max. The targets, the lab's overhead budget: req/s >= 0.85x bare (go:
>= 0.9x), CPU µs per request <= 1.2x bare (Python backends), KiB per idle
connection <= 1.25x bare + 0.5 KiB.

Prints progress lines, then a Markdown table; writes every measurement and
the summary as JSON to ``--out`` (default results/full_vs_minimal.json).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from loadgen_ceiling import LOADGEN_CPU, SERVER_CPU, available, one_run  # noqa: E402

from conclab.loadgen import cengine  # noqa: E402
from conclab.loadgen.params import LoadError  # noqa: E402
from conclab.servers import buildcache, unavailable_reason  # noqa: E402
from conclab.servers.launcher import ServerProcess, ServerStartError, wait_until  # noqa: E402

MINIMAL = BENCHMARKS / "minimal"
GO_ECHO = MINIMAL / "go_echo"
SIZE = 64                                  # ECHO payload bytes
FULL_OPTIONS = ("--max-conns", "20000")    # room for the held connections; every other control at its default
RUN_SLACK_S = 30.0                         # a client run may take this much longer than warm-up + duration
ACCEPT_TIMEOUT_S = 30.0                    # the server must have accepted every held connection by then
SETTLE_S = 0.5                             # after that, before RSS is read: threads start, first replies go
FDS_BACK_TIMEOUT_S = 5.0                   # after the load, the server closes its connections within this

RPS_MIN = 0.85                             # full / bare req/s, at least (go: GO_RPS_MIN)
GO_RPS_MIN = 0.9
CPU_MAX = 1.2                              # full / bare CPU µs per request, at most (Python backends)
KIB_FACTOR, KIB_SLACK = 1.25, 0.5          # KiB per idle connection, at most bare x FACTOR + SLACK


@dataclass(frozen=True)
class Model:
    name: str                              # the full backend's name
    bare: str                              # its twin in benchmarks/minimal/
    bare_options: tuple = ()
    pool: bool = False                     # a thread pool: both get --workers = --conns

    def full_command(self, conns: int) -> list[str]:
        workers = ("--dispatch", "connection", "--workers", str(conns)) if self.pool else ()
        return [sys.executable, "-m", "conclab.servers", self.name, "--port", "0", *FULL_OPTIONS, *workers]

    def bare_command(self, conns: int) -> list[str]:
        if self.name == "go":
            return [str(build_go_echo()), "-port", "0"]
        workers = ("--workers", str(conns)) if self.pool else ()
        return [sys.executable, str(MINIMAL / self.bare), *self.bare_options, *workers, "--port", "0"]


MODELS = (
    Model("threads", "threads_echo.py"),
    Model("threadpool", "threadpool_echo.py", pool=True),
    Model("asyncio", "asyncio_echo.py"),
    Model("uvloop", "asyncio_echo.py", ("--uvloop",)),
    Model("gevent", "gevent_echo.py"),
    Model("epoll", "epoll_echo.py"),
    Model("go", "go_echo"),
)
SIDES = ("full", "bare")


def skip_reason(model: Model) -> str | None:
    """Why this model cannot be compared here, or None."""
    if not (MINIMAL / model.bare).exists():
        return f"no bare server benchmarks/minimal/{model.bare} yet"
    if not available(model.name):
        return unavailable_reason(model.name)
    return None


# -- building the clients and go_echo ----------------------------------------------------------------

def c_client() -> Path | None:
    """The compiled closed-loop client, or None (with a warning) when it cannot be built."""
    try:
        return cengine.build("closed")
    except (LoadError, OSError, subprocess.SubprocessError) as exc:
        print(f"warning: {exc}; falling back to the Python load generator, which caps the fastest servers "
              f"and squeezes their ratios towards 1", flush=True)
        return None


def build_go_echo() -> Path:
    """go_echo compiled (``go build``) into $XDG_CACHE_HOME/conclab/go_echo-<hash of its sources>/, once."""
    sources = sorted(GO_ECHO.glob("*.go")) + sorted(GO_ECHO.glob("go.mod"))
    return buildcache.build_once(buildcache.cache_dir("go_echo", sources), "go_echo", _compile_go_echo)


def _compile_go_echo(partial: Path) -> None:
    env = {**os.environ, "CGO_ENABLED": "0", "GOWORK": "off"}       # as servers/golang.py builds the backend
    done = subprocess.run([shutil.which("go") or "go", "build", "-trimpath", "-o", str(partial), "."], cwd=GO_ECHO,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        first = next((line for line in done.stderr.splitlines() if line and not line.startswith("#")), "")
        raise SystemExit(f"building benchmarks/minimal/go_echo failed: {first}")


# -- one server, one round -----------------------------------------------------------------------------

def start(model: Model, side: str, conns: int) -> ServerProcess:
    command = model.full_command(conns) if side == "full" else model.bare_command(conns)
    try:
        return ServerProcess.command(command, name=f"{model.name} ({side})", cpus=[SERVER_CPU])
    except ServerStartError as exc:
        raise SystemExit(f"{model.name} ({side}) did not start: {exc}") from None


def measure(model: Model, side: str, client: Path | None, args) -> dict:
    """Load, then idle memory, of one freshly started server."""
    with start(model, side, args.conns) as server:
        fds_at_start = server.fds()
        load = c_closed_loop(client, server, args) if client else python_closed_loop(server, args)
        wait_until(lambda: server.fds() <= fds_at_start, FDS_BACK_TIMEOUT_S)
        memory = idle_memory(server, fds_at_start, args.held)
    return {"model": model.name, "side": side, **load, **memory}


def c_closed_loop(client: Path, server: ServerProcess, args) -> dict:
    argv = ["taskset", "-c", str(LOADGEN_CPU), str(client), "--target", server.target, "--conns", str(args.conns),
            "--duration", str(args.duration), "--warmup", str(args.warmup), "--size", str(SIZE)]
    cpu0 = server.cpu_seconds()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=args.warmup + args.duration + RUN_SLACK_S)
    server_cpu_s = server.cpu_seconds() - cpu0
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no message on stderr"])[-1]
        raise SystemExit(f"closedloop exited with status {done.returncode} against {server.backend}: {tail}")
    return load_figures(parse_client_output(done.stdout), server_cpu_s)


def python_closed_loop(server: ServerProcess, args) -> dict:
    """The fallback: the lab's load generator (loadgen_ceiling.one_run), same shape as load_figures."""
    run = one_run(server, argparse.Namespace(conns=args.conns, duration=args.duration, warmup=args.warmup, pipeline=1))
    return {"client": "python", "throughput_rps": run["throughput_rps"], "requests": run["requests"],
            "errors": sum((run["errors"] or {}).values()),
            "server_cpu_us_per_request": run["server_cpu_us_per_request"]}


def idle_memory(server: ServerProcess, fds_at_start: int, count: int) -> dict:
    """The server's RSS growth per connection while ``count`` idle connections are held, KiB."""
    rss_before = server.rss()
    with held_connections(server.address, count) as socks:
        accepted = wait_until(lambda: server.fds() >= fds_at_start + count, ACCEPT_TIMEOUT_S, 0.05)
        time.sleep(SETTLE_S)
        rss_held = server.rss()
        answered = sum(answered_once(sock) for sock in socks)
    return {"held": count, "all_accepted": accepted, "answered": answered, "rss_before": rss_before,
            "rss_held": rss_held, "kib_per_conn": kib_per_conn(rss_before, rss_held, count)}


@contextlib.contextmanager
def held_connections(address, count: int):
    """``count`` connections, each having sent one ECHO; closed with a reset (no TIME_WAIT piles up)."""
    socks = []
    frame = echo_frame(SIZE)
    try:
        try:
            for _ in range(count):
                sock = socket.create_connection(address, timeout=5.0)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.sendall(frame)
                sock.setblocking(False)         # answered_once peeks; a timeout would make recv wait
        except OSError as exc:
            raise SystemExit(f"holding {count} connections to {address[0]}:{address[1]}: only {len(socks)} "
                             f"opened: {exc}") from None
        yield socks
    finally:
        for sock in socks:
            sock.close()


def answered_once(sock: socket.socket) -> bool:
    """Whether the server has answered this connection's ECHO (a thread pool answers only --workers of them)."""
    try:
        return len(sock.recv(65536)) == 5 + SIZE
    except (BlockingIOError, ConnectionError):
        return False


# -- the pure parts (unit-tested) -------------------------------------------------------------------------

def echo_frame(size: int) -> bytes:
    return struct.pack(">IB", 1 + size, 0x01) + bytes(size)


def parse_client_output(stdout: str) -> dict:
    """closedloop's JSON line (the last non-empty line); ValueError naming what is wrong."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("closedloop printed nothing")
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise ValueError(f"closedloop printed no JSON: {lines[-1][:80]!r}") from exc
    missing = [k for k in ("requests", "total_requests", "throughput_rps", "errors") if k not in result]
    if missing:
        raise ValueError(f"closedloop output lacks {', '.join(missing)}")
    return result


def load_figures(result: dict, server_cpu_s: float) -> dict:
    """What one closed-loop run says: req/s, errors, and server CPU µs per reply over the client's whole run."""
    total = max(result["total_requests"], 1)
    return {"client": "c", "throughput_rps": result["throughput_rps"], "requests": result["requests"],
            "errors": result["errors"], "server_cpu_us_per_request": round(1e6 * server_cpu_s / total, 3)}


def kib_per_conn(rss_before: int, rss_held: int, count: int) -> float:
    return round((rss_held - rss_before) / 1024 / count, 3)


def round_order(entries: list, number: int) -> list:
    """The round's running order: rotated by the round number, reversed in odd rounds."""
    shift = number % len(entries) if entries else 0
    rotated = entries[shift:] + entries[:shift]
    return rotated[::-1] if number % 2 else rotated


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def judge(model: str, rps_ratio: float, cpu_ratio: float, kib_full: float, kib_bare: float) -> dict:
    """Each target: {"limit": words, "met": bool, or None when the model has no such target}."""
    rps_min = GO_RPS_MIN if model == "go" else RPS_MIN
    kib_max = KIB_FACTOR * kib_bare + KIB_SLACK
    return {"rps": {"limit": f">= {rps_min}x", "met": rps_ratio >= rps_min},
            "cpu": {"limit": f"<= {CPU_MAX}x", "met": None if model == "go" else cpu_ratio <= CPU_MAX},
            "memory": {"limit": f"<= {kib_max:.2f} KiB", "met": kib_full <= kib_max}}


def summarize(rounds: list[list[dict]], models: list[str]) -> list[dict]:
    """One row per model with both sides measured: medians per side, within-round ratio spreads, targets."""
    rows = []
    for model in models:
        pairs = []
        for runs in rounds:
            sides = {r["side"]: r for r in runs if r["model"] == model}
            if all(side in sides for side in SIDES):
                pairs.append((sides["full"], sides["bare"]))
        if not pairs:
            continue
        rps = spread([f["throughput_rps"] / b["throughput_rps"] for f, b in pairs if b["throughput_rps"]] or [0.0])
        cpu = spread([f["server_cpu_us_per_request"] / b["server_cpu_us_per_request"]
                      for f, b in pairs if b["server_cpu_us_per_request"]] or [float("inf")])
        medians = {f"{key}_{side}": statistics.median(p[i][key] for p in pairs)
                   for key in ("throughput_rps", "server_cpu_us_per_request", "kib_per_conn")
                   for i, side in enumerate(SIDES)}
        rows.append({"model": model, "rounds": len(pairs), **medians, "rps_ratio": rps, "cpu_ratio": cpu,
                     "targets": judge(model, rps["median"], cpu["median"], medians["kib_per_conn_full"],
                                      medians["kib_per_conn_bare"])})
    return rows


def verdict(target: dict) -> str:
    return "n/a" if target["met"] is None else "yes" if target["met"] else "**no**"


def format_table(rows: list[dict]) -> str:
    """The summary as a Markdown table."""
    lines = ["| model | req/s full / bare | full/bare req/s (min-max) | met | CPU µs/req full / bare "
             "| full/bare CPU (min-max) | met | KiB/conn full / bare | met |",
             "|---|---:|---:|---|---:|---:|---|---:|---|"]
    for row in rows:
        rps, cpu, t = row["rps_ratio"], row["cpu_ratio"], row["targets"]
        lines.append(
            f"| {row['model']} | {row['throughput_rps_full']:,.0f} / {row['throughput_rps_bare']:,.0f} "
            f"| {rps['median']:.2f}x ({rps['min']:.2f}-{rps['max']:.2f}) | {verdict(t['rps'])} "
            f"| {row['server_cpu_us_per_request_full']:.1f} / {row['server_cpu_us_per_request_bare']:.1f} "
            f"| {cpu['median']:.2f}x ({cpu['min']:.2f}-{cpu['max']:.2f}) | {verdict(t['cpu'])} "
            f"| {row['kib_per_conn_full']:.2f} / {row['kib_per_conn_bare']:.2f} | {verdict(t['memory'])} |")
    return "\n".join(lines)


# -- the command line --------------------------------------------------------------------------------------

def parse_models(text: str | None) -> list[Model]:
    """--models a,b as Model entries in MODELS' order; ValueError naming an unknown one."""
    if not text:
        return list(MODELS)
    wanted = [name.strip() for name in text.split(",") if name.strip()]
    known = {m.name for m in MODELS}
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        named = ", ".join(unknown) or "(none given)"
        raise ValueError(f"unknown model {named}; choose from {', '.join(sorted(known))}")
    return [m for m in MODELS if m.name in wanted]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=f"models: {', '.join(m.name for m in MODELS)}. Server on CPU {SERVER_CPU}, "
                                       f"client (closedloop.c, built with cc on first use) on CPU {LOADGEN_CPU}. "
                                       f"Targets, full / bare: req/s >= {RPS_MIN}x (go: >= {GO_RPS_MIN}x), CPU µs "
                                       f"per request <= {CPU_MAX}x (Python backends), KiB per idle connection <= "
                                       f"{KIB_FACTOR}x bare + {KIB_SLACK}. The method: this script's docstring.")
    p.add_argument("--models", metavar="A,B", help="compare only these models (default: all)")
    p.add_argument("--rounds", type=int, default=5, help="rounds; every server runs once per round (default: 5)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per server and round (default: 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="discarded seconds before each run (default: 1)")
    p.add_argument("--conns", type=int, default=50,
                   help="closed-loop connections; thread pools' --workers (default: 50)")
    p.add_argument("--held", type=int, default=5000,
                   help="idle connections held for the memory measure (default: 5000)")
    p.add_argument("--quick", action="store_true", help="3 rounds x 2 s, 0.5 s warm-up")
    p.add_argument("--out", default=str(REPO / "results" / "full_vs_minimal.json"),
                   help="JSON results file (default: results/full_vs_minimal.json)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 3, 2.0, 0.5
    try:
        models = parse_models(args.models)
    except ValueError as exc:
        parser().error(str(exc))
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0 or args.conns < 1 or args.held < 1:
        parser().error("--rounds, --conns and --held must be >= 1, --duration > 0, --warmup >= 0")
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPUs (server on CPU 0, client on CPU 1)")
    if shutil.which("taskset") is None:
        raise SystemExit("needs taskset (util-linux) to pin the client to CPU 1")
    for model in models:
        if (reason := skip_reason(model)) is not None:
            print(f"skipping {model.name}: {reason}", flush=True)
    models = [m for m in models if skip_reason(m) is None]
    if not models:
        raise SystemExit("no model to compare")
    client = c_client()
    entries = [(m, side) for m in models for side in SIDES]
    print(f"{len(entries)} servers x {args.rounds} rounds x ({args.warmup:g} + {args.duration:g} s, {args.held} held): "
          f"server on CPU {SERVER_CPU}, {'closedloop.c' if client else 'Python load generator'} on CPU {LOADGEN_CPU}, "
          f"closed loop, {args.conns} conns, {SIZE}-byte ECHO", flush=True)
    rounds, started = [], time.monotonic()
    for number in range(args.rounds):
        runs = []
        for model, side in round_order(entries, number):
            run = measure(model, side, client, args)
            runs.append(run)
            print(f"  round {number + 1}/{args.rounds}  {model.name + ' (' + side + ')':<18} "
                  f"{run['throughput_rps']:>9,.0f} req/s {run['server_cpu_us_per_request']:>7.1f} µs/req "
                  f"{run['kib_per_conn']:>6.2f} KiB/conn  errors {run['errors']}  "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
        rounds.append(runs)
    rows = summarize(rounds, [m.name for m in models])
    print(format_table(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "client": "closedloop.c" if client else "python",
                                          "summary": rows, "rounds": rounds}, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
