"""Does one client get its rate once across processes? (a benchmark, not a test)

    python benchmarks/shared_limit.py                       # every variant, R = 1,000 req/s, 3 x 10 s
    python benchmarks/shared_limit.py --backends go,asyncio --duration 5 --rounds 1

A client limited to R requests/s should get R from the whole service, however
many processes serve it. For every variant, two server processes share one
real redis-server (``--procs 2``; go, which has no --procs, runs as two
servers), each with ``--rate-limit R --rate-limit-mode reject
--rate-limit-scope client --rate-limit-store redis://...``. ``--threads``
client threads (half on each process, as the STATS pid of each connection
says: one that lands on a process with its half already is opened again) send
ECHOs back to back for ``--duration`` seconds, far above R. Every request is
answered: ECHO (admitted) or ERROR "rate limited".

A token bucket of rate R and burst B admits at most B + R x T in T seconds,
and exactly that when it is kept busy, so the measured rate is
(admitted - B) / T, T from the first request sent to the last reply read.
The target: within 2 % of R. The same run with the in-process store
(``--rate-limit-store memory``, a bucket per process) is the contrast: about
2R. A run with any store error (``rate_store_errors`` > 0, a Redis call past
its 50 ms deadline, answered by the fail-open verdict) is reported and does
not count.

Results are printed and written as JSON to ``--out`` (default
results/ratelimit/shared_limit.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from conclab.servers import protocol, select_variants  # noqa: E402
from conclab.servers.client import Client  # noqa: E402
from conclab.servers.launcher import ServerProcess, ServerStartError  # noqa: E402
from conclab.servers.redis_process import RedisProcess, find_binary  # noqa: E402

SERVER_CPU, CLIENT_CPU = 0, 1
TARGET_WITHIN = 0.02                 # |measured / R - 1|
STORES = ("redis", "memory")
BALANCE_TRIES = 40                   # connections opened at most to place one on the process that needs it


def server_options(store_url: str, rate: int, burst: int) -> list[str]:
    return ["--rate-limit", str(rate), "--burst", str(burst), "--rate-limit-mode", "reject",
            "--rate-limit-scope", "client", "--rate-limit-store", store_url]


def start_two(variant, options: list[str]) -> list[ServerProcess]:
    """Two processes serving the variant: one server with --procs 2, or two go servers."""
    base = [*variant.options, *options]
    if variant.backend == "go":
        return [ServerProcess("go", base, cpus=[SERVER_CPU]) for _ in range(2)]
    return [ServerProcess(variant.backend, [*base, "--procs", "2"], cpus=[SERVER_CPU])]


def open_clients(servers: list[ServerProcess], count: int) -> list[Client]:
    """``count`` connections, half on each process: with one --procs server, a connection that lands on a
    process which has its half already is closed and opened again (the kernel picks the process)."""
    clients, per_process = [], {}
    for i in range(count):
        server = servers[i % len(servers)]
        for _ in range(BALANCE_TRIES):
            client = Client((server.host, server.port))
            process = (i % len(servers), client.stats()["pid"])
            if per_process.get(process, 0) < count // 2:
                break
            client.close()
        else:
            for client in clients:
                client.close()
            raise RuntimeError(f"{BALANCE_TRIES} connections in a row reached a process that had its half")
        per_process[process] = per_process.get(process, 0) + 1
        clients.append(client)
    return clients


def hammer(client: Client, until: float, counts: dict, lock: threading.Lock) -> None:
    """ECHO back to back until ``until``: count admitted and rate-limited replies."""
    echoed = limited = 0
    while time.monotonic() < until:
        op, payload = client.request(protocol.ECHO, b"x")
        if op == protocol.ECHO:
            echoed += 1
        elif (op, payload) == (protocol.ERROR, b"rate limited"):
            limited += 1
        else:
            raise RuntimeError(f"unexpected reply {op:#x} {payload!r}")
    with lock:
        counts["echoed"] += echoed
        counts["limited"] += limited


def one_run(variant, store: str, redis: RedisProcess, args) -> dict:
    url = redis.url if store == "redis" else "memory"
    redis.call("FLUSHALL")
    servers = start_two(variant, server_options(url, args.rate, args.burst))
    try:
        clients = open_clients(servers, args.threads)
        before = sum(s.stats()["rate_store_errors"] for s in servers)
        counts, lock = {"echoed": 0, "limited": 0}, threading.Lock()
        began = time.monotonic()
        threads = [threading.Thread(target=hammer, args=(c, began + args.duration, counts, lock)) for c in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        took = time.monotonic() - began
        store_errors = sum(s.stats()["rate_store_errors"] for s in servers) - before
        for client in clients:
            client.close()
    finally:
        for server in servers:
            server.close()
    admitted_rps = (counts["echoed"] - args.burst) / took
    return {"variant": variant.name, "store": store, "rate": args.rate, "burst": args.burst, "seconds": round(took, 3),
            **counts, "offered_rps": round((counts["echoed"] + counts["limited"]) / took),
            "admitted_rps": round(admitted_rps, 1), "ratio": round(admitted_rps / args.rate, 4),
            "store_errors": store_errors}


def summarize(runs: list[dict]) -> list[dict]:
    """Per (variant, store): the median ratio of the valid runs, its spread, and the 2 % verdict (redis store)."""
    rows = []
    for key in dict.fromkeys((r["variant"], r["store"]) for r in runs):
        valid = [r["ratio"] for r in runs if (r["variant"], r["store"]) == key and r["store_errors"] == 0]
        row = {"variant": key[0], "store": key[1], "runs": len(valid),
               "ratio": statistics.median(valid) if valid else None,
               "min": min(valid, default=None), "max": max(valid, default=None)}
        row["within_2pct"] = (None if key[1] != "redis" or not valid
                              else all(abs(v - 1) <= TARGET_WITHIN for v in valid))
        rows.append(row)
    return rows


def format_row(row: dict) -> str:
    if row["ratio"] is None:
        return f"  {row['variant']:<19} {row['store']:<6} no valid run"
    verdict = {True: "within 2 %", False: "NOT within 2 %", None: ""}[row["within_2pct"]]
    return (f"  {row['variant']:<19} {row['store']:<6} {row['ratio']:.4f} x R "
            f"(runs {row['runs']}: {row['min']:.4f} .. {row['max']:.4f})  {verdict}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--backends", help="variants (default all)")
    p.add_argument("--rate", type=int, default=1000, help="R, requests/s per client (default 1000)")
    p.add_argument("--burst", type=int, default=10, help="B, the bucket's size (default 10)")
    p.add_argument("--threads", type=int, default=8, help="client connections, one thread each (default 8)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="runs per variant and store, interleaved (default 3)")
    p.add_argument("--out", default=str(REPO / "results" / "ratelimit" / "shared_limit.json"))
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        variants = [v for v in select_variants(args.backends) if v.unavailable() is None]
        find_binary()
    except (ValueError, RuntimeError) as exc:
        print(f"shared_limit: {exc}", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {CLIENT_CPU})
    runs = []
    with RedisProcess(cpus=[SERVER_CPU]) as redis:
        for round_number in range(1, args.rounds + 1):
            for variant in variants:
                for store in STORES:
                    try:
                        run = one_run(variant, store, redis, args)
                    except (ServerStartError, RuntimeError, OSError) as exc:
                        print(f"  {variant.name} {store} round {round_number}: {exc}", file=sys.stderr)
                        continue
                    runs.append({"round": round_number, **run})
                    print(f"[round {round_number}] {variant.name:<19} {store:<6} admitted {run['admitted_rps']:>8.1f}/s "
                          f"= {run['ratio']:.4f} x R  offered {run['offered_rps']}/s  store errors {run['store_errors']}",
                          flush=True)
    rows = summarize(runs)
    print(f"one client, R = {args.rate}/s, B = {args.burst}, two processes, {args.threads} connections, "
          f"{args.rounds} x {args.duration:g} s: admitted rate / R")
    for row in rows:
        print(format_row(row))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"parameters": vars(args), "runs": runs, "summary": rows}, indent=1) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
