"""Experiment 7, c10k: hold 10,000 idle connections, and measure p99 of a small closed loop meanwhile.

Every backend is asked to keep 10,000 connections open (``--max-conns`` above
that, a long idle timeout) while a few more connections run a closed loop of
64 B ECHO. Each row says how many the server accepted, how many the
generator could not open (connect failures), what the probe got (requests,
errors, p50/p99/p99.9) and what holding cost (RSS, VMS, threads, fds).

The connection-dispatch thread pool is the interesting failure: each worker
owns a connection until it closes, so with W workers only the first W
connections are ever served; the other connections are accepted and wait in
the pool's queue (or, if the pool stops accepting, in the kernel's backlog)
and the probe, arriving last, gets no reply at all. ``note`` spells out what
happened in words.
"""
from __future__ import annotations

import time

from . import holding
from .harness import loadproc
from .harness.run import HELD_STOP_GRACE_S, key

NAME = "c10k"
IDLE_TIMEOUT_S = 3600.0
CONN_MARGIN = 100
PROBE_STARTUP_S = 1.0          # the probe generator's own start-up, inside the hold window


def run(run) -> None:
    run.each_variant(NAME, lambda variant, repeat: measure_variant(run, variant, repeat))


def measure_variant(run, variant, repeat: int) -> None:
    profile = run.profile
    n, probe_conns = profile.c10k_conns, profile.c10k_probe_conns
    started = time.monotonic()
    with run.serve(NAME, variant, repeat, track_ctx=False, max_conns=n + probe_conns + CONN_MARGIN,
                   idle_timeout=IDLE_TIMEOUT_S, stop_grace=HELD_STOP_GRACE_S) as server:
        server.sampler.point = f"hold={n}"
        window = profile.point_s + profile.warmup_s + PROBE_STARTUP_S + holding.measure_window(run)
        h = holding.hold(run, server, n, window)
        gauges, probe, failure = {}, {}, None
        try:
            probe, failure = run_probe(run, server, probe_conns)
            gauges = holding.gauges(server)
        finally:
            server.sampler.stop()              # before thousands of connections (and threads) go away
            clean = h.held >= n and bool(probe.get("requests")) and failure is None
            result, connect_errors = holding.release(h, gauges.get("tcp_established"), clean)
    row = {**key(NAME, variant, repeat), "hold_target": n, "held": h.held, "connect_errors": connect_errors,
           "probe_conns": probe_conns, **{k: probe.get(k) for k in ("requests", "errors", "throughput_rps",
                                                                  "p50_us", "p99_us", "p999_us", "max_us",
                                                                  "loadgen_saturated")},
           **{k: gauges.get(k) for k in ("rss_kib", "vms_kib", "threads", "fds", "tcp_established",
                                         "tcp_close_wait")},
           "workers": profile.pool_workers if variant.is_pool else None}
    row["note"] = note(variant, row, failure, profile.pool_workers, loadproc.failure_reasons(result),
                       probe.get("conns_served"))
    run.write(NAME, row)
    p99 = probe.get("p99_us")
    run.progress(f"[{NAME}] {variant.name} r{repeat}: held {h.held}/{n} in {h.ramp_s:.1f} s, connect failures "
                 f"{connect_errors}, probe {probe.get('requests', 0)} requests p99 "
                 f"{'-' if p99 is None else f'{p99 / 1000:.2f} ms'}; {row['note']} "
                 f"({time.monotonic() - started:.1f} s)")


def run_probe(run, server, conns: int) -> tuple[dict, str | None]:
    """The small closed loop; (its LOAD columns, None) or ({}, why it failed)."""
    server.sampler.point = "probe"
    try:
        result = loadproc.run_loadgen(server.target, "closed", conns, run.profile.point_s, size=run.profile.size,
                               op="echo", **run.load_options())
    except loadproc.LoadgenError as exc:
        return {}, str(exc)
    return loadproc.flatten(result), None


def note(variant, row: dict, failure: str | None, workers: int, reasons: dict, served: int | None = None) -> str:
    """What happened, in words (``served``: probe connections that got a reply, if the generator says)."""
    parts = []
    if row["held"] < row["hold_target"]:
        parts.append(f"server accepted {row['held']} of {row['hold_target']}")
    if row.get("connect_errors"):
        why = ", ".join(f"{kind}: {count}" for kind, count in sorted(reasons.items()) if count)
        parts.append(f"{row['connect_errors']} held connections failed" + (f" ({why})" if why else ""))
    if failure:
        parts.append(f"probe failed: {failure}")
    elif not row.get("requests"):
        why = (f": its {workers} workers each own an idle held connection, every other connection waits"
               if variant.is_pool and "request" not in variant.name else "")
        parts.append(f"probe starved (no reply){why}")
    elif served is not None and served < row["probe_conns"]:
        parts.append(f"probe served {served} of {row['probe_conns']} connections")
    elif row.get("errors"):
        parts.append(f"probe had {row['errors']} errors")
    return "; ".join(parts) or "all held, probe served"
