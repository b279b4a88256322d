"""The sentence under each chart, computed from the derived frames (analysis.derive).

Every function takes frames and returns a ``Finding`` (analysis.fmt): a title
that states the result, a short text, and the facts (numbers in the units the
text shows: ms, MiB, KiB, rps, ns) they were written from. Which backend is
best or worst, whether a claim holds: all of it is decided here from the
numbers, never written in advance.

Only valid points are ranked or quoted (``derive.valid``); the invalid ones of a
frame (a connection never served, requests unanswered, a saturated load
generator) get a sentence saying they were left out and why (``_left_out``).
"""
from __future__ import annotations

import pandas as pd

from conclab.experiments import registry

from . import derive
from .fmt import Builder, Finding, nothing

MIN_SLOPE_KIB = 0.25             # a per-connection slope below this is "no measurable growth"
VMS_RESERVED_KIB = 1024          # VMS growth per thread at least this (1 MiB): address space is reserved...
RSS_TOUCHED_KIB = 256            # ...while RSS growth below this means little of it is touched
HELD_FRACTION = 0.99             # held at least this fraction of the target = "held them all"


def _extremes(frame: pd.DataFrame, column: str):
    """(row of the minimum, row of the maximum) of one column, ignoring missing values."""
    f = frame.dropna(subset=[column])
    if f.empty:
        return None, None
    return f.loc[f[column].idxmin()], f.loc[f[column].idxmax()]


def _why(row) -> tuple[str, dict]:
    """Why one invalid point was left out, as a template and its facts."""
    parts, facts = [], {}
    served, conns = getattr(row, "conns_served", None), getattr(row, "conns", None)
    if pd.notna(served) and pd.notna(conns) and served < conns:
        parts.append("served {served} of {conns} connections")
        facts.update(served=served, conns=conns)
    unanswered = getattr(row, "unanswered", None)
    if pd.notna(unanswered) and unanswered > 0:
        parts.append("{unanswered} requests unanswered")
        facts.update(unanswered=unanswered)
    if getattr(row, "saturated", 0) > 0:
        parts.append("the load generator was saturated")
    return ", ".join(parts) or "marked invalid in the table", facts


def _left_out(b: Builder, frame: pd.DataFrame) -> list:
    """A sentence per variant with invalid points in ``frame`` (the worst one's reasons); their names."""
    bad = derive.invalid(frame)
    if bad.empty:
        return []
    for variant, rows in bad.groupby("variant", sort=False):
        share = (rows.conns_served / rows.conns) if {"conns_served", "conns"} <= set(rows) else None
        worst = rows.loc[share.idxmin()] if share is not None and share.notna().any() else rows.iloc[0]
        why, facts = _why(worst)
        k = len(rows)
        b.add("{v}: " + ("{k} invalid point" if k == 1 else "{k} invalid points") + " left out (" + why + ").",
              prefix=f"invalid.{variant}.", v=variant, k=k, **facts)
    return list(dict.fromkeys(bad.variant))


def _names(variants) -> str:
    variants = list(variants)
    return ", ".join(variants[:-1]) + " and " + variants[-1] if len(variants) > 1 else "".join(variants)


# -- memory ---------------------------------------------------------------------------------------

def memory_growth(points: pd.DataFrame) -> Finding:
    if points.empty:
        return nothing("memory was not measured in this run")
    n = points.n_target.max()
    top = points[points.n_target == n]
    lo, hi = _extremes(top, "rss_kib")
    b = Builder()
    b.add("Holding {n} idle connections, the server's RSS ranged from {lo_mib} MiB ({lo}) to {hi_mib} MiB ({hi}).",
          n=n, lo_mib=lo.rss_kib / 1024, lo=lo.variant, hi_mib=hi.rss_kib / 1024, hi=hi.variant)
    for _, row in top.iterrows():
        if row.n_conns < HELD_FRACTION * n:
            b.add("{v} accepted only {held} of the {n}, so its line stops short.", prefix=f"{row.variant}.",
                  v=row.variant, held=row.n_conns, n=n)
    return b.finding("{hi} needs the most memory for {n} idle connections ({hi_mib} MiB), {lo} the least "
                     "({lo_mib} MiB)")


def memory_per_conn(slopes: pd.DataFrame) -> Finding:
    if slopes.empty or "rss_kib" not in slopes:
        return nothing("no memory fit in this run")
    lo, hi = _extremes(slopes, "rss_kib")
    b = Builder()
    b.add("Each idle connection adds {hi_kib} KiB of RSS with {hi} and {lo_kib} KiB with {lo}.",
          hi_kib=hi.rss_kib, hi=hi.variant, lo_kib=lo.rss_kib, lo=lo.variant)
    if lo.rss_kib >= MIN_SLOPE_KIB:
        b.add("That is {times}× more.", times=hi.rss_kib / lo.rss_kib)
    else:
        b.add("Below {floor} KiB the slope is within measurement noise of zero.", floor=MIN_SLOPE_KIB)
    return b.finding("An idle connection costs {hi_kib} KiB of RSS with {hi}, {lo_kib} KiB with {lo}")


def thread_vms(slopes: pd.DataFrame) -> Finding:
    row = slopes[slopes.variant == derive.THREAD_VARIANT] if not slopes.empty else slopes
    if row.empty or pd.isna(row.iloc[0].get("vms_kib")):
        return nothing(f"the {derive.THREAD_VARIANT} backend's memory was not measured in this run")
    r = row.iloc[0]
    b = Builder()
    b.add("Each connection of {v} (one OS thread each) added {vms_mib} MiB of virtual memory (VMS) "
          "and {rss_kib} KiB of resident memory (RSS).", v=r.variant, vms_mib=r.vms_kib / 1024, rss_kib=r.rss_kib)
    if r.vms_kib >= VMS_RESERVED_KIB and r.rss_kib < RSS_TOUCHED_KIB:
        b.add("The 'a thread costs {claim_mb} MB' figure is address space reserved for its stack, "
              "not memory in use: only the few KiB a thread touches become resident.", claim_mb=1)
        title = "A thread reserves {vms_mib} MiB of address space but uses only {rss_kib} KiB of RAM"
    else:
        title = "Per thread: {vms_mib} MiB of virtual memory, {rss_kib} KiB resident"
    return b.finding(title)


# -- latency --------------------------------------------------------------------------------------

SPECTRUM_SOURCE = "open loop at {fraction}× each backend's capacity"


def spectrum(points: pd.DataFrame, rows: pd.DataFrame, fraction, below_floor=None) -> Finding:
    """p99 across the variants; ``below_floor(delta_us)`` (analysis.trust) says when their spread is noise."""
    p99 = points[points.percentile == 99.0]
    if p99.empty:
        return nothing("no latency percentiles in this run")
    lo, hi = _extremes(p99, "latency_us")
    tail = points.loc[points.latency_us.idxmax()]
    b = Builder()
    if len(p99) == 1:
        b.add("Measured " + SPECTRUM_SOURCE + ": p99 {hi_ms} ms ({hi}); the slowest request took {max_ms} ms.",
              fraction=fraction, hi_ms=hi.latency_us / 1000, hi=hi.variant, max_ms=tail.latency_us / 1000)
        return b.finding("p99 latency: {hi} {hi_ms} ms (the only variant with a valid point)")
    b.add("Measured " + SPECTRUM_SOURCE + ": p99 from {lo_ms} ms ({lo}) to {hi_ms} ms ({hi}); the slowest "
          "request of all took {max_ms} ms ({max_v}).", fraction=fraction, lo_ms=lo.latency_us / 1000, lo=lo.variant,
          hi_ms=hi.latency_us / 1000, hi=hi.variant, max_ms=tail.latency_us / 1000, max_v=tail.variant)
    noise = below_floor is not None and below_floor(hi.latency_us - lo.latency_us)
    if noise:
        b.add("That spread, {spread_ms} ms, is below this run's latency floor: not a finding.",
              spread_ms=(hi.latency_us - lo.latency_us) / 1000)
    for _, r in rows[rows.throughput_rps < derive.KEEPUP * rows.offered_rps].iterrows():
        b.add("{v} answered only {rps} of the {offered} rps offered: its percentiles describe the requests it "
              "answered, not the ones left waiting.", prefix=f"{r.variant}.", v=r.variant, rps=r.throughput_rps,
              offered=r.offered_rps)
    return b.finding("p99 latency: {lo} {lo_ms} ms, {hi} {hi_ms} ms" + (", within the floor" if noise else ""))


def latency_load(lat: pd.DataFrame, knees: pd.DataFrame) -> Finding:
    if lat.empty:
        return nothing("latency under load was not measured in this run")
    b = Builder()
    everything, lat = lat, derive.valid(lat)
    if lat.empty:
        _left_out(b, everything)
        return b.finding("No backend has a valid latency point")
    bent = knees[knees["where"] == "in range"].set_index("variant").knee.astype(float)
    if not bent.empty:
        b.add("The knee, the highest offered rate before p99 grew over {factor}× its light-load value or the "
              "server answered less than {keepup}% of the offered rate: " +
              ("{hi} {hi_rps} rps." if len(bent) == 1 else "{hi} {hi_rps} rps, {lo} {lo_rps} rps."),
              factor=derive.KNEE_P99_FACTOR, keepup=derive.KEEPUP * 100, hi=bent.idxmax(), hi_rps=bent.max(),
              lo=bent.idxmin(), lo_rps=bent.min())
    top_fraction = lat.rate_fraction.max()
    kept = knees[knees["where"] == "beyond"].variant.tolist()
    if kept:
        b.add("{vs} kept up with every rate tested (up to {top_f}× capacity): no knee in range.", vs=_names(kept),
              top_f=top_fraction)
    none = knees[knees["where"] == "below"].variant.tolist()
    if none:
        b.add("{vs} did not keep up at any offered rate.", vs=_names(none))
    _left_out(b, everything)
    top = lat[lat.rate_fraction == top_fraction]
    if not top.empty and top.p99_us.notna().any():
        worst = top.loc[top.p99_us.idxmax()]
        b.add("At {f}× capacity p99 reached {p99_ms} ms ({v}).", f=worst.rate_fraction,
              p99_ms=worst.p99_us / 1000, v=worst.variant)
    if len(bent) == 1:
        return b.finding("Latency climbs past {hi}'s knee at {hi_rps} rps; no other backend bends in the range tested")
    if not bent.empty:
        return b.finding("Past its knee latency climbs: {hi} keeps up to {hi_rps} rps, {lo} to {lo_rps} rps")
    if kept and not none and len(kept) == len(knees):
        return b.finding("Every backend kept up with every rate tested, up to {top_f}× capacity")
    if kept and not none:
        return b.finding("Every backend with valid points kept up with every rate tested, up to {top_f}× capacity")
    return b.finding("No backend shows a knee within the rates tested")


# -- throughput -----------------------------------------------------------------------------------

def throughput(ref: pd.DataFrame, conns: int) -> Finding:
    if ref.empty:
        return nothing(f"throughput at {conns} connections was not measured in this run")
    b = Builder()
    everything, ref = ref, derive.valid(ref)
    if ref.empty:
        _left_out(b, everything)
        return b.finding("No backend has a valid point at {conns} connections", conns=conns)
    lo, hi = _extremes(ref, "throughput_rps")
    if len(ref) == 1:                                   # nothing to rank it against
        b.add("At {conns} connections {hi} served {hi_rps} rps.", conns=conns, hi=hi.variant, hi_rps=hi.throughput_rps)
        _left_out(b, everything)
        return b.finding("At {conns} connections {hi} served {hi_rps} rps, the only valid point")
    b.add("At {conns} connections {hi} served {hi_rps} rps, {times}× {lo} ({lo_rps} rps).", conns=conns,
          hi=hi.variant, hi_rps=hi.throughput_rps, times=hi.throughput_rps / lo.throughput_rps, lo=lo.variant,
          lo_rps=lo.throughput_rps)
    saturated = ref[ref.saturated > 0].variant.tolist()
    if saturated:
        b.add("The load generator was saturated for {vs}: their numbers are a lower bound.", vs=_names(saturated))
    _left_out(b, everything)
    return b.finding("At {conns} connections {hi} is fastest ({hi_rps} rps), {lo} slowest ({lo_rps} rps)")


def io_bound(io: pd.DataFrame) -> Finding:
    if io.empty:
        return nothing("io_bound was not measured in this run")
    b = Builder()
    everything, io = io, derive.valid(io)
    if io.empty:
        _left_out(b, everything)
        return b.finding("io_bound has no valid point")
    wait_ms = io.io_us.dropna().iloc[0] / 1000 if io.io_us.notna().any() else None
    pools = io[io.variant.str.startswith(derive.POOL_BACKEND)]
    title = "Waiting requests scale with concurrency"
    if not pools.empty and pools.workers.notna().any():
        best = pools.loc[pools.throughput_rps.idxmax()]
        ceiling = best.workers / (wait_ms / 1000) if wait_ms else best.little_ceiling_rps
        b.add("With {wait_ms} ms of waiting per request, the thread pool ({workers} workers) peaked at {pool_rps} rps"
              " ({v}); its Little's-law ceiling is workers / wait = {ceiling} rps.", wait_ms=wait_ms,
              workers=best.workers, pool_rps=best.throughput_rps, v=best.variant, ceiling=ceiling)
        title = "The thread pool peaks at {pool_rps} rps (ceiling workers / wait = {ceiling}); {top} reaches {top_rps}"
    n = io.conns.max()
    top_rows = io[io.conns == n]
    top = top_rows.loc[top_rows.throughput_rps.idxmax()]
    b.add("At {n} connections {top} reached {top_rps} rps (ceiling connections / wait = {conc} rps).", n=n,
          top=top.variant, top_rps=top.throughput_rps, conc=top.conc_ceiling_rps)
    _left_out(b, everything)
    return b.finding(title)


def cpu_bound(cpu: pd.DataFrame) -> Finding:
    if cpu.empty:
        return nothing("cpu_bound was not measured in this run")
    everything, cpu = cpu, derive.valid(cpu)
    if cpu.empty:
        b = Builder()
        _left_out(b, everything)
        return b.finding("cpu_bound has no valid point")
    narrow = cpu.n_server_cpus.min()
    one = cpu[cpu.n_server_cpus == narrow]
    python, go = one[one.variant != "go"], one[one.variant == "go"]
    b = Builder()
    cpu_us = cpu.cpu_us.dropna().iloc[0] if cpu.cpu_us.notna().any() else None
    title = "CPU-bound work per backend"
    if not python.empty:
        lo, hi = _extremes(python, "throughput_rps")
        b.add("With {cpu_us} µs of GIL-holding work per request on {k} CPU(s), the Python models reached "
              "{py_lo} rps ({lo}) to {py_hi} rps ({hi}) against a ceiling of {cap} rps.", cpu_us=cpu_us,
              k=narrow, py_lo=lo.throughput_rps, lo=lo.variant, py_hi=hi.throughput_rps, hi=hi.variant,
              cap=hi.ceiling_rps)
        title = "CPU-bound: Python models reach {py_lo}–{py_hi} rps against a ceiling of {cap} rps"
    if not go.empty:
        b.add("go reached {go_rps} rps (ceiling {go_cap} rps).", go_rps=go.iloc[0].throughput_rps,
              go_cap=go.iloc[0].ceiling_rps)
        title += "; go {go_rps} rps" if not python.empty else "go reaches {go_rps} rps"
    for _, row in cpu[cpu.n_server_cpus > narrow].iterrows():
        base = one[one.variant == row.variant]
        gain = row.throughput_rps / base.iloc[0].throughput_rps if not base.empty else None
        b.add("On {k} CPUs {v} reached {rps} rps" + (" ({gain}× its rate on {k1})." if gain else "."),
              prefix=f"{row.variant}@{row.n_server_cpus:g}.", k=row.n_server_cpus, v=row.variant,
              rps=row.throughput_rps, gain=gain, k1=narrow)
    _left_out(b, everything)
    return b.finding(title)


# -- switch ---------------------------------------------------------------------------------------

SWITCH_WORDS = {"thread": "a Python thread hand-off", "greenlet": "a greenlet switch",
                "generator": "a generator send", "asyncio": "an asyncio future hand-off",
                "uvloop": "a uvloop future hand-off", "goroutine": "a goroutine hand-off",
                "process_pipe": "a process pipe ping-pong", "futex": "a kernel thread switch (futex)",
                "pipe": "a kernel thread switch (pipe)"}
ABOUT_THE_SAME = 0.1             # two timings within 10% are "about the same" (a shared machine is noisy)
MORE_SWITCHES = 1.25             # one count is "more switches" than another above this factor


def switch_costs(micro: pd.DataFrame) -> dict:
    """bench -> ns per switch, pinned runs preferred (that is what the claim compares: one core)."""
    if micro.empty:
        return {}
    ranked = micro.sort_values("pinned", ascending=False)
    return ranked.groupby("bench", sort=False)["ns_per_switch"].first().to_dict()


def _micro(micro: pd.DataFrame, bench: str, pinned: bool):
    rows = micro[(micro.bench == bench) & (micro.pinned.astype(bool) == pinned)]
    return rows.iloc[0] if len(rows) else None


def _measured(row, *columns) -> bool:
    return row is not None and all(c in row and pd.notna(row[c]) for c in columns)


def switch(micro: pd.DataFrame) -> Finding:
    """What each switch costs, the bare kernel switch against Python's thread hand-off and the runtimes, and why
    placement (one CPU or two) changes it, from the counts measured with each figure."""
    costs = switch_costs(micro)
    if not costs:
        return nothing("the switch microbenchmarks were not run")
    b = Builder()
    kernel, cross = _micro(micro, "futex", True), _micro(micro, "futex", False)
    thread, loose = _micro(micro, "thread", True), _micro(micro, "thread", False)
    runtime = {k: v for k, v in costs.items() if derive.SWITCH_GROUPS.get(k) != derive.KERNEL_GROUP}
    cheapest = min(runtime, key=runtime.get, default=None)
    if kernel is not None:
        b.add("A bare kernel thread switch (futex, both threads on one CPU) took {kernel_ns} ns, {kernel_ctx} OS "
              "context switches each.", kernel_ns=kernel.ns_per_switch, kernel_ctx=kernel.ctx_per_switch)
    if thread is not None:
        b.add("A Python thread hand-off (lock + GIL, on one CPU) took {thread_ns} ns and {thread_ctx} OS context "
              "switches" + (", {thread_x}× the bare switch." if kernel is not None else "."),
              thread_ns=thread.ns_per_switch, thread_ctx=thread.ctx_per_switch,
              **({"thread_x": thread.ns_per_switch / kernel.ns_per_switch} if kernel is not None else {}))
    rival = thread if thread is not None else kernel
    if rival is not None and cheapest:
        b.add("In user space, {cheap_what} took {cheap_ns} ns, {times}× less than " + (
              "the Python hand-off." if thread is not None else "the kernel switch."),
              cheap_what=SWITCH_WORDS.get(cheapest, cheapest), cheap_ns=costs[cheapest],
              times=rival.ns_per_switch / costs[cheapest])
    for bench in ("greenlet", "asyncio", "goroutine"):
        if bench in costs and bench != cheapest:
            b.add("{what}: {ns} ns.", prefix=f"{bench}.", what=SWITCH_WORDS[bench].capitalize(), ns=costs[bench])
    cross_x = _across_cpus(b, kernel, cross)
    _python_pinning(b, thread, loose, cross_x)
    if kernel is not None and thread is not None:
        return b.finding("A kernel thread switch costs {kernel_ns} ns; a Python thread hand-off {thread_ns} ns "
                         "({thread_ctx} kernel switches)" + (", {cheap_what} {cheap_ns} ns" if cheapest else ""))
    if thread is not None and cheapest:
        return b.finding("A Python thread hand-off costs {times}× {cheap_what}: {thread_ns} ns vs {cheap_ns} ns")
    lo, hi = min(costs, key=costs.get), max(costs, key=costs.get)
    return b.finding("Switch cost: {hi_what} {hi_ns} ns, {lo_what} {lo_ns} ns", hi_what=SWITCH_WORDS.get(hi, hi),
                     hi_ns=costs[hi], lo_what=SWITCH_WORDS.get(lo, lo), lo_ns=costs[lo])


def _across_cpus(b: Builder, same, cross):
    """The futex switch on one CPU against across two: how much slower, and what the counts say about why.
    Returns across / same (None when not both measured)."""
    if same is None or cross is None:
        return None
    x = cross.ns_per_switch / same.ns_per_switch
    if abs(x - 1) <= ABOUT_THE_SAME:
        b.add("Across two CPUs the futex switch took {cross_ns} ns, about the same as on one CPU.",
              cross_ns=cross.ns_per_switch)
        return x
    if x < 1:
        b.add("Across two CPUs the futex switch took {cross_ns} ns, {cross_x}× the one-CPU time: crossing CPUs "
              "cost nothing extra here.", cross_ns=cross.ns_per_switch, cross_x=x)
        return x
    similar = _measured(same, "ctx_per_switch") and _measured(cross, "ctx_per_switch") and \
        cross.ctx_per_switch <= same.ctx_per_switch * MORE_SWITCHES
    b.add("Across two CPUs it took {cross_ns} ns, {cross_x}× longer, with {cross_ctx} OS context switches each"
          + (" (so the extra time is not extra switches)." if similar else "."),
          cross_ns=cross.ns_per_switch, cross_x=x, cross_ctx=cross.ctx_per_switch)
    if _measured(same, "cpu_ns_per_switch") and _measured(cross, "cpu_ns_per_switch"):
        gap = cross.ns_per_switch - cross.cpu_ns_per_switch
        b.add("Measured: on one CPU the two threads were running {same_busy}% of the time (the waker blocks and the "
              "CPU passes straight to the woken thread); across CPUs {cross_busy}%"
              + (", so for at least {gap_ns} ns of each switch neither thread ran" if gap > 0 else "")
              + ", and the CPU time per switch went from {same_cpu} to {cross_cpu} ns.",
              same_busy=100 * same.cpu_ns_per_switch / same.ns_per_switch,
              cross_busy=100 * cross.cpu_ns_per_switch / cross.ns_per_switch, gap_ns=max(gap, 0),
              same_cpu=same.cpu_ns_per_switch, cross_cpu=cross.cpu_ns_per_switch)
    b.add("A plausible reading, not measured here: a wake-up for another CPU is an inter-processor interrupt, and "
          "that CPU, idle while its thread waited, has to leave its idle state first (on a virtual machine both go "
          "through the hypervisor); on one CPU there is no interrupt and no idle CPU to wake.")
    return x


def _python_pinning(b: Builder, pinned, loose, cross_x) -> None:
    """The Python hand-off pinned to one CPU against unpinned: which is slower, and whether the counts say why."""
    if pinned is None or loose is None:
        return
    counted = _measured(pinned, "ctx_per_switch", "ctx_invol_per_switch") and \
        _measured(loose, "ctx_per_switch", "ctx_invol_per_switch")
    counts = {"pin_ctx": round(pinned.ctx_per_switch, 2), "free_ctx": round(loose.ctx_per_switch, 2),
              "pin_invol": round(pinned.ctx_invol_per_switch, 2),
              "free_invol": round(loose.ctx_invol_per_switch, 2)} if counted else {}
    b.add("Unpinned, the Python hand-off took {free_ns} ns"
          + ("; OS context switches per hand-off: pinned {pin_ctx}, unpinned {free_ctx}, of them involuntary (the "
             "woken thread taking the CPU from the one that woke it) {pin_invol} and {free_invol}." if counted else
             "."), pin_ns=pinned.ns_per_switch, free_ns=loose.ns_per_switch, **counts)
    x = pinned.ns_per_switch / loose.ns_per_switch
    more = counted and pinned.ctx_per_switch > loose.ctx_per_switch * MORE_SWITCHES
    if abs(x - 1) <= ABOUT_THE_SAME:
        b.add("Pinned and unpinned took about the same time (within {pct}%).", pct=100 * ABOUT_THE_SAME)
    elif x > 1 and more:
        b.add("Pinned is {pin_x}× slower and makes {extra_ctx} more switches per hand-off (measured). The reading: "
              "on one CPU every wake-up takes the CPU from the waker while it still holds the GIL, so the woken "
              "thread runs, finds the GIL taken and sleeps again; unpinned, it waits on the other CPU while the "
              "waker runs on until it blocks and drops the GIL.",
              pin_x=x, extra_ctx=round(pinned.ctx_per_switch - loose.ctx_per_switch, 2))
    elif x > 1:
        b.add("Pinned is {pin_x}× slower with about as many switches per hand-off, so the switch counts do not "
              "explain the difference in this run.", pin_x=x)
    else:
        why = "; the counts here do not say why."
        if cross_x is not None and cross_x > 1 + ABOUT_THE_SAME:
            why = ("; a plausible reading: unpinned, hand-offs cross CPUs, and in the futex baseline a switch across "
                   "CPUs cost {cross_x}× one on the same CPU.")
        elif counted and loose.ctx_invol_per_switch < pinned.ctx_invol_per_switch / 2:
            why = ("; a plausible reading: unpinned, the woken thread seldom took the waker's CPU (fewer "
                   "involuntary switches), which fits it running on the other CPU, so every hand-off waits for a "
                   "wake-up across CPUs.")
        b.add("Unpinned is {free_x}× slower" + (" although pinned makes more switches" if more else "") + why,
              free_x=1 / x, **({"cross_x": cross_x} if cross_x is not None else {}))


def per_request(pr: pd.DataFrame) -> Finding:
    if pr.empty:
        return nothing("server CPU and context switches per request were not measured in this run")
    b = Builder()
    lo, hi = _extremes(pr, "ctx_per_req")
    if lo is not None:
        b.add("Per request, {hi} made {hi_ctx} context switches and {lo} {lo_ctx}.", hi=hi.variant,
              hi_ctx=hi.ctx_per_req, lo=lo.variant, lo_ctx=lo.ctx_per_req)
    clo, chi = _extremes(pr, "cpu_us_per_req")
    if clo is not None:
        b.add("Server CPU per request ranged from {clo_us} µs ({clo}) to {chi_us} µs ({chi}).",
              clo_us=clo.cpu_us_per_req, clo=clo.variant, chi_us=chi.cpu_us_per_req, chi=chi.variant)
    if lo is None:
        return b.finding("CPU per request: {clo} {clo_us} µs, {chi} {chi_us} µs")
    return b.finding("{hi} switches {hi_ctx} times per request, {lo} {lo_ctx}")


# -- c10k -----------------------------------------------------------------------------------------

def c10k(c: pd.DataFrame) -> Finding:
    if c.empty:
        return nothing("c10k was not measured in this run")
    target = c.hold_target.max()
    held_all = c[(c.held >= HELD_FRACTION * c.hold_target) & (c.connect_errors.fillna(0) == 0)]
    served = held_all[(held_all.requests > 0) & (held_all.errors.fillna(0) == 0)]
    b = Builder()
    b.add("{k} of {n} variants held all {target} connections and kept answering the probe ({vs}).",
          k=len(served), n=len(c), target=target, vs=_names(served.variant) if len(served) else "none")
    for _, row in c[~c.variant.isin(served.variant)].iterrows():
        b.add("{v}: held {held}, {failed} failed, {req} probe requests answered.", prefix=f"{row.variant}.",
              v=row.variant, held=row.held, failed=row.connect_errors, req=row.requests)
    lo, hi = _extremes(served, "p99_us") if len(served) else (None, None)
    if lo is not None:
        b.add("Probe p99 while holding: {lo_ms} ms ({lo}) to {hi_ms} ms ({hi}).", lo_ms=lo.p99_us / 1000,
              lo=lo.variant, hi_ms=hi.p99_us / 1000, hi=hi.variant)
    return b.finding("{k} of {n} variants hold {target} idle connections and keep serving")


# -- pitfalls -------------------------------------------------------------------------------------

def pitfalls(summary: pd.DataFrame) -> Finding:
    """What each fault did against its fix, from pitfalls_summary.csv (one row per variant x pitfall x fixed)."""
    if summary.empty:
        return nothing("pitfalls was not measured in this run")
    b = Builder()
    cases = summary.set_index(["pitfall", "fixed", "variant"])
    worse = []                          # pitfalls whose broken server measured worse than its fixed one

    def pair(pitfall):
        if pitfall not in cases.index.get_level_values(0):
            return None, None
        rows = cases.loc[pitfall]
        broken = rows.loc[0] if 0 in rows.index.get_level_values(0) else None
        fixed = rows.loc[1] if 1 in rows.index.get_level_values(0) else None
        return broken, fixed
    broken, fixed = pair("leak")
    if broken is not None and fixed is not None:
        b.add("leak: after {n} connect-PING-hang-up clients, CLOSE_WAIT reached {bmax} broken (max over variants) "
              "vs {fmax} fixed.", prefix="leak.", n=broken.served.max(),
              bmax=broken.close_wait_end.max(), fmax=fixed.close_wait_end.max())
        worse += ["leak"] if broken.close_wait_end.max() > fixed.close_wait_end.max() else []
    broken, fixed = pair("no-deadline")
    if broken is not None and fixed is not None:
        starved = [v for v in broken.index if broken.loc[v, "served"] == 0 and broken.loc[v, "starved"] > 0]
        b.add("no-deadline: fresh clients were starved in {starved} broken; fixed, {fserved} fresh clients "
              "were served in all.", prefix="nodeadline.",
              starved=_names(starved) if starved else "no variant", fserved=fixed.served.min())
        worse += ["no-deadline"] if broken.starved.sum() > fixed.starved.sum() else []
    broken, fixed = pair("unbounded")
    if broken is not None and fixed is not None:
        growth = (broken.rss_kib_peak - broken.rss_kib_start) / 1024
        top = growth.idxmax()
        b.add("unbounded: without the cap RSS grew up to {mib} MiB ({v}); with it {rej} connections were "
              "refused with \"server busy\".", prefix="unbounded.", mib=growth.max(), v=top,
              rej=fixed.rejected.max())
        worse += ["unbounded"] if fixed.rejected.max() > 0 and broken.fds_peak.max() > fixed.fds_peak.max() else []
    broken, fixed = pair("hard-kill")
    if broken is not None and fixed is not None:
        b.add("hard-kill: SIGTERM lost {blost} replies in flight (total) without the drain, {flost} with it.",
              prefix="hardkill.", blost=broken.replies_lost.sum(), flost=fixed.replies_lost.sum())
        worse += ["hard-kill"] if broken.replies_lost.sum() > fixed.replies_lost.sum() else []
    measured = sorted(set(summary.pitfall), key=[p.name for p in registry.pitfalls()].index)
    return b.finding("{k} of {n} pitfalls measured worse broken than fixed ({which})", k=len(worse),
                     n=len(measured), which=", ".join(worse) or "none")
