"""The article's claims against this run's numbers, and the performance targets, met or missed.

``claims(run)`` returns one row per statement of the article the lab answers
(docs/article.md: goroutine ~2 KB vs thread ~1 MB; a thread switch costs
more than a coroutine switch; a pool caps concurrency; epoll/netpoll enables
C10K) with what was measured and a verdict decided from the numbers.
``targets(run)`` checks targets.csv against the lab's performance targets.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from . import derive, findings
from .fmt import num

# The article's figures (docs/article.md).
GOROUTINE_STACK_KIB = 2
THREAD_STACK_KIB = 1024
CLAIM_FACTOR = 4                 # a measurement within this factor of the claimed figure "agrees"
CEILING_SLACK = 0.10             # the pool "is capped" if it stays within 10% of workers / wait...
UNCAPPED_FACTOR = 1.5            # ...while some other model beats that ceiling by at least this factor
C10K = 10_000
COROUTINE_BENCHES = ("goroutine", "greenlet", "generator", "asyncio", "uvloop")
EVENT_VARIANTS = ("epoll", "go", "asyncio", "uvloop", "gevent")     # built on epoll (or netpoll, libuv, libev)

# The lab's performance targets: variant -> threshold.
THROUGHPUT_TARGETS = {"uvloop": 1.0, "epoll": 0.9, "threads": 0.6, "threadpool": 0.6, "gevent": 0.55,
                      "asyncio": 0.3}
MEMORY_TARGETS_KIB = {"epoll": 1.0, "uvloop": 2.5, "asyncio": 4.0, "gevent": 12.0, "go": 12.0, "threads": 32.0}
TARGET_POINT_CONNS = 50


@dataclass
class Claim:
    claim: str
    measured: str
    verdict: str


def _thread_kernel(threads: dict) -> str:
    """", plus N KiB of kernel stack and M KiB of page tables (not in RSS)" where the kernel was measured."""
    stack, pte = threads.get("kernel_stack_kib"), threads.get("kernel_pte_kib")
    if stack is None or pd.isna(stack):
        return ""
    return (f", plus {num(stack)} KiB of kernel stack" + (f" and {num(pte)} KiB of page tables" if pd.notna(pte)
                                                           else "") + " (kernel memory, not in RSS)")


def _slopes(run) -> dict:
    s = derive.memory_slopes(run)
    return s.set_index("variant").to_dict("index") if not s.empty else {}


def memory_claims(run) -> list:
    slopes = _slopes(run)
    go, threads = slopes.get("go"), slopes.get(derive.THREAD_VARIANT)
    out = []
    if go is None:
        out.append(Claim("A goroutine costs about 2 KB", "go was not measured in this run", "not measured"))
    else:
        g = go["rss_kib"]
        agrees = g <= GOROUTINE_STACK_KIB * CLAIM_FACTOR
        out.append(Claim("A goroutine costs about 2 KB",
                         f"go: {num(g)} KiB of RSS per idle connection (goroutine stack, read buffer, runtime "
                         "bookkeeping; the socket and its buffers are kernel memory, not in RSS)",
                         "agrees" if agrees else f"a connection costs {num(g / GOROUTINE_STACK_KIB)}× the 2 KB "
                         "stack: the stack is only part of it"))
    if threads is None:
        out.append(Claim("An OS thread costs about 1 MB", "threads was not measured in this run", "not measured"))
    else:
        t, v = threads["rss_kib"], threads.get("vms_kib")
        resident = t * CLAIM_FACTOR >= THREAD_STACK_KIB
        reserved = pd.notna(v) and v * CLAIM_FACTOR >= THREAD_STACK_KIB
        verdict = ("agrees" if resident else "only as reserved address space (VMS), not as memory used (RSS)"
                   if reserved else "does not hold here")
        out.append(Claim("An OS thread costs about 1 MB",
                         f"threads: {num(t)} KiB RSS and {num(v / 1024) if pd.notna(v) else '–'} MiB VMS per "
                         "connection (one thread each)" + _thread_kernel(threads), verdict))
    if go is not None and threads is not None and go["rss_kib"] > 0:
        out.append(lightness_claim(threads["rss_kib"], go["rss_kib"],
                                   (threads.get("rss_kib_min"), threads.get("rss_kib_max")),
                                   (go.get("rss_kib_min"), go.get("rss_kib_max"))))
    return out


def lightness_claim(thread_kib: float, go_kib: float, thread_range=None, go_range=None) -> Claim:
    """``thread_range``, ``go_range``: (min, max) of each slope over the rounds; a tie within noise is no "lighter"."""
    claimed = THREAD_STACK_KIB / GOROUTINE_STACK_KIB
    r = thread_kib / go_kib
    heavier = derive.compare_medians(thread_range if _pair(thread_range) else thread_kib,
                                     go_range if _pair(go_range) else go_kib) == derive.HIGHER
    if heavier and r * CLAIM_FACTOR >= claimed:
        verdict = "agrees"
    elif r > 1 and not heavier:
        verdict = "does not hold here: threads and goroutines cost the same RSS per connection within noise"
    elif r > 1:
        verdict = f"goroutines are lighter, but by {num(r)}×, not about {num(claimed)}×"
    else:
        verdict = "does not hold here: a goroutine's connection is not lighter in resident memory"
    return Claim(f"So goroutines are far lighter than threads (about {num(claimed)}×)",
                 f"RSS per connection: threads {num(thread_kib)} KiB / go {num(go_kib)} KiB = {num(r)}×", verdict)


def _pair(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(v is not None and pd.notna(v) for v in value)


THREAD_SWITCHES = {"futex": "kernel thread switch (futex, one CPU)",        # what the claim is about...
                   "thread": "Python thread hand-off (a lock and the GIL)"}    # ...else Python's own, labelled


def switch_claim(run) -> Claim:
    """The article's switch claim: an OS thread switch against each coroutine switch measured (pinned rows: one
    core). The baseline is the bare kernel switch (futex ping-pong); where it was not measured, Python's thread
    hand-off, said so. Each coroutine is "cheaper" only where the intervals over rounds separate."""
    micro = derive.switch_micro(run)
    costs = findings.switch_costs(micro)
    name = "Switching threads (kernel) costs more than switching coroutines (user space)"
    coroutines = {b: costs[b] for b in COROUTINE_BENCHES if b in costs}
    base = next((b for b in THREAD_SWITCHES if b in costs), None)
    if base is None or not coroutines:
        return Claim(name, "the switch microbenchmarks were not run", "not measured")
    rows = {b: micro[micro.bench == b].sort_values("pinned", ascending=False).iloc[0] for b in [base, *coroutines]}
    cheaper = {b: derive.compare_medians(rows[base], rows[b], "ns_per_switch") == derive.HIGHER for b in coroutines}
    parts = [f"{b} {num(ns)} ns (" + (f"{num(costs[base] / ns)}× cheaper" if cheaper[b] else "a tie within noise")
             + ")" for b, ns in coroutines.items()]
    context = [f"{THREAD_SWITCHES[b]} {num(costs[b])} ns" for b in THREAD_SWITCHES if b in costs and b != base]
    beaten = sum(cheaper.values())
    verdict = "holds" if beaten == len(coroutines) else "partly holds" if beaten else "does not hold here"
    return Claim(name, f"{THREAD_SWITCHES[base]} {num(costs[base])} ns; " + "; ".join(parts)
                 + "".join(f" (for comparison: {c})" for c in context), verdict)


def pool_claim(run) -> Claim:
    name = "A thread pool caps concurrency (and so the resources used)"
    everything = derive.io_bound(run)
    io = derive.valid(everything)                       # an invalid point is never the peak or the rival
    pools = io[io.variant.str.startswith(derive.POOL_BACKEND) & io.workers.notna()] if not io.empty else io
    if pools.empty:
        why = ("io_bound has no valid point of a thread pool in this run" if not everything.empty and
               everything.variant.str.startswith(derive.POOL_BACKEND).any() else
               "io_bound was not measured with a thread pool in this run")
        return Claim(name, why, "not measured")
    best = pools.loc[pools.throughput_rps.idxmax()]
    ceiling = best.workers / (best.io_us / 1e6)
    others = io[~io.variant.str.startswith(derive.POOL_BACKEND)]
    top = others.loc[others.throughput_rps.idxmax()] if not others.empty else None
    measured = (f"io_bound: {best.variant} ({num(best.workers)} workers) peaked at {num(best.throughput_rps)} rps, "
                f"ceiling workers / wait = {num(ceiling)} rps")
    if top is not None:
        measured += f"; {top.variant} reached {num(top.throughput_rps)} rps at {num(top.conns)} connections"
    # against the model's ceiling (a number): "above" only where the median's interval clears it
    capped = derive.compare_medians(best, ceiling * (1 + CEILING_SLACK), "throughput_rps") != derive.HIGHER
    binding = top is not None and \
        derive.compare_medians(top, ceiling * UNCAPPED_FACTOR, "throughput_rps") == derive.HIGHER
    unserved = _pool_unserved(everything)
    if unserved is not None:
        measured += (f"; {unserved.variant} served only {num(unserved.conns_served)} of {num(unserved.conns)} "
                     "connections in its measured window (that point is left out as invalid)")
    c10k_starved = _pool_starved_in_c10k(run)
    if c10k_starved:
        measured += f"; c10k: the {c10k_starved} probe got no answer while the workers held idle connections"
    starved = bool(c10k_starved) or unserved is not None
    verdict = "holds" if capped and (binding or starved) else "holds (the cap was not reached)" if capped \
        else "does not hold here"
    return Claim(name, measured, verdict)


def _pool_unserved(io: pd.DataFrame):
    """The io_bound pool point that served the smallest share of its connections (None: every one was served)."""
    if io.empty:
        return None
    pools = io[io.variant.str.startswith(derive.POOL_BACKEND) & (io.conns_served < io.conns)]
    return pools.loc[(pools.conns_served / pools.conns).idxmin()] if not pools.empty else None


def _pool_starved_in_c10k(run) -> str | None:
    c = derive.c10k(run)
    rows = c[(c.variant == derive.POOL_BACKEND) & (c.requests.fillna(0) == 0)] if not c.empty else c
    return rows.iloc[0].variant if not rows.empty else None


def _c10k_row(r, ok: bool) -> str:
    text = f"{r.variant} held {num(r.held)}/{num(r.hold_target)}"
    if r.connect_errors:
        text += f", {num(r.connect_errors)} failed"
    if not r.requests:
        text += ", probe starved"
    return text + f", {num(r.rss_kib / 1024)} MiB" + ("" if ok else " (not C10K-capable here)")


def c10k_claim(run) -> Claim:
    name = "epoll / Go's netpoll make C10K (10,000 connections) possible"
    c = derive.c10k(run)
    if c.empty:
        return Claim(name, "c10k was not measured in this run", "not measured")
    ok = (c.held >= findings.HELD_FRACTION * c.hold_target) & (c.connect_errors.fillna(0) == 0) & \
        (c.requests > 0) & (c.errors.fillna(0) == 0)
    events = ok[c.variant.isin(EVENT_VARIANTS)]
    if events.empty:
        verdict = "not measured (no event-loop backend ran)"
    elif events.all():
        verdict = "holds" + _threads_too(c, ok)
    else:
        verdict = "partly holds" if events.any() else "does not hold here"
    if c.hold_target.max() < C10K:
        verdict += f"; only {num(c.hold_target.max())} connections in this profile, not a C10K test"
    return Claim(name, "; ".join(_c10k_row(r, good) for r, good in zip(c.itertuples(), ok)), verdict)


def _threads_too(c: pd.DataFrame, ok: pd.Series) -> str:
    """' (but threads held them too: X MiB vs Y MiB)' when the thread-per-connection server also managed."""
    threads = c[(c.variant == derive.THREAD_VARIANT) & ok]
    if threads.empty:
        return ""
    events = c[c.variant.isin(EVENT_VARIANTS) & ok]
    lightest = events.sort_values("rss_kib").iloc[0]
    ties = derive.tied_with(events, lightest, "rss_kib")
    return (f" (but one thread per connection held them too: {num(threads.iloc[0].rss_kib / 1024)} MiB vs "
            f"{num(lightest.rss_kib / 1024)} MiB for {lightest.variant}"
            + (f", within noise of {', '.join(ties)}" if ties else "") + ")")


def claims(run) -> list:
    return [*memory_claims(run), switch_claim(run), pool_claim(run), c10k_claim(run)]


# -- targets --------------------------------------------------------------------------------------

def targets(run) -> pd.DataFrame:
    """One row per (target, variant): value, goal, met/missed/not measured, and how it was measured."""
    t = run.tables["targets"]
    rows = []
    for target, goals, op in (("throughput_ratio_to_go", THROUGHPUT_TARGETS, ">="),
                              ("rss_kib_per_idle_conn", MEMORY_TARGETS_KIB, "<=")):
        got = t[t.target == target].set_index("variant") if not t.empty else pd.DataFrame()
        for variant, goal in goals.items():
            row = got.loc[variant] if variant in got.index else None
            value = row["value"] if row is not None else None
            if target == "throughput_ratio_to_go" and _invalid_reference(run, variant):
                value = None                                # never a target met or missed on an invalid point
            rows.append({"target": target, "variant": variant, "value": value,
                         "goal": f"{op} {num(goal)}", "status": _status(value, goal, op),
                         "detail": _detail(run, target, variant, row)})
    return pd.DataFrame(rows)


def _invalid_reference(run, variant: str) -> str:
    """'threadpool (served 6 of 50 connections)' when the variant's or go's reference point is invalid, else ''."""
    bad = derive.invalid(derive.at_reference(run))
    bad = bad[bad.variant.isin([variant, "go"])]
    return ", ".join(f"{r.variant} ({r.invalid_reason})" for r in bad.itertuples())


def _status(value, goal, op) -> str:
    if value is None or pd.isna(value):
        return "not measured"
    met = value >= goal if op == ">=" else value <= goal
    return "met" if met else "missed"


def _detail(run, target, variant, row) -> str:
    detail = "" if row is None or pd.isna(row.get("detail")) else str(row["detail"])
    if row is None:
        skipped = run.skipped[run.skipped.variant == variant] if not run.skipped.empty else run.skipped
        detail = skipped.iloc[0].reason if not skipped.empty else f"{variant} was not measured in this run"
    if target == "throughput_ratio_to_go":
        bad = _invalid_reference(run, variant)
        if bad:
            detail += f"; the reference point is invalid for {bad}: no ratio"
        conns = derive.reference_conns(run)
        if conns != TARGET_POINT_CONNS:
            detail += f"; this profile's reference point is {conns} connections, not {TARGET_POINT_CONNS}"
    return detail
