"""Do the load generator's open-loop percentiles agree with an independent C client? (a benchmark, not a test)

    python benchmarks/openloop_c/compare.py                       # go server (else epoll), 5 rounds x 5 s
    python benchmarks/openloop_c/compare.py --backend epoll --rounds 3 --duration 3

What it does:

1. Starts the server (``ServerProcess``) pinned to CPU 0.
2. Measures its closed-loop capacity briefly with the Python load generator
   (``--mode closed --conns 50 --duration 3``, pinned to CPU 1): ``throughput_rps``.
3. At each ``--fractions`` of that capacity (default 25 % and 50 %) runs, for
   ``--rounds`` rounds, the Python open loop (``conclab load --mode open``) and
   the C open loop (``loadgen/c/openloop.c``) one after the other,
   alternating which goes first, both with the same rate, connections,
   warm-up and duration, both pinned to CPU 1 with ``taskset``.
4. Prints a table: per rate and client the median p50 and p99 over the rounds
   (with min-max) and the median p50 measured from the actual send (what is
   left when each client's own send lag is taken out), then the ratios
   Python / C of the medians and, in brackets, the paired ratios (median over
   rounds of the ratio within a round). Next to each run it measures how
   much of the machine *other* work used meanwhile (the kernel's CPU busy
   time minus this server's and this client's CPU time): a second table
   keeps only the rounds in which that stayed under ``--quiet-below`` during
   both runs. Writes every run as JSON to ``--out``.

Both clients keep the same schedule (request k due at start + k/R on
connection k mod C, at most ``--pipeline`` in flight per connection) and
measure latency from the *scheduled* send time, so neither hides a stall
(no coordinated omission). They share no code: the C client has its own
framing, timing (it sleeps until shortly before each slot, then polls) and exact percentiles from the
sorted samples; the Python one uses its epoll loop and HDR histogram.

The C client is the open loop of the load generator's compiled engine
(``conclab load --engine c``), run here directly with its own options and
output; it is compiled on first use with ``cc -O2`` into the user's cache
directory as ``conclab/openloop-<hash>/openloop`` (``conclab.loadgen.cengine.build``,
the go backend's build cache); ``build()`` returns its path.
``build(source=CLOSED_LOOP_SOURCE)`` builds its sibling, the closed loop
``loadgen/c/closedloop.c`` that benchmarks/full_vs_minimal.py uses.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from conclab.loadgen import cengine
from conclab.loadgen.params import LoadError

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SOURCE = cengine.SOURCES["open"]
CLOSED_LOOP_SOURCE = cengine.SOURCES["closed"]
SERVER_CPU, CLIENT_CPU = 0, 1
CLIENTS = ("python", "c")
AGREEMENT = 1.25             # the aim: Python / C within this factor (either way) for p50 and p99
RUN_SLACK_S = 60.0           # a run may take this much longer than warm-up + duration + drain before it is killed


# -- building the C client ---------------------------------------------------------------------------

def build(source: Path = SOURCE) -> Path:
    """The compiled C client ``source`` (a binary named after it), built now (``cc -O2``) unless built already.

    Raises RuntimeError with the compiler's first error line.
    """
    try:
        return cengine.build(source=source)
    except LoadError as exc:
        raise RuntimeError(str(exc)) from None


# -- running the clients -----------------------------------------------------------------------------

def pinned(argv: list[str], cpu: int | None) -> list[str]:
    """``taskset -c CPU argv`` (argv unchanged when cpu is None)."""
    if cpu is None:
        return argv
    taskset = shutil.which("taskset")
    if taskset is None:
        raise SystemExit("taskset not found (util-linux); pass --no-pin to run unpinned")
    return [taskset, "-c", str(cpu), *argv]


def _run_json(argv: list[str], timeout: float) -> dict:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {done.returncode}: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def python_load(target: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "conclab.loadgen", "--target", target, "--quiet", "--json", *extra]


def capacity(target: str, cpu: int | None, conns: int = 50, duration: float = 3.0) -> float:
    """Closed-loop throughput of the Python load generator against the server, req/s."""
    argv = python_load(target, "--mode", "closed", "--conns", str(conns), "--duration", str(duration))
    return float(_run_json(pinned(argv, cpu), duration + RUN_SLACK_S)["throughput_rps"])


def run_python(target: str, rate: float, args, cpu: int | None) -> dict:
    argv = python_load(target, "--mode", "open", "--rate", f"{rate:.0f}", "--conns", str(args.conns),
                       "--duration", str(args.duration), "--warmup", str(args.warmup),
                       "--pipeline", str(args.pipeline), "--size", "64")
    r = _run_json(pinned(argv, cpu), args.warmup + args.duration + RUN_SLACK_S)
    lat, ol = r["latency_us"], r.get("open_loop", {})
    return {"client": "python", "count": lat["count"], **{k: lat[k] for k in ("p50", "p90", "p99", "p999", "max")},
            "uncorrected_p50": ol.get("uncorrected_latency_us", {}).get("p50"),
            "uncorrected_p99": ol.get("uncorrected_latency_us", {}).get("p99"),
            "sent": ol.get("sent"), "late": ol.get("late"), "unsent": ol.get("unsent"),
            "unanswered": ol.get("unanswered"), "errors": r.get("errors") or {},
            "loadgen_cpu_percent": r.get("loadgen_cpu_percent"),
            "cpu_busy_percent": r.get("machine", {}).get("cpu_busy_percent")}


def run_c(binary: Path, target: str, rate: float, args, cpu: int | None) -> dict:
    argv = [str(binary), "--target", target, "--rate", f"{rate:.0f}", "--conns", str(args.conns),
            "--duration", str(args.duration), "--warmup", str(args.warmup), "--pipeline", str(args.pipeline),
            "--size", "64", *(["--spin-us", str(args.c_spin_us)] if args.c_spin_us is not None else [])]
    r = _run_json(pinned(argv, cpu), args.warmup + args.duration + RUN_SLACK_S)
    keys = ("count", "p50", "p90", "p99", "p999", "max", "uncorrected_p50", "uncorrected_p99", "send_lag_p50",
            "send_lag_p99", "sent", "answered", "late", "unsent", "unanswered", "errors")
    return {"client": "c", **{k: r[k] for k in keys}}


# -- the table (pure: unit-tested with synthetic numbers) ----------------------------------------------

def spread(values: list[float]) -> dict:
    """Median, min and max of a non-empty list."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: list[dict]) -> list[dict]:
    """Rows of the table from individual runs.

    Each run is ``{"rate": R, "client": "python"|"c", "p50": µs, "p99": µs, "uncorrected_p50": µs (optional)}``.
    Per rate (ascending): one row per client present, ``{"rate", "client", "rounds", "p50": spread, "p99": spread,
    "uncorrected_p50": spread or None, "others_busy_percent": spread or None}``, then, when both clients ran,
    ``{"rate", "client": "python/c", "p50_ratio", "p99_ratio", "uncorrected_p50_ratio", "p50_paired", "p99_paired",
    "agree"}`` with the ratios of the medians
    (Python / C), the paired ratios (the median over rounds of Python / C within one round: the two runs of a
    round are back to back, so a slow drift of the machine's load cancels) and ``agree`` = p50 and p99 ratios
    of the medians both within AGREEMENT either way. Runs without a ``round`` key are not paired.
    """
    rows = []
    for rate in sorted({r["rate"] for r in runs}):
        medians = {}
        for client in CLIENTS:
            mine = [r for r in runs if r["rate"] == rate and r["client"] == client]
            if not mine:
                continue
            unc = [r["uncorrected_p50"] for r in mine if r.get("uncorrected_p50") is not None]
            others = [r["others_busy_percent"] for r in mine if r.get("others_busy_percent") is not None]
            row = {"rate": rate, "client": client, "rounds": len(mine),
                   "p50": spread([r["p50"] for r in mine]), "p99": spread([r["p99"] for r in mine]),
                   "uncorrected_p50": spread(unc) if unc else None,
                   "others_busy_percent": spread(others) if others else None}
            medians[client] = row
            rows.append(row)
        if len(medians) == len(CLIENTS):
            py, c = medians["python"], medians["c"]
            ratios = {f"{p}_ratio": ratio(py[p]["median"], c[p]["median"]) for p in ("p50", "p99")}
            agree = all(v is not None and 1 / AGREEMENT <= v <= AGREEMENT for v in ratios.values())
            both = py["uncorrected_p50"] and c["uncorrected_p50"]
            unc_ratio = ratio(py["uncorrected_p50"]["median"], c["uncorrected_p50"]["median"]) if both else None
            paired = {f"{p}_paired": paired_ratio([r for r in runs if r["rate"] == rate], p) for p in ("p50", "p99")}
            rows.append({"rate": rate, "client": "python/c", **ratios, "uncorrected_p50_ratio": unc_ratio, **paired,
                         "agree": agree})
    return rows


def paired_ratio(runs: list[dict], key: str) -> float | None:
    """Median over rounds of python[key] / c[key] within the same round; None without a complete round."""
    by_round: dict = {}
    for r in runs:
        if r.get("round") is not None:
            by_round.setdefault(r["round"], {})[r["client"]] = r[key]
    ratios = [ratio(t["python"], t["c"]) for t in by_round.values() if "python" in t and "c" in t]
    ratios = [x for x in ratios if x is not None]
    return statistics.median(ratios) if ratios else None


def ratio(a: float, b: float) -> float | None:
    """a / b, None when b is 0."""
    return a / b if b else None


def _num(x: float) -> str:
    return f"{x:,.0f}"


def format_table(rows: list[dict], fractions: dict | None = None) -> str:
    """A Markdown table of ``summarize``'s rows; ``fractions`` maps a rate to its share of capacity."""
    lines = ["| rate (req/s) | client | p50 µs median (min-max) | p99 µs median (min-max) "
             "| p50 from the actual send, µs | others' CPU % |",
             "|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        rate = f"{row['rate']:,.0f}"
        if fractions and row["rate"] in fractions:
            rate += f" ({fractions[row['rate']]:.0%})"
        if row["client"] == "python/c":
            cells = [(f"**{row[k]:.2f}x**" if row[k] is not None else "n/a")
                     + (f" (paired {row[q]:.2f}x)" if row.get(q) is not None else "")
                     for k, q in (("p50_ratio", "p50_paired"), ("p99_ratio", "p99_paired"))]
            unc = row.get("uncorrected_p50_ratio")
            lines.append(f"| {rate} | Python / C | {cells[0]} | {cells[1]} | {f'{unc:.2f}x' if unc else 'n/a'} | |")
        else:
            cells = [f"{_num(s['median'])} ({_num(s['min'])}-{_num(s['max'])})" for s in (row["p50"], row["p99"])]
            unc = _num(row["uncorrected_p50"]["median"]) if row.get("uncorrected_p50") else "n/a"
            others = f"{row['others_busy_percent']['median']:.0f}" if row.get("others_busy_percent") else "n/a"
            lines.append(f"| {rate} | {row['client']} | {cells[0]} | {cells[1]} | {unc} | {others} |")
    return "\n".join(lines)


# -- the comparison ----------------------------------------------------------------------------------

def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs together since boot (the kernel's first ``cpu`` line).

    Busy is user + nice + system + steal; idle, iowait, irq and softirq are not
    busy (loopback traffic's own softirq work is accounted to no process, so
    counting it would charge this benchmark's traffic to "others").
    """
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    busy = user + nice + system + steal
    return busy, busy + idle + iowait + irq + softirq


def others_percent(before: tuple[int, int], after: tuple[int, int], ours_cpu_s: float, wall_s: float,
                   ncpu: int) -> float:
    """The share of all CPUs (0-100) that other work used during a run: the machine's busy share minus ours."""
    total = after[1] - before[1]
    if total <= 0 or wall_s <= 0:
        return 0.0
    busy = 100.0 * (after[0] - before[0]) / total
    ours = 100.0 * ours_cpu_s / (wall_s * ncpu)
    return round(max(0.0, busy - ours), 1)


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(server, fn) -> dict:
    """Run ``fn()`` (a client run) and add ``others_busy_percent``: other work's share of the machine meanwhile."""
    stat0, wall0, server0, child0 = cpu_jiffies(), time.monotonic(), server.cpu_seconds(), children_cpu_s()
    result = fn()
    ours = (server.cpu_seconds() - server0) + (children_cpu_s() - child0)
    result["others_busy_percent"] = others_percent(stat0, cpu_jiffies(), ours, time.monotonic() - wall0,
                                                   os.cpu_count() or 1)
    return result


def quiet_rounds(runs: list[dict], limit: float) -> list[dict]:
    """The runs of the rounds in which other work used at most ``limit`` % of the machine during both runs."""
    noisy = {(r["rate"], r.get("round")) for r in runs if r.get("others_busy_percent", 0.0) > limit}
    return [r for r in runs if (r["rate"], r.get("round")) not in noisy]


def default_backend() -> str:
    from conclab.servers import unavailable_reason
    return "go" if unavailable_reason("go") is None else "epoll"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="See docs/loadgen.md, 'Agreement with an independent open-loop client'.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backend", help="server backend (default: go, else epoll)")
    parser.add_argument("--fractions", default="0.25,0.5", help="rates as fractions of the closed-loop capacity")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per rate (each runs both clients once)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="discarded seconds before each run")
    parser.add_argument("--conns", type=int, default=50, help="connections, both clients")
    parser.add_argument("--pipeline", type=int, default=1, help="requests in flight per connection, both clients")
    parser.add_argument("--c-spin-us", type=float, default=None,
                        help="C client: poll instead of sleeping this many µs before each slot (default: the "
                             "program's, 50; 0: sleep until each slot, as the Python client does)")
    parser.add_argument("--capacity", type=float, help="skip the closed-loop measurement and use this req/s")
    parser.add_argument("--quiet-below", type=float, default=25.0,
                        help="a second table keeps only the rounds in which other work used at most this share "
                             "of all CPUs (%%) during both runs")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server and clients to CPUs 0 and 1")
    parser.add_argument("--out", default=str(REPO / "results" / "openloop_agreement.json"), help="JSON of every run")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from conclab.servers.launcher import ServerProcess

    backend = args.backend or default_backend()
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    server_cpus, client_cpu = (None, None) if args.no_pin else ([SERVER_CPU], CLIENT_CPU)
    if not args.no_pin and len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPUs (server on CPU 0, clients on CPU 1), or --no-pin")
    binary = build()
    report = {"backend": backend, "args": vars(args), "binary": binary.name, "loadavg_before": loadavg(), "runs": []}
    started = time.monotonic()
    with ServerProcess(backend, ["--max-conns", "20000"], cpus=server_cpus) as server:
        cap = args.capacity or capacity(server.target, client_cpu)
        report["capacity_rps"] = cap
        rates = {round(cap * f): f for f in fractions}
        where = (f"{backend} on CPU {SERVER_CPU}, clients on CPU {client_cpu}" if server_cpus
                 else f"{backend} and clients unpinned")
        print(f"{where}; closed-loop capacity {cap:,.0f} req/s; load average {report['loadavg_before']}", flush=True)
        for rate, fraction in rates.items():
            for i in range(args.rounds):
                order = CLIENTS if i % 2 == 0 else CLIENTS[::-1]
                for client in order:
                    run = measured(server, (lambda: run_python(server.target, rate, args, client_cpu))
                                   if client == "python" else
                                   (lambda: run_c(binary, server.target, rate, args, client_cpu)))
                    run.update(rate=rate, fraction=fraction, round=i + 1, loadavg=loadavg())
                    report["runs"].append(run)
                    print(f"  {rate:>8,} req/s round {i + 1} {client:<6} p50 {run['p50']:>8} p99 {run['p99']:>9} "
                          f"max {run['max']:>9} unc.p50 {run['uncorrected_p50']} sent {run['sent']} "
                          f"late {run['late']} unanswered {run['unanswered']} errors {run['errors'] or 0}  "
                          f"load {run['loadavg'][0]}  others {run['others_busy_percent']}%", flush=True)
    report["loadavg_after"] = loadavg()
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    rows = summarize(report["runs"])
    report["rows"] = rows
    print(f"\nall {args.rounds} rounds:")
    print(format_table(rows, rates))
    quiet = quiet_rounds(report["runs"], args.quiet_below)
    report["quiet_rows"] = summarize(quiet)
    rounds = len({(r["rate"], r["round"]) for r in quiet})
    print(f"\nthe {rounds} of {len(rates) * args.rounds} rounds in which other work used at most "
          f"{args.quiet_below:g}% of the machine during both runs:")
    print(format_table(report["quiet_rows"], rates) if quiet else "(none)")
    print(f"\nload average before {report['loadavg_before']}, after {report['loadavg_after']}; "
          f"agreement aim: Python / C within {AGREEMENT}x for p50 and p99")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
