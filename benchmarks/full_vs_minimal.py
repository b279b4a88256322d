"""How far is each full backend from a minimal server of the same model? (a benchmark, not a test)

    python benchmarks/full_vs_minimal.py                 # 5 rounds x 5 s per server
    python benchmarks/full_vs_minimal.py --quick         # 3 rounds x 2 s

The lab's throughput targets are ratios to the ``go`` backend, set from what
minimal servers of each model reach (docs/performance.md). This measures both sides in the same
round: ``go``, then for each model a minimal server (benchmarks/minimal/: a
framed ECHO loop and nothing else, no deadlines, caps, counters or drain) and
the lab's full backend. Server on CPU 0, one load-generator process on CPU 1,
closed loop, 50 connections, 64-byte ECHO. Ratios are taken within a round
(the machine is shared: rounds differ, a round's servers see the same
weather); the median over rounds is reported with its spread, and the
server's CPU microseconds per request, which noise moves less than req/s.

Results are printed and written as JSON to ``--out`` (default
results/full_vs_minimal.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from loadgen_ceiling import LOADGEN_CPU, SERVER_CPU, available, one_run, start_server  # noqa: E402

MINIMAL = REPO / "benchmarks" / "minimal"
MODELS = (                                  # (full backend, the minimal server of its model, or None)
    ("threads", ["threads_echo.py"]),
    ("threadpool", None),                   # connection dispatch: threads' handler in pool workers
    ("gevent", ["gevent_echo.py"]),
    ("asyncio", ["asyncio_echo.py"]),
    ("uvloop", ["asyncio_echo.py", "--uvloop"]),
    ("epoll", None),
)
REFERENCE = "go"


def servers(models) -> list[tuple[str, str, list | None]]:
    """(label, backend, command) for every server of a round; the reference first."""
    entries = [(REFERENCE, REFERENCE, None)]
    for backend, minimal in models:
        if minimal:
            command = [sys.executable, str(MINIMAL / minimal[0]), *minimal[1:], "--port", "0"]
            entries.append((f"{backend} (minimal)", backend, command))
        entries.append((backend, backend, None))
    return entries


def measure(entry, args) -> dict:
    label, backend, command = entry
    with start_server(backend, command) as server:
        return one_run(server, args)


def summarize(rounds: list[dict], labels: list[str]) -> list[dict]:
    rows = []
    for label in labels:
        ratios = [r[label]["throughput_rps"] / r[REFERENCE]["throughput_rps"] for r in rounds]
        rows.append({"server": label,
                     "median_rps": statistics.median(r[label]["throughput_rps"] for r in rounds),
                     "ratio_to_go": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "server_cpu_us_per_request": statistics.median(r[label]["server_cpu_us_per_request"] for r in rounds)})
    by_label = {row["server"]: row for row in rows}
    for row in rows:
        minimal = by_label.get(f"{row['server']} (minimal)")
        if minimal:
            row["full_vs_minimal"] = row["ratio_to_go"] / minimal["ratio_to_go"]
    return rows


def show(rows: list[dict]) -> None:
    print(f"{'server':<20} {'req/s':>9} {'ratio to go':>12} {'spread':>13} {'CPU us/req':>11} {'full/minimal':>13}")
    for row in rows:
        vs = f"{row['full_vs_minimal']:.2f}" if "full_vs_minimal" in row else ""
        print(f"{row['server']:<20} {row['median_rps']:>9,.0f} {row['ratio_to_go']:>12.2f} "
              f"{row['ratio_min']:>6.2f}..{row['ratio_max']:<5.2f} {row['server_cpu_us_per_request']:>11.1f} {vs:>13}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds; every server runs once per round (default: 5)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per server and round (default: 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="discarded seconds before each run (default: 1)")
    parser.add_argument("--conns", type=int, default=50, help="connections (default: 50)")
    parser.add_argument("--quick", action="store_true", help="3 rounds x 2 s")
    parser.add_argument("--out", default=str(REPO / "results" / "full_vs_minimal.json"), help="JSON results file")
    args = parser.parse_args(argv)
    args.pipeline = 1
    if args.quick:
        args.rounds, args.duration = 3, 2.0
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPUs (server on CPU 0, load generator on CPU 1)")
    if not available(REFERENCE):
        raise SystemExit("needs the go backend (a Go toolchain) as the reference")
    entries = [e for e in servers(MODELS) if available(e[1])]
    print(f"{len(entries)} servers x {args.rounds} rounds x {args.duration:g} s: server on CPU {SERVER_CPU}, "
          f"load generator on CPU {LOADGEN_CPU}, closed loop, {args.conns} conns, 64-byte ECHO", flush=True)
    rounds, started = [], time.monotonic()
    for number in range(1, args.rounds + 1):
        results = {}
        for entry in entries:
            results[entry[0]] = measure(entry, args)
            print(f"  round {number}/{args.rounds}  {entry[0]:<20} {results[entry[0]]['throughput_rps']:>9,.0f} req/s"
                  f"  ({time.monotonic() - started:.0f} s)", flush=True)
        rounds.append(results)
    rows = summarize(rounds, [e[0] for e in entries])
    show(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "summary": rows, "rounds": rounds}, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
