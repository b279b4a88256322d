"""The sentence under each chart, computed from the derived frames (analysis.derive).

Every function takes frames and returns a ``Finding`` (analysis.fmt): a title
that states the result, a short text, and the facts (numbers in the units the
text shows: ms, MiB, KiB, rps, ns) they were written from. Which backend is
best or worst, whether a claim holds: all of it is decided here from the
numbers, never written in advance.

Only valid points are ranked or quoted (``derive.valid``); the invalid ones of a
frame (a connection never served, requests unanswered, a saturated load
generator) get a sentence saying they were left out and why (``_left_out``).

Every comparison between two measured values (faster, fastest, slowest, most,
"X times") goes through ``derive.compare_medians``: a ranking only where the two
medians' 95 % intervals separate, else the sentence says "tie within noise".
Medians are shown with their min–max over the rounds (``_spread``), req/s with
the server CPU µs per request it cost (``_cpu``), and a superlative over fewer
variants than were measured names the ones left out (``_scope``).
"""
from __future__ import annotations

import pandas as pd

from conclab.experiments import registry

from conclab.experiments.harness.loadproc import MIN_LATENCIES, TOO_SHORT
from conclab.experiments.convoy import CPU_OFFLOAD
from conclab.experiments.m_to_n import unit_name

from . import derive
from .fmt import Builder, Finding, nothing
from .tables import MS_PER_US
from .tradeoffs import pool_costs

MIN_SLOPE_KIB = 0.25             # a per-connection slope below this is "no measurable growth"
VMS_RESERVED_KIB = 1024          # VMS growth per thread at least this (1 MiB): address space is reserved...
RSS_TOUCHED_KIB = 256            # ...while RSS growth below this means little of it is touched
OFFLOAD_OPTION = " ".join(CPU_OFFLOAD)   # how a convoy case's name ends when the event loop offloads its CPU work
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
    active = getattr(row, "server_conns_active", None)
    if pd.notna(active) and pd.notna(conns) and active < conns:
        parts.append("the server had accepted only {active} of {conns} connections")
        facts.update(active=active, conns=conns)
    reason = getattr(row, "invalid_reason", None)
    if isinstance(reason, str) and TOO_SHORT in reason:
        parts.append(TOO_SHORT + " (it lasted under {min_latencies} mean latencies)")
        facts.update(min_latencies=MIN_LATENCIES)
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


def _nothing_valid(everything: pd.DataFrame, what: str) -> Finding:
    """The finding of a table without one valid point: each variant's invalid points, said."""
    b = Builder()
    _left_out(b, everything)
    return b.finding(f"{what} has no valid point")


def _names(variants) -> str:
    variants = list(variants)
    return ", ".join(variants[:-1]) + " and " + variants[-1] if len(variants) > 1 else "".join(variants)


# -- spreads and rankings: every comparison goes through derive.compare_medians ---------------------

def _spread(name: str, row, column: str, scale: float = 1.0) -> tuple[str, dict]:
    """A median and its min–max over rounds, as a template piece ("{name} ({name_min}–{name_max})", or "{name}"
    when one round or no spread) and its facts."""
    def value(col):
        v = row.get(col) if row is not None and hasattr(row, "get") else None
        return float(v) * scale if v is not None and pd.notna(v) else None
    facts = {name: value(column)}
    lo, hi = value(column + "_min"), value(column + "_max")
    if lo is not None and hi is not None and lo != hi:
        facts.update({name + "_min": lo, name + "_max": hi})
        return "{" + name + "} ({" + name + "_min}–{" + name + "_max})", facts
    return "{" + name + "}", facts


def _cpu(name: str, row) -> tuple[str, dict]:
    """", at {name} µs of server CPU per request (min–max)": what a req/s figure cost, or nothing if unmeasured."""
    if row is None or pd.isna(row.get("cpu_us_per_req", float("nan"))):
        return "", {}
    piece, facts = _spread(name, row, "cpu_us_per_req")
    return ", at " + piece + " µs of server CPU per request", facts


def _ties(frame: pd.DataFrame, row, column: str) -> list:
    """Variants of ``frame`` tied with ``row`` on ``column`` within noise (derive.tied_with)."""
    return derive.tied_with(frame, row, column)


def _scope(everything: pd.DataFrame, ranked: pd.DataFrame) -> tuple[str, dict]:
    """" (of the {k} with a valid point; {out} left out)" when ranking leaves variants out, else nothing: a
    superlative ("fastest", "every backend") is only ever about the variants it was computed over."""
    if everything.empty or "variant" not in everything:
        return "", {}
    out = [v for v in dict.fromkeys(everything.variant) if v not in set(ranked.variant)]
    if not out:
        return "", {}
    return " (of the {scope_k} with a valid point; {scope_out} left out)", {"scope_k": ranked.variant.nunique(),
                                                                            "scope_out": _names(out)}


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
    if derive.compare_medians(hi, lo, "rss_kib") == derive.TIE:
        return b.finding("Holding {n} idle connections, every backend's RSS is within noise ({lo_mib}–{hi_mib} MiB)")
    most, least = _ties(top, hi, "rss_kib"), _ties(top, lo, "rss_kib")
    if most or least:
        b.add("Within noise of the most: {most}; of the least: {least}.", most=_names(most) or "none",
              least=_names(least) or "none")
    return b.finding("{hi} needs the most memory for {n} idle connections ({hi_mib} MiB), {lo} the least "
                     "({lo_mib} MiB)" + (" (ties within noise: see below)" if most or least else ""))


def memory_per_conn(slopes: pd.DataFrame) -> Finding:
    if slopes.empty or "rss_kib" not in slopes:
        return nothing("no memory fit in this run")
    lo, hi = _extremes(slopes, "rss_kib")
    b = Builder()
    b.add("Each idle connection adds {hi_kib} KiB of RSS with {hi} and {lo_kib} KiB with {lo}.",
          hi_kib=hi.rss_kib, hi=hi.variant, lo_kib=lo.rss_kib, lo=lo.variant)
    if derive.compare_medians(hi, lo, "rss_kib") == derive.TIE:
        b.add("Their slopes over the rounds overlap: a tie within noise.")
    elif lo.rss_kib >= MIN_SLOPE_KIB:
        b.add("That is {times}× more.", times=hi.rss_kib / lo.rss_kib)
    else:
        b.add("Below {floor} KiB the slope is within measurement noise of zero.", floor=MIN_SLOPE_KIB)
    _fit_quality(b, slopes)
    return b.finding("An idle connection costs {hi_kib} KiB of RSS with {hi}, {lo_kib} KiB with {lo}")


def _fit_quality(b: Builder, slopes: pd.DataFrame) -> None:
    """How well the RSS lines fit: the lowest r² and the largest residual, or that too few points give no r²."""
    if "rss_points" not in slopes or slopes.rss_points.isna().all():
        return
    judged = slopes.dropna(subset=["rss_r2"])
    if judged.empty:
        b.add("{k} points: no r² (a line through two points fits them exactly, so it cannot show whether memory "
              "grows linearly; a profile with more memory points can).", prefix="fit.", k=slopes.rss_points.min())
        return
    worst = judged.loc[judged.rss_r2.idxmin()]
    b.add("The lines are fitted through {k} points and leave at most {unexplained}% of the variance "
          "unexplained (the complement of r², {v}).", prefix="fit.", k=judged.rss_points.min(), r2=worst.rss_r2,
          unexplained=100 * (1 - worst.rss_r2), v=worst.variant)
    if "rss_max_residual_kib" in judged and judged.rss_max_residual_kib.notna().any():
        far = judged.loc[judged.rss_max_residual_kib.idxmax()]
        b.add("The farthest point is {res_mib} MiB off its line ({v}).", prefix="fit.residual.",
              res_mib=far.rss_max_residual_kib / 1024, v=far.variant)


def kernel_share(row) -> tuple[float, float]:
    """The interval of the kernel's share of a connection's memory (kernel / (RSS + kernel)) over the kernel
    slope's spread (kernel_kib_min..max; the median alone where there is none)."""
    def share(kernel):
        return kernel / (row.rss_kib + kernel) if pd.notna(kernel) and row.rss_kib + kernel > 0 else None
    ends = [share(k) for k in (row.kernel_kib_min, row.kernel_kib_max)]
    ends = [e for e in ends if e is not None] or [share(row.kernel_kib)]
    return (min(ends), max(ends))


def memory_kernel(split: pd.DataFrame) -> Finding:
    """Process RSS + the kernel's memory per idle connection (derive.memory_kernel)."""
    rows = split.dropna(subset=["rss_kib", "kernel_kib"]) if not split.empty else split
    if rows.empty:
        return nothing("kernel memory per connection was not measured in this run")
    lo, hi = _extremes(rows, "total_kib")
    b = Builder()
    b.add("RSS counts only the server process's own pages. The kernel's memory for each connection (the socket's "
          "structures in slab, its buffers, one kernel stack per thread, page tables) is in no process's RSS, so it "
          "was measured apart: the change of /proc/meminfo, /proc/net/sockstat and the server's page tables while "
          "the connections were held, less the load generator's end of each connection ({client} KiB, estimated "
          "from loopback pairs).", client=rows.client_kib.median())
    one = len(rows) == 1
    b.add("With the kernel counted, an idle connection costs {hi_total} KiB with {hi} ({hi_rss} KiB process RSS "
          "+ {hi_kernel} KiB kernel)" + ("." if one else " and {lo_total} KiB with {lo} ({lo_rss} + {lo_kernel})."),
          hi=hi.variant, hi_total=hi.total_kib, hi_rss=hi.rss_kib, hi_kernel=hi.kernel_kib,
          lo=lo.variant, lo_total=lo.total_kib, lo_rss=lo.rss_kib, lo_kernel=lo.kernel_kib)
    positive = rows[(rows.kernel_kib > 0) & (rows.total_kib > 0)]
    if not positive.empty:
        top = positive.loc[(positive.kernel_kib / positive.total_kib).idxmax()]
        tied = [r.variant for r in positive.itertuples() if r.variant != top.variant
                and derive.compare_medians(kernel_share(top), kernel_share(r)) == derive.TIE]
        b.add("The kernel's share is largest with {kv}: {share}% of the total" +
              (" (a tie within noise with {tied})." if tied else "."), kv=top.variant,
              share=100 * top.kernel_kib / top.total_kib, tied=", ".join(tied))
    threads = rows[rows.variant == derive.THREAD_VARIANT]
    if not threads.empty and threads.iloc[0].kernel_stack_kib >= MIN_SLOPE_KIB:
        t = threads.iloc[0]
        b.add("With {tv}, a thread per connection, each connection adds {stack} KiB of kernel stack and {pte} KiB "
              "of page tables.", tv=t.variant, stack=t.kernel_stack_kib, pte=t.kernel_pte_kib)
    for r in rows.itertuples():
        if pd.notna(r.rss_points) and pd.notna(r.kernel_points) and r.kernel_points < r.rss_points:
            b.add("{v}: {k} of {n} points left out of the kernel fit (other processes' sockets, TIME_WAIT "
                  "sockets or tasks changed the kernel's counters while they were measured).",
                  prefix=f"left_out.{r.variant}.", v=r.variant,
                  k=r.rss_points - r.kernel_points, n=r.rss_points)
    for r in split[split.kernel_kib.isna()].itertuples():
        b.add("{v}: no kernel line, {k} of {n} points were left undisturbed by other processes.",
              prefix=f"no_line.{r.variant}.", v=r.variant, k=r.kernel_points, n=r.rss_points)
    judged = rows.dropna(subset=["kernel_r2"])
    if judged.empty:
        b.add("{k} points: no r² for the kernel fits.", prefix="kernel_fit.", k=rows.kernel_points.min())
    else:
        worst = judged.loc[judged.kernel_r2.idxmin()]
        b.add("The kernel lines leave at most {unexplained}% of the variance unexplained ({v}).",
              prefix="kernel_fit.", r2=worst.kernel_r2, unexplained=100 * (1 - worst.kernel_r2), v=worst.variant)
    return b.finding("With the kernel counted, an idle connection costs {hi_total} KiB with {hi}"
                     + ("" if one else " and {lo_total} KiB with {lo}"))


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
    by_variant = rows.set_index("variant") if not rows.empty and "variant" in rows else None
    if by_variant is not None and {lo.variant, hi.variant} <= set(by_variant.index) and derive.compare_medians(
            by_variant.loc[hi.variant], by_variant.loc[lo.variant], "p99_us") == derive.TIE:
        b.add("Over the rounds their p99s overlap: a tie within noise.")
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
    in_range = knees[knees["where"] == "in range"]
    bent = in_range.set_index("variant").knee.astype(float)
    knee_tie = False
    if not bent.empty:
        hi_row, lo_row = (in_range[in_range.variant == v].iloc[0] for v in (bent.idxmax(), bent.idxmin()))
        knee_tie = len(bent) > 1 and derive.compare_medians(hi_row, lo_row, "knee") == derive.TIE
        b.add("The knee, the highest offered rate before p99 grew over {factor}× its light-load value or the "
              "server answered less than {keepup}% of the offered rate: " +
              ("{hi} {hi_rps} rps." if len(bent) == 1 else
               "{hi} {hi_rps} rps, {lo} {lo_rps} rps" + (": a tie within noise (their knees over the rounds "
                                                         "overlap)." if knee_tie else ".")),
              factor=derive.KNEE_P99_FACTOR, keepup=derive.KEEPUP * 100, hi=bent.idxmax(), hi_rps=bent.max(),
              lo=bent.idxmin(), lo_rps=bent.min())
    top_fraction = lat.rate_fraction.max()
    kept = knees[knees["where"] == "beyond"].variant.tolist()
    tested_top = everything.rate_fraction.max()
    valid_top = lat.groupby("variant").rate_fraction.max()
    short = [v for v in kept if valid_top.get(v, tested_top) < tested_top]      # their higher rates: invalid
    tested = "every valid rate tested" if short else "every rate tested"
    for top_f, group in pd.Series({v: valid_top.get(v) for v in kept}).groupby(lambda v: valid_top.get(v)):
        names = list(group.index)
        b.add("{vs} kept up with every rate tested up to {top_f}× capacity: no knee in range" + (
              "; above it their points are invalid (left out), so a knee there cannot be placed." if top_f < tested_top
              else "."), prefix=f"kept@{top_f:g}.", vs=_names(names), top_f=top_f)
    none = knees[knees["where"] == "below"].variant.tolist()
    if none:
        b.add("{vs} did not keep up at any offered rate.", vs=_names(none))
    _left_out(b, everything)
    top = lat[lat.rate_fraction == top_fraction]
    if not top.empty and top.p99_us.notna().any():
        worst = top.loc[top.p99_us.idxmax()]
        p99, p99_facts = _spread("p99_ms", worst, "p99_us", 1 / 1000)
        ties = _ties(top, worst, "p99_us")
        scope, scope_facts = _scope(everything[everything.rate_fraction == top_fraction], top)
        b.add("At {f}× capacity the highest p99 was " + p99 + " ms ({v})" + scope.replace("scope_", "top_scope_") + (
              "; {p99_ties} tie(s) with it within noise." if ties else "."), f=worst.rate_fraction, v=worst.variant,
              **p99_facts, **({"p99_ties": _names(ties)} if ties else {}),
              **{k.replace("scope_", "top_scope_"): v for k, v in scope_facts.items()})
    if len(bent) == 1:
        return b.finding("Latency climbs past {hi}'s knee at {hi_rps} rps; no other backend bends in the range tested")
    if not bent.empty and knee_tie:
        return b.finding("Past the knee latency climbs; the knees, {lo_rps} ({lo}) to {hi_rps} rps ({hi}), tie "
                         "within noise")
    if not bent.empty:
        return b.finding("Past its knee latency climbs: {hi} keeps up to {hi_rps} rps, {lo} to {lo_rps} rps")
    if kept and not none and len(kept) == len(knees) and not short:
        return b.finding("Every backend kept up with every rate tested, up to {top_f}× capacity", top_f=top_fraction)
    if kept and not none and len(kept) == len(knees):
        return b.finding("Every backend kept up with every valid rate tested; rates above {short_top}× capacity are "
                         "invalid for {short_vs}", short_top=min(valid_top.get(v) for v in short),
                         short_vs=_names(short))
    if kept and not none:
        scope, scope_facts = _scope(knees, knees[knees.variant.isin(kept)])
        return b.finding("Every backend with valid points kept up with " + tested + ", up to {top_f}× capacity"
                         + scope, top_f=top_fraction, **scope_facts)
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
    hi_rps, hi_facts = _spread("hi_rps", hi, "throughput_rps")
    hi_cpu, hi_cpu_facts = _cpu("hi_cpu", hi)
    if len(ref) == 1:                                   # nothing to rank it against
        b.add("At {conns} connections {hi} served " + hi_rps + " rps" + hi_cpu + ".", conns=conns, hi=hi.variant,
              **hi_facts, **hi_cpu_facts)
        _left_out(b, everything)
        return b.finding("At {conns} connections {hi} served {hi_rps} rps, the only valid point")
    lo_rps, lo_facts = _spread("lo_rps", lo, "throughput_rps")
    lo_cpu, lo_cpu_facts = _cpu("lo_cpu", lo)
    scope, scope_facts = _scope(everything, ref)
    if derive.compare_medians(hi, lo, "throughput_rps") == derive.TIE:
        b.add("At {conns} connections the highest median, " + hi_rps + " rps ({hi}" + hi_cpu + "), and the lowest, "
              + lo_rps + " rps ({lo}" + lo_cpu + "), tie within noise: their ranges over the rounds overlap, so no "
              "backend is ranked.", conns=conns, hi=hi.variant, lo=lo.variant, **hi_facts, **lo_facts,
              **hi_cpu_facts, **lo_cpu_facts)
        title = "At {conns} connections no backend is ranked: throughputs tie within noise ({lo_rps}–{hi_rps} rps)" \
            + scope
    else:
        b.add("At {conns} connections {hi} served " + hi_rps + " rps" + hi_cpu + ", {times}× {lo} (" + lo_rps
              + " rps" + lo_cpu + ").", conns=conns, hi=hi.variant, times=hi.throughput_rps / lo.throughput_rps,
              lo=lo.variant, **hi_facts, **lo_facts, **hi_cpu_facts, **lo_cpu_facts)
        top, bottom = _ties(ref, hi, "throughput_rps"), _ties(ref, lo, "throughput_rps")
        if top:
            b.add("{top_ties} tie(s) with {hi} within noise.", top_ties=_names(top), hi=hi.variant)
        if bottom:
            b.add("{bottom_ties} tie(s) with {lo} within noise.", bottom_ties=_names(bottom), lo=lo.variant)
        fastest = ("{hi} is fastest ({hi_rps} rps)" if not top else
                   "{hi} ({hi_rps} rps) and {top_ties} tie for fastest within noise")
        slowest = ("{lo} slowest ({lo_rps} rps)" if not bottom else
                   "{lo} ({lo_rps} rps) and {bottom_ties} tie for slowest")
        title = "At {conns} connections " + fastest + ", " + slowest + scope
    saturated = ref[ref.saturated > 0].variant.tolist()
    if saturated:
        b.add("The load generator was saturated for {vs}: their numbers are a lower bound.", vs=_names(saturated))
    _left_out(b, everything)
    return b.finding(title, **scope_facts)


def io_bound(io: pd.DataFrame) -> Finding:
    if io.empty:
        return nothing("io_bound was not measured in this run")
    b = Builder()
    everything, io = io, derive.valid(io)
    if io.empty:
        return _nothing_valid(everything, "io_bound")
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
    top_rps, top_facts = _spread("top_rps", top, "throughput_rps")
    top_cpu, cpu_facts = _cpu("top_cpu", top)
    ties = _ties(top_rows, top, "throughput_rps")
    b.add("At {n} connections {top} reached " + top_rps + " rps" + top_cpu + " (ceiling connections / wait = {conc} "
          "rps)" + ("; {top_ties} tie(s) with it within noise." if ties else "."), n=n, top=top.variant,
          conc=top.conc_ceiling_rps, **top_facts, **cpu_facts, **({"top_ties": _names(ties)} if ties else {}))
    scope, scope_facts = _scope(everything[everything.conns == n], top_rows)
    if ties:
        title = title.replace("{top} reaches {top_rps}", "{top} and {top_ties} reach {top_rps} (a tie within noise)")
    _left_out(b, everything)
    return b.finding(title + scope, **scope_facts)


def cpu_bound(cpu: pd.DataFrame) -> Finding:
    if cpu.empty:
        return nothing("cpu_bound was not measured in this run")
    everything, cpu = cpu, derive.valid(cpu)
    if cpu.empty:
        return _nothing_valid(everything, "cpu_bound")
    narrow = cpu.n_server_cpus.min()
    one = cpu[cpu.n_server_cpus == narrow]
    python, go = one[one.variant != "go"], one[one.variant == "go"]
    b = Builder()
    cpu_us = cpu.cpu_us.dropna().iloc[0] if cpu.cpu_us.notna().any() else None
    title = "CPU-bound work per backend"
    if not python.empty:
        lo, hi = _extremes(python, "throughput_rps")
        py_lo, lo_facts = _spread("py_lo", lo, "throughput_rps")
        py_hi, hi_facts = _spread("py_hi", hi, "throughput_rps")
        lo_cpu, lo_cpu_facts = _cpu("lo_cpu", lo)
        hi_cpu, hi_cpu_facts = _cpu("hi_cpu", hi)
        tie = len(python) > 1 and derive.compare_medians(hi, lo, "throughput_rps") == derive.TIE
        b.add("With {cpu_us} µs of GIL-holding work per request on {k} CPU(s), the Python models reached "
              + py_lo + " rps ({lo}" + lo_cpu + ") to " + py_hi + " rps ({hi}" + hi_cpu + ") against a ceiling of "
              "{cap} rps" + (", a tie within noise." if tie else "."), cpu_us=cpu_us, k=narrow, lo=lo.variant,
              hi=hi.variant, cap=hi.ceiling_rps, **lo_facts, **hi_facts, **lo_cpu_facts, **hi_cpu_facts)
        title = "CPU-bound: Python models reach {py_lo}–{py_hi} rps against a ceiling of {cap} rps"
    if not go.empty:
        go_rps, go_facts = _spread("go_rps", go.iloc[0], "throughput_rps")
        go_cpu, go_cpu_facts = _cpu("go_cpu", go.iloc[0])
        b.add("go reached " + go_rps + " rps" + go_cpu + " (ceiling {go_cap} rps).", go_cap=go.iloc[0].ceiling_rps,
              **go_facts, **go_cpu_facts)
        title += "; go {go_rps} rps" if not python.empty else "go reaches {go_rps} rps"
    for _, row in cpu[cpu.n_server_cpus > narrow].iterrows():
        base = one[one.variant == row.variant]
        gain = row.throughput_rps / base.iloc[0].throughput_rps if not base.empty else None
        same = gain is not None and derive.compare_medians(row, base.iloc[0], "throughput_rps") == derive.TIE
        rps, rps_facts = _spread("rps", row, "throughput_rps")
        b.add("On {k} CPUs {v} reached " + rps + " rps" + (
              " (within noise of its rate on {k1}: a tie)." if same else
              " ({gain}× its rate on {k1})." if gain else "."),
              prefix=f"{row.variant}@{row.n_server_cpus:g}.", k=row.n_server_cpus, v=row.variant,
              k1=narrow, **rps_facts, **({"gain": gain} if gain and not same else {}))
    _left_out(b, everything)
    scope, scope_facts = _scope(everything[everything.n_server_cpus == narrow], one)
    return b.finding(title + scope, **scope_facts)


# -- switch ---------------------------------------------------------------------------------------

SWITCH_WORDS = {"thread": "a Python thread hand-off", "greenlet": "a greenlet switch",
                "generator": "a generator send", "asyncio": "an asyncio future hand-off",
                "uvloop": "a uvloop future hand-off", "goroutine": "a goroutine hand-off",
                "process_pipe": "a process pipe ping-pong", "futex": "a kernel thread switch (futex)",
                "pipe": "a kernel thread switch (pipe)"}
ABOUT_THE_SAME = 0.1             # two timings within 10% are "about the same" (a shared machine is noisy)
MORE_SWITCHES = 1.25             # one count is "more switches" than another above this factor
BUSY = 0.9                       # two threads on one CPU running this share of the time: it never idled


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
        b.add("A bare kernel thread switch (futex, both threads on one CPU) took {kernel_ns} ns; OS context "
              "switches per switch: {kernel_ctx}.", kernel_ns=kernel.ns_per_switch,
              kernel_ctx=round(kernel.ctx_per_switch, 2))
    if thread is not None:
        near = kernel is not None and derive.compare_medians(thread, kernel, "ns_per_switch") == derive.TIE
        b.add("A Python thread hand-off (lock + GIL, on one CPU) took {thread_ns} ns and {thread_ctx} OS context "
              "switches" + (", within noise of the bare switch (a tie)." if near else
                            ", {thread_x}× the bare switch." if kernel is not None else "."),
              thread_ns=thread.ns_per_switch, thread_ctx=round(thread.ctx_per_switch, 2),
              **({"thread_x": thread.ns_per_switch / kernel.ns_per_switch} if kernel is not None and not near
                 else {}))
    rival = thread if thread is not None else kernel
    user_tie = False
    if rival is not None and cheapest:
        cheap_row = micro[micro.bench == cheapest].sort_values("pinned", ascending=False).iloc[0]
        user_tie = derive.compare_medians(rival, cheap_row, "ns_per_switch") == derive.TIE
        b.add("In user space, {cheap_what} took {cheap_ns} ns, " + ("within noise of " if user_tie else
              "{times}× less than ") + ("the Python hand-off" if thread is not None else "the kernel switch")
              + (": a tie." if user_tie else "."),
              cheap_what=SWITCH_WORDS.get(cheapest, cheapest), cheap_ns=costs[cheapest],
              **({} if user_tie else {"times": rival.ns_per_switch / costs[cheapest]}))
    for bench in ("greenlet", "asyncio", "goroutine"):
        if bench in costs and bench != cheapest:
            b.add("{what}: {ns} ns.", prefix=f"{bench}.", what=SWITCH_WORDS[bench].capitalize(), ns=costs[bench])
    cross_x = _across_cpus(b, kernel, cross)
    _python_pinning(b, thread, loose, cross_x)
    if kernel is not None and thread is not None:
        return b.finding("A kernel thread switch costs {kernel_ns} ns; a Python thread hand-off {thread_ns} ns "
                         "({thread_ctx} kernel switches)" + (", {cheap_what} {cheap_ns} ns" if cheapest else ""))
    if thread is not None and cheapest and user_tie:
        return b.finding("A Python thread hand-off and {cheap_what} tie within noise: {thread_ns} ns vs {cheap_ns} ns")
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
    b.add("Across two CPUs it took {cross_ns} ns, {cross_x}× longer, with {cross_ctx} OS context switches per switch"
          + (" (so the extra time is not extra switches)." if similar else "."),
          cross_ns=cross.ns_per_switch, cross_x=x, cross_ctx=round(cross.ctx_per_switch, 2))
    costlier = False
    if _measured(same, "cpu_ns_per_switch") and _measured(cross, "cpu_ns_per_switch"):
        gap = cross.ns_per_switch - cross.cpu_ns_per_switch
        costlier = cross.cpu_ns_per_switch > same.cpu_ns_per_switch * MORE_SWITCHES
        direct = same.cpu_ns_per_switch >= BUSY * same.ns_per_switch
        b.add("Measured: on one CPU the two threads were running {same_busy}% of the time ("
              + ("the CPU passes from one to the other without idling" if direct else
                 "the rest went to other processes or idling: the counts cannot tell which")
              + "); across CPUs {cross_busy}%"
              + (", so for at least {gap_ns} ns of each switch neither thread ran" if gap > 0 else "")
              + ", and the CPU time per switch went from {same_cpu} to {cross_cpu} ns.",
              same_busy=100 * same.cpu_ns_per_switch / same.ns_per_switch,
              cross_busy=100 * cross.cpu_ns_per_switch / cross.ns_per_switch, gap_ns=max(gap, 0),
              same_cpu=same.cpu_ns_per_switch, cross_cpu=cross.cpu_ns_per_switch)
    b.add("A plausible reading, not measured here: a wake-up for another CPU is sent as an inter-processor "
          "interrupt, and that CPU, idle while its thread waited, has to leave its idle state first (or, busy with "
          "other processes, make the woken thread wait its turn)"
          + ("; sending and taking the interrupt is also kernel work charged to the threads" if costlier else "")
          + " (on a virtual machine both go through the hypervisor). On one CPU there is no interrupt and no idle "
          "CPU to wake.")
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
        crossing = cross_x is not None and cross_x > 1 + ABOUT_THE_SAME
        baseline = " (in the futex baseline a switch across CPUs cost {cross_x}× one on the same CPU)" if crossing \
            else ""
        if counted and loose.ctx_invol_per_switch < pinned.ctx_invol_per_switch / 2:
            why = ("; a plausible reading: unpinned, the woken thread seldom took the waker's CPU (fewer "
                   "involuntary switches), which fits it running on the other CPU, so every hand-off waits for a "
                   "wake-up across CPUs" + baseline + ".")
        elif counted:
            why = ("; with as many involuntary switches per hand-off as pinned, the counts do not show the "
                   "hand-offs crossing CPUs (the threads may mostly have shared one CPU), so they do not say why.")
        elif crossing:
            why = "; a plausible reading: unpinned, hand-offs can cross CPUs" + baseline + "."
        else:
            why = "; the counts here do not say why."
        b.add("Unpinned is {free_x}× slower" + (" although pinned makes more switches" if more else "") + why,
              free_x=1 / x, **({"cross_x": cross_x} if crossing else {}))


def per_request(pr: pd.DataFrame) -> Finding:
    if pr.empty:
        return nothing("server CPU and context switches per request were not measured in this run")
    b = Builder()
    lo, hi = _extremes(pr, "ctx_per_req")
    ctx_tie = lo is not None and len(pr) > 1 and derive.compare_medians(hi, lo, "ctx_per_req") == derive.TIE
    if lo is not None:
        hi_ctx, hi_facts = _spread("hi_ctx", hi, "ctx_per_req")
        lo_ctx, lo_facts = _spread("lo_ctx", lo, "ctx_per_req")
        b.add("Per request, {hi} made " + hi_ctx + " context switches and {lo} " + lo_ctx
              + (": a tie within noise." if ctx_tie else "."), hi=hi.variant, lo=lo.variant, **hi_facts, **lo_facts)
    clo, chi = _extremes(pr, "cpu_us_per_req")
    if clo is not None:
        clo_us, clo_facts = _spread("clo_us", clo, "cpu_us_per_req")
        chi_us, chi_facts = _spread("chi_us", chi, "cpu_us_per_req")
        cpu_tie = len(pr) > 1 and derive.compare_medians(chi, clo, "cpu_us_per_req") == derive.TIE
        b.add("Server CPU per request ranged from " + clo_us + " µs ({clo}) to " + chi_us + " µs ({chi})"
              + (", a tie within noise." if cpu_tie else "."), clo=clo.variant, chi=chi.variant, **clo_facts,
              **chi_facts)
    if lo is None:
        return b.finding("CPU per request: {clo} {clo_us} µs, {chi} {chi_us} µs")
    if ctx_tie:
        return b.finding("Context switches per request tie within noise: {lo} {lo_ctx}, {hi} {hi_ctx}")
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
        lo_ms, lo_facts = _spread("lo_ms", lo, "p99_us", 1 / 1000)
        hi_ms, hi_facts = _spread("hi_ms", hi, "p99_us", 1 / 1000)
        tie = len(served) > 1 and derive.compare_medians(hi, lo, "p99_us") == derive.TIE
        b.add("Probe p99 while holding: " + lo_ms + " ms ({lo}) to " + hi_ms + " ms ({hi})"
              + (", a tie within noise." if tie else "."), lo=lo.variant, hi=hi.variant, **lo_facts, **hi_facts)
    return b.finding("{k} of {n} variants hold {target} idle connections and keep serving")


# -- pitfalls -------------------------------------------------------------------------------------

def _worse(broken, fixed) -> bool:
    """Broken measured more than fixed (one case each, so a point interval each: derive.compare_medians)."""
    return derive.compare_medians(broken, fixed) == derive.HIGHER


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
        worse += ["leak"] if _worse(broken.close_wait_end.max(), fixed.close_wait_end.max()) else []
    broken, fixed = pair("no-deadline")
    if broken is not None and fixed is not None:
        starved = [v for v in broken.index if broken.loc[v, "served"] == 0 and broken.loc[v, "starved"] > 0]
        b.add("no-deadline: fresh clients were starved in {starved} broken.", prefix="nodeadline.",
              starved=_names(starved) if starved else "no variant")
        whole = [v for v in fixed.index if fixed.loc[v, "starved"] == 0]          # over every fixed variant
        if whole:
            b.add("Fixed, every fresh client was served in " + ("all {n} variants" if len(whole) == len(fixed)
                  else "{whole}") + ".", prefix="nodeadline.", n=len(fixed), whole=_names(whole))
        for v in [v for v in fixed.index if v not in whole]:
            b.add("Fixed, {v} served {served} of {sent} fresh clients ({starved} starved).",
                  prefix=f"nodeadline.{v}.", v=v, served=fixed.loc[v, "served"], sent=fixed.loc[v, "sent"],
                  starved=fixed.loc[v, "starved"])
        worse += ["no-deadline"] if _worse(broken.starved.sum(), fixed.starved.sum()) else []
    broken, fixed = pair("unbounded")
    if broken is not None and fixed is not None:
        growth = (broken.rss_kib_peak - broken.rss_kib_start) / 1024
        top = growth.idxmax()
        b.add("unbounded: without the cap RSS grew up to {mib} MiB ({v}); with it {rej} connections were "
              "refused with \"server busy\".", prefix="unbounded.", mib=growth.max(), v=top,
              rej=fixed.rejected.max())
        worse += ["unbounded"] if fixed.rejected.max() > 0 and _worse(broken.fds_peak.max(), fixed.fds_peak.max()) \
            else []
    broken, fixed = pair("hard-kill")
    if broken is not None and fixed is not None:
        b.add("hard-kill: SIGTERM lost {blost} replies in flight (total) without the drain, {flost} with it.",
              prefix="hardkill.", blost=broken.replies_lost.sum(), flost=fixed.replies_lost.sum())
        worse += ["hard-kill"] if _worse(broken.replies_lost.sum(), fixed.replies_lost.sum()) else []
    measured = sorted(set(summary.pitfall), key=[p.name for p in registry.pitfalls()].index)
    return b.finding("{k} of {n} pitfalls measured worse broken than fixed ({which})", k=len(worse),
                     n=len(measured), which=", ".join(worse) or "none")


# -- the trade-offs: pool sizing, message sizes, M:N ------------------------------------------------

TRACKS_BOUND = 0.8               # a pool size whose throughput reaches this fraction of its Little's-law bound
                                 # "follows the bound": there, one more worker still buys throughput


def _listed(name: str, values) -> tuple[str, dict]:
    """"{name0}, {name1}, ...": a list of numbers as a template piece whose every number is a fact."""
    values = list(values)
    return ", ".join("{" + f"{name}{i}" + "}" for i in range(len(values))), \
        {f"{name}{i}": v for i, v in enumerate(values)}


def pool_sizing(p: pd.DataFrame) -> Finding:
    """When a bigger pool helps (the I/O-bound curve on its Little's-law line) and what each worker costs."""
    if p.empty:
        return nothing("pool_sizing was not measured in this run")
    b = Builder()
    everything, ok = p, derive.valid(p)
    io = ok[(ok.load == "io") & ok.workers.notna()]
    title, title_facts = "pool_sizing has no valid I/O-bound pool point", {}
    costs = pool_costs(p)
    for variant, rows in io.groupby("variant", sort=False):
        measured = everything[(everything.variant == variant) & (everything.load == "io")].workers
        last = _pool_curve(b, variant, rows.sort_values("workers"), measured)
        kib = _pool_cost(b, variant, costs)
        if last is not None and "t_w" not in title_facts:
            title = "A bigger pool helps up to {t_w} workers ({t_v}, I/O-bound: {t_rps} rps on the Little's-law line)"
            title_facts = {"t_w": last.workers, "t_v": variant, "t_rps": last.throughput_rps}
            if kib is not None:
                title += "; each extra worker costs {t_kib} KiB RSS"
                title_facts["t_kib"] = kib
        elif last is None and not title_facts:
            title = "No valid pool size reached {t_share}% of its Little's-law bound"
            title_facts = {"t_share": 100 * TRACKS_BOUND}
    blocked = everything[(everything.head_of_line.fillna(0) > 0)] if "head_of_line" in everything else everything[:0]
    if not blocked.empty:
        sizes, size_facts = _listed("size", sorted(blocked.workers.dropna().unique()))
        b.add("Connection dispatch with fewer workers than connections (" + sizes + " workers): not every "
              "connection served (head-of-line blocking), so those points are left out, not read as slow.",
              prefix="hol.", **size_facts)
    beside = ok[(ok.load == "io") & ok.workers.isna()]
    if not beside.empty:
        top = beside.loc[beside.throughput_rps.idxmax()]
        rps, facts = _spread("b_rps", top, "throughput_rps")
        b.add("Beside it, {b_v} reached " + rps + " rps at the same I/O-bound load (its bound: connections / wait "
              "= {b_bound} rps).", prefix="beside.", b_v=top.variant, b_bound=top.little_bound_rps, **facts)
    _left_out(b, everything[~(everything.head_of_line.fillna(0) > 0)] if "head_of_line" in everything
              else everything)
    return b.finding(title, **title_facts)


def _pool_curve(b: Builder, variant: str, rows: pd.DataFrame, measured: pd.Series):
    """The sentence on where one pool's valid I/O-bound points leave their Little's-law bound; the last size on
    it (None: no size reached TRACKS_BOUND of its bound). ``measured``: every size it ran, invalid ones too."""
    prefix = f"{variant}."
    follows = rows[rows.throughput_rps >= TRACKS_BOUND * rows.little_bound_rps]
    if follows.empty:
        sizes, size_facts = _listed("size", rows.workers)
        b.add("{v}, I/O-bound: no valid pool size (" + sizes + " workers) reached {share}% of its Little's-law "
              "bound min(workers, connections) / wait.", prefix=prefix, v=variant, share=100 * TRACKS_BOUND,
              **size_facts)
        return None
    last = follows.iloc[-1]
    rps, facts = _spread("rps", last, "throughput_rps")
    beyond = rows[rows.workers > last.workers]
    text = ("{v}, I/O-bound: throughput follows the bound min(workers, connections) / wait up to {w} workers ("
            + rps + " rps against {bound}); ")
    unjudged = sorted(w for w in measured.dropna().unique() if w > last.workers)
    if beyond.empty and unjudged:
        sizes, size_facts = _listed("over", unjudged)
        b.add(text + "the larger sizes (" + sizes + " workers) had no valid point, so whether more workers help "
              "beyond {w} is not measured here.", prefix=prefix, v=variant, w=last.workers,
              bound=last.little_bound_rps, **facts, **size_facts)
    elif beyond.empty:
        b.add(text + "it did at every size measured: a bigger pool still helped at the largest one.",
              prefix=prefix, v=variant, w=last.workers, bound=last.little_bound_rps, **facts)
    else:
        nxt = beyond.iloc[0]
        b.add(text + "at {w2} workers the bound is {bound2} rps but it reached {rps2}: beyond {w} workers a bigger "
              "pool did not help.", prefix=prefix, v=variant, w=last.workers, bound=last.little_bound_rps,
              w2=nxt.workers, bound2=nxt.little_bound_rps, rps2=nxt.throughput_rps, **facts)
    return last


def _pool_cost(b: Builder, variant: str, costs: pd.DataFrame):
    """The sentence on what one more worker costs (the I/O-bound fit, else ECHO's); its RSS KiB (None: no fit)."""
    for load, label in (("io", "I/O-bound"), ("echo", "ECHO")):
        cost = costs[(costs.variant == variant) & (costs.load == load)]
        if cost.empty or pd.isna(cost.iloc[0].rss_kib_per_worker):
            continue
        c = cost.iloc[0]
        b.add("{v}: each extra worker costs {kib} KiB of RSS and {ctx} context switches per request (" + label
              + ", least squares over {k} valid sizes, {lo} to {hi} workers).", prefix=f"{variant}.cost.", v=variant,
              kib=c.rss_kib_per_worker, ctx=c.ctx_per_req_per_worker, k=c.points, lo=c.from_workers,
              hi=c.to_workers)
        return c.rss_kib_per_worker
    return None


def message_sizes(m: pd.DataFrame) -> Finding:
    """Who serves the most requests at the smallest payload, who moves the most bytes at the largest."""
    if m.empty:
        return nothing("message_sizes was not measured in this run")
    b = Builder()
    everything, m = m, derive.valid(m)
    if m.empty:
        return _nothing_valid(everything, "message_sizes")
    small, large = m["size"].min(), m["size"].max()
    at_small, at_large = m[m["size"] == small], m[m["size"] == large]
    top_s = at_small.loc[at_small.throughput_rps.idxmax()]
    top_l = at_large.loc[at_large.mb_per_s.idxmax()]
    rps, rps_facts = _spread("s_rps", top_s, "throughput_rps")
    mbps, mb_facts = _spread("l_mbps", top_l, "mb_per_s")
    ties_s, ties_l = _ties(at_small, top_s, "throughput_rps"), _ties(at_large, top_l, "mb_per_s")
    b.add("At {small} B {s_v} served the most requests, " + rps + " rps"
          + (" ({s_ties} tie within noise)" if ties_s else "") + ".", small=small, s_v=top_s.variant, **rps_facts,
          **({"s_ties": _names(ties_s)} if ties_s else {}))
    b.add("At {large} B {l_v} moved the most payload, " + mbps + " MB/s each way"
          + (" ({l_ties} tie within noise)" if ties_l else "") + ".", large=large, l_v=top_l.variant, **mb_facts,
          **({"l_ties": _names(ties_l)} if ties_l else {}))
    if large > small:
        for variant in dict.fromkeys(at_small.variant):
            a, z = at_small[at_small.variant == variant], at_large[at_large.variant == variant]
            if a.empty or z.empty or not z.iloc[0].throughput_rps:
                continue
            b.add("{v}: {fall}× fewer requests/s at {large} B than at {small} B, {gain}× the MB/s.",
                  prefix=f"{variant}.", v=variant, fall=a.iloc[0].throughput_rps / z.iloc[0].throughput_rps,
                  gain=z.iloc[0].mb_per_s / a.iloc[0].mb_per_s if a.iloc[0].mb_per_s else None,
                  large=large, small=small)
    _left_out(b, everything)
    return b.finding("Most requests at {small} B: {s_v}; most bytes at {large} B: {l_v} ({l_mbps} MB/s)")


def m_to_n(m: pd.DataFrame) -> Finding:
    """Logical units per OS thread, the most and the fewest."""
    if m.empty:
        return nothing("m_to_n was not measured in this run")
    b = Builder()
    held = m[m.held >= HELD_FRACTION * m.hold_target]
    for _, r in held.iterrows():
        b.add("{v}: {units} {unit} on {threads} OS threads ({ratio} per thread).", prefix=f"{r.variant}.",
              v=r.variant, units=r.logical_units, unit=unit_name(str(r.logical_unit)),
              threads=r.os_threads, ratio=r.units_per_thread)
    for _, r in m[~m.variant.isin(held.variant)].iterrows():
        b.add("{v} held only {held} of {target} connections, left out (its note says why).", prefix=f"{r.variant}.",
              v=r.variant, held=r.held, target=r.hold_target)
    lo, hi = _extremes(held, "units_per_thread")
    if lo is None:
        return b.finding("m_to_n: no thread count was read")
    return b.finding("Logical units per OS thread while holding {n} idle connections: {hi_ratio} on {hi_v}, "
                     "{lo_ratio} on {lo_v}", n=m.hold_target.max(), hi_ratio=hi.units_per_thread, hi_v=hi.variant,
                     lo_ratio=lo.units_per_thread, lo_v=lo.variant)


# -- the GIL: convoy and cores (frames: analysis.gil) --------------------------------------------------

DEFAULT_SWITCH_INTERVAL = 0.005          # CPython's: a threads case without --switch-interval runs with it
VERDICT_WORDS = {derive.LOWER: "lower", derive.HIGHER: "higher", derive.TIE: "tie within noise"}


def _verdict(verdict: str, than: str) -> str:
    """"lower than ...", "higher than ..." or "tie within noise" (derive.compare_medians's verdict in words)."""
    return VERDICT_WORDS[verdict] + ("" if verdict == derive.TIE else f" than {than}")


def _ratio(name: str, row, column: str) -> tuple[str, dict]:
    """"{name}× ({name_min}–{name_max})": a paired ratio and its min–max over rounds (gil.RATIO_SUFFIXES)."""
    piece, facts = _spread(name, row, column)
    return piece.replace("}", "}×", 1), facts


def _case_numbers(prefix: str, row) -> dict:
    """The numbers a case's name shows (switch interval in ms, processes, GOMAXPROCS, CPUs), as facts."""
    out = {}
    for key, scale in (("switch_interval", 1000), ("procs", 1), ("gomaxprocs", 1), ("n_server_cpus", 1)):
        value = row.get(key) if hasattr(row, "get") else None
        if value is not None and pd.notna(value):
            out[prefix + key] = float(value) * scale
    return out


def _reason_words(reason) -> str:
    """An invalid point's reason without its figures (those are in the table): what kind of failure it was."""
    text = str(reason or "")
    kinds = [words for marker, words in ((TOO_SHORT, TOO_SHORT), ("unanswered", "requests unanswered"),
                                         ("served", "not every connection served"),
                                         ("saturated", "the load generator saturated"),
                                         ("accepted only", "the server had not accepted every connection"))
             if marker in text]
    return ", ".join(kinds) or "marked invalid in the table"


def _single_process(c: pd.DataFrame, variant: str):
    """The one-process case of a Python model (threads: at CPython's default switch interval), or None."""
    rows = c[(c.variant == variant) & (c.procs.fillna(1) == 1)
             & (c.switch_interval.isna() | (c.switch_interval == DEFAULT_SWITCH_INTERVAL))]
    return rows.iloc[0] if not rows.empty else None


def convoy(c: pd.DataFrame) -> Finding:
    """How much ECHO p99 grew beside CPU work, per case; threads by switch interval; two processes; go."""
    if c.empty:
        return nothing("convoy was not measured in this run")
    b = Builder()
    everything, c = c, derive.valid(c)
    if c.empty:
        _convoy_left_out(b, everything)
        return b.finding("convoy has no case with both points valid")
    first = c.iloc[0]
    worst, best = c.loc[c.ratio_p99.idxmax()], c.loc[c.ratio_p99.idxmin()]
    w, w_facts = _ratio("w", worst, "ratio_p99")
    lo, lo_facts = _ratio("lo", best, "ratio_p99")
    verdict = derive.compare_medians(worst, best, "ratio_p99")
    b.add("With {k} connection(s) sending {cpu_ms} ms of CPU work beside {conns} ECHO connections at {rate} rps, "
          "ECHO p99 grew the most on {w_case}, " + w + ", and the least on {lo_case}, " + lo
          + (" (the two tie within noise)" if verdict == derive.TIE else "") + " (p99 with / without, paired per "
          "round).", k=first.cpu_conns, cpu_ms=first.cpu_us / 1000, conns=first.conns, rate=first.rate,
          w_case=worst.case, lo_case=best.case, **w_facts, **lo_facts, **_case_numbers("w.", worst),
          **_case_numbers("lo.", best))
    threads = c[(c.variant == "threads") & (c.procs.fillna(1) == 1) & c.switch_interval.notna()]
    if len(threads) > 1:
        pieces, facts = [], {}
        for i, (_, r) in enumerate(threads.sort_values("switch_interval").iterrows()):
            piece, f = _ratio(f"t{i}", r, "ratio_p99")
            pieces.append(piece + " at a {" + f"t{i}_si" + "} ms switch interval")
            facts.update(f, **{f"t{i}_si": r.switch_interval * 1000})
        b.add("threads: " + ", ".join(pieces) + ".", prefix="threads.", **facts)
    for variant in dict.fromkeys(c[c.procs.fillna(1) > 1].variant):
        one, two = _single_process(c, variant), c[(c.variant == variant) & (c.procs > 1)].iloc[0]
        if one is None:
            continue
        p1, f1 = _ratio("one", one, "ratio_p99")
        p2, f2 = _ratio("two", two, "ratio_p99")
        b.add("{v}: " + p1 + " on one process, " + p2 + " on {procs} ({verdict}).", prefix=f"{variant}.procs.",
              v=variant, procs=two.procs, verdict=_verdict(derive.compare_medians(two, one, "ratio_p99"), "on one process"),
              **f1, **f2)
    _convoy_offload(b, c)
    go = c[c.variant == "go"].sort_values("gomaxprocs")
    if len(go) > 1:
        g1, f1 = _ratio("g1", go.iloc[0], "ratio_p99")
        g2, f2 = _ratio("g2", go.iloc[-1], "ratio_p99")
        b.add("go: " + g1 + " at GOMAXPROCS {m1}, " + g2 + " at {m2} ({verdict}).", prefix="go.",
              m1=go.iloc[0].gomaxprocs, m2=go.iloc[-1].gomaxprocs,
              verdict=_verdict(derive.compare_medians(go.iloc[-1], go.iloc[0], "ratio_p99"), "at GOMAXPROCS 1"),
              **f1, **f2)
    shared = everything[everything.shares_loadgen_cpu.fillna(0).astype(bool)]
    if not shared.empty:
        b.add("The {n} case(s) on {cpus} CPUs ran on the load generators' CPU too: there the generators took CPU "
              "time from the server.", n=len(shared), cpus=shared.n_server_cpus.max())
    _convoy_left_out(b, everything)
    return b.finding("GIL convoy: ECHO p99 grew {w}× beside CPU work on {w_case}, {lo}× on {lo_case}")


def _convoy_offload(b: Builder, c: pd.DataFrame) -> None:
    """The event loops' fix on their own CPU: the ECHO p99 beside the CPU work with the work offloaded to a
    process pool against the loop computing it (absolute, not the ratio: the two cases' baselines differ by
    less than the machine's floor, and the fix is about the p99 under the CPU work)."""
    offloaded = c[c.case.str.endswith(OFFLOAD_OPTION) & (c.n_server_cpus.fillna(1) == 1)]
    for _, off in offloaded.iterrows():
        blocked = _single_process(c, off.variant)
        if blocked is None or pd.isna(blocked.get("p99_beside")) or pd.isna(off.get("p99_beside")):
            continue
        p_blocked, f_blocked = _spread("blocked", blocked, "p99_beside", MS_PER_US)
        p_off, f_off = _spread("off", off, "p99_beside", MS_PER_US)
        b.add("{v}: ECHO p99 beside the CPU work " + p_blocked + " ms with the loop computing it, " + p_off
              + " ms with it in a process pool on the same CPU ({verdict}).", prefix=f"{off.variant}.offload.",
              v=off.variant, verdict=_verdict(derive.compare_medians(off, blocked, "p99_beside"),
                                              "with the loop computing it"), **f_blocked, **f_off)


def _convoy_left_out(b: Builder, c: pd.DataFrame) -> None:
    bad = derive.invalid(c)
    if not bad.empty:
        numbers = {k: v for i, (_, r) in enumerate(bad.iterrows()) for k, v in _case_numbers(f"{i}.", r).items()}
        b.add("Left out, no round with both points valid: {cases}.", prefix="invalid.", **numbers,
              cases="; ".join(f"{r.case} ({_reason_words(r.invalid_reason)})" for _, r in bad.iterrows()))


def cores(c: pd.DataFrame, scaling: pd.DataFrame) -> Finding:
    """The 2-CPU scaling ratio per model and load, what 2 CPUs do for one threads process, RSS over processes."""
    if c.empty:
        return nothing("cores was not measured in this run")
    b = Builder()
    if scaling.empty:
        _cores_left_out(b, c)
        return b.finding("cores: no model has valid points on both 1 and 2 CPUs")
    full = scaling[scaling.scaling.str.contains("2 processes")]
    for load, words in (("cpu", "CPU-bound WORK"), ("echo", "ECHO")):
        rows = full[full.load == load]
        if rows.empty:
            continue
        pieces, facts = [], {}
        for i, (_, r) in enumerate(rows.iterrows()):
            piece, f = _ratio(f"r{i}", r, "ratio")
            pieces.append("{" + f"v{i}" + "} " + piece + " ({" + f"verdict{i}" + "})")
            facts.update(f, **{f"v{i}": r.variant, f"verdict{i}": _verdict(r.verdict, "on 1 CPU")})
        b.add(words + ", throughput on {two} CPUs with {two} processes (go: GOMAXPROCS {two}) over {one} CPU with "
              "{one}: " + ", ".join(pieces) + ".", prefix=f"{load}.", two=2, one=1, **facts)
    gil = scaling[(scaling.variant == "threads") & (scaling.load == "cpu") & scaling.scaling.str.contains("1 process")]
    if not gil.empty:
        g = gil.iloc[0]
        piece, f = _ratio("gil", g, "ratio")
        b.add("threads, one process, CPU-bound: {two} CPUs gave " + piece + " its {one}-CPU throughput ({verdict}): "
              + ("no gain from the second CPU, as one CPython process runs Python on one CPU at a time (the GIL)."
                 if g.verdict != derive.HIGHER else "a gain, so work outside the GIL (system calls, the kernel's "
                 "network stack) used the second CPU."), verdict=_verdict(g.verdict, "on 1 CPU"), two=2, one=1, **f)
    memory = []
    for variant in dict.fromkeys(c[c.procs.fillna(1) > 1].variant):
        one = c[(c.variant == variant) & (c.procs.fillna(1) == 1) & (c.load == "echo")].server_rss_kib.median()
        two = c[(c.variant == variant) & (c.procs > 1) & (c.load == "echo")]
        if pd.notna(one) and not two.empty:
            memory.append((variant, two.server_rss_kib.median() / 1024, two.server_procs.median(), one / 1024,
                           two.procs.max()))
    if memory:
        b.add("RSS summed over the server's processes (ECHO points, medians): "
              + ", ".join(f"{{m{i}_v}} {{m{i}_two}} MiB over {{m{i}_n}} processes with --procs {{m{i}_procs}} against "
                          f"{{m{i}_one}} MiB with one" for i in range(len(memory))) + ".",
              prefix="rss.", **{k: v for i, (variant, two, n, one, procs) in enumerate(memory)
                                for k, v in ((f"m{i}_v", variant), (f"m{i}_two", two), (f"m{i}_n", n),
                                             (f"m{i}_one", one), (f"m{i}_procs", procs))})
    if scaling.shares_loadgen_cpu.any():
        b.add("On {two} CPUs the server shared one with the load generator: a ratio below {two} is partly the "
              "generator's CPU time, not the model's limit.", two=2)
    _cores_left_out(b, c)
    cpu = full[full.load == "cpu"]
    if cpu.empty:
        cpu = full
    top = cpu.loc[cpu.ratio.idxmax()]
    title = "{two} CPUs over {one} ({load}): {top_v} ×{top} with {two} processes or GOMAXPROCS {two}"
    facts = {"load": "CPU-bound" if top.load == "cpu" else "ECHO", "top_v": top.variant, "top": top.ratio, "two": 2,
             "one": 1}
    if not gil.empty:
        title += "; threads, one process: ×{gil_title}"
        facts["gil_title"] = gil.iloc[0].ratio
    return b.finding(title, **facts)


def _cores_left_out(b: Builder, c: pd.DataFrame) -> None:
    bad = derive.invalid(c)
    if not bad.empty:
        numbers = {k: v for i, (_, r) in enumerate(bad.iterrows()) for k, v in _case_numbers(f"{i}.", r).items()}
        b.add("Left out as invalid: {points}.", prefix="invalid.", **numbers,
              points="; ".join(f"{r.case} {r.load} ({_reason_words(r.invalid_reason)})" for _, r in bad.iterrows()))
