"""Per-experiment frames the charts, findings and tables share: medians over repeats, one row per point.

Every function takes a loaded ``Run`` and returns a tidy DataFrame (empty when
the experiment has no rows). Medians are over repeats, as in summary.csv;
``saturated`` is 1 when a repeat the median was taken over had the load
generator saturated.

Spreads: for the ``SPREAD_VALUES`` columns ``medians`` adds, per point, the
min and max over the valid repeats (``<column>_min``, ``<column>_max``) and the
95 % interval of the median (``<column>_lo``, ``<column>_hi``; ``ci_flag``
"min-max" when fewer than 3 rounds made it): harness.stats.spread, the one
owner of the lab's statistics. ``compare_medians(a, b, column)`` is the one rule
the findings and claims rank by: "higher" or "lower" only when the two
intervals separate, else "tie" (within noise).

Invalid points (a connection never served, requests unanswered, the load
generator saturated, a window too short for its latency, connections the server
had not accepted: the table's ``valid`` = 0, see harness.loadproc.validity and
harness.run.accepted_check)
are never a headline, a ranking or a knee. ``medians`` takes the median over
the valid repeats of a point; a point with none is kept for the tables with
``valid`` False and ``invalid_reason``, and ``valid(frame)`` is what findings,
knees, claims and comparisons rank.
"""
from __future__ import annotations

import pandas as pd

from conclab.experiments.harness import schedule, stats, summary

from .style import order

DEFAULT_REFERENCE_CONNS = 50     # docs/experiments.md: the targets' point
KEEPUP = summary.KNEE_KEEPUP     # served at least this fraction of the offered rate = kept up
KNEE_P99_FACTOR = summary.KNEE_P99_FACTOR   # latency has bent once p99 exceeds this x its lightest-load value
SPECTRUM_FRACTION = 0.9          # the latency spectrum is drawn at this fraction of capacity (nearest measured)
PERCENTILES = {"p50_us": 50.0, "p90_us": 90.0, "p99_us": 99.0, "p999_us": 99.9, "p9999_us": 99.99}
THREAD_VARIANT = "threads"       # the thread-per-connection model ("1 MB per thread")
POOL_BACKEND = "threadpool"
MICRO = "micro"
SATURATED = "load generator saturated"     # harness.loadproc.SATURATED: the reason an old saturated row is invalid
PER_REQUEST = "server_per_request"
# The columns whose spread over rounds ``medians`` keeps (min, max, the median's 95 % interval).
SPREAD_VALUES = ("throughput_rps", "p50_us", "p99_us", "p999_us", "cpu_us_per_req", "ctx_per_req",
                 "server_cpu_percent", "rss_kib")
SPREAD_SUFFIXES = {"min": "_min", "max": "_max", "ci_lo": "_lo", "ci_hi": "_hi"}
# Columns whose interval is kept under other names (switch.csv: each benchmark's own min and max over its rounds).
INTERVAL_COLUMNS = {"ns_per_switch": ("ns_min", "ns_max")}
HIGHER, LOWER, TIE = stats.HIGHER, stats.LOWER, stats.TIE


def validity(frame: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per row: (valid, why not). The ``valid`` cell; where it is empty (an older run), valid unless the
    load generator was saturated (harness.summary.is_valid, row by row). A table without the column
    (memory, c10k, ...) is not judged."""
    index = frame.index
    if "valid" not in frame:
        return pd.Series(True, index), pd.Series(None, index, dtype=object)
    column = pd.to_numeric(frame["valid"], errors="coerce")
    saturated = (pd.to_numeric(frame["loadgen_saturated"], errors="coerce").fillna(0) > 0
                 if "loadgen_saturated" in frame else pd.Series(False, index))
    ok = column.ne(0).where(column.notna(), ~saturated).astype(bool)
    given = frame["invalid_reason"] if "invalid_reason" in frame else pd.Series(None, index, dtype=object)
    given = given.where(given.notna() & (given.astype(str).str.strip() != ""))
    fallback = pd.Series(SATURATED, index).where(saturated, "invalid")
    why = given.fillna(fallback).where(~ok)
    behind = behind_schedule(frame)                 # judged again: a run from before the harness judged it
    late_too = behind.notna() & ~why.fillna("").astype(str).str.contains(schedule.BEHIND, regex=False)
    why = why.where(~late_too, (why.fillna("") + "; ").where(why.notna(), "") + behind)
    return ok & behind.isna(), why


def behind_schedule(frame: pd.DataFrame) -> pd.Series:
    """Per row of an open loop (a table with ``offered``, ``late``, ``unsent``): harness.schedule.behind_schedule's
    reason, or None (rows of other tables: None)."""
    if not {"offered", "late", "unsent"} <= set(frame.columns):
        return pd.Series(None, frame.index, dtype=object)
    numbers = frame.reindex(columns=["offered", "late", "unsent", "own_late"]).apply(pd.to_numeric, errors="coerce")
    return pd.Series([schedule.behind_schedule(*row) for row in numbers.itertuples(index=False)], frame.index,
                     dtype=object)


def medians(frame: pd.DataFrame, keys: list, values: list) -> pd.DataFrame:
    """Median of values per keys over the valid repeats (all of them if none is valid), plus n, saturated,
    valid (some repeat was) and invalid_reason (why not, for a point with no valid repeat); variant order."""
    if frame.empty:
        return pd.DataFrame(columns=[*keys, *values, "n", "saturated", "valid", "invalid_reason"])
    present = [v for v in values if v in frame and v not in keys]
    ok, why = validity(frame)
    frame = frame.assign(_ok=ok, _why=why)
    some_valid = frame.groupby(keys, dropna=False)["_ok"].transform("any").astype(bool)
    frame = frame[frame["_ok"] | ~some_valid]
    grouped = frame.groupby(keys, dropna=False)
    out = grouped[present].median(numeric_only=True)
    out["n"] = grouped.size()
    out["saturated"] = grouped["loadgen_saturated"].max().fillna(0) if "loadgen_saturated" in frame else 0
    out["valid"] = grouped["_ok"].any().astype(bool)
    reasons = grouped["_why"].agg(lambda s: "; ".join(dict.fromkeys(s.dropna().astype(str))) or None)
    out["invalid_reason"] = reasons.where(~out["valid"], None)
    for value in (v for v in SPREAD_VALUES if v in present):
        spreads = grouped[value].agg(list).map(stats.spread)           # indexed as ``out``
        for field, suffix in SPREAD_SUFFIXES.items():
            out[value + suffix] = spreads.map(lambda d, f=field: d[f] if d else float("nan")).astype(float)
    out["ci_flag"] = [stats.CI_MIN_MAX if n < stats.MIN_BOOTSTRAP_N else stats.CI_BOOTSTRAP for n in out["n"]]
    return sort_variants(out.reset_index())


def interval(row, column: str) -> tuple[float, float] | None:
    """(lo, hi) of ``column`` in one derived row: its median's 95 % interval (``_lo``/``_hi``), else its min and
    max over repeats (``_min``/``_max``, or INTERVAL_COLUMNS), else the median alone (a point: one round measured
    no noise). A plain number is its own interval. None: no value."""
    if row is None:
        return None
    if isinstance(row, (int, float)) and not isinstance(row, bool):
        return stats.interval(row)
    get = row.get if hasattr(row, "get") else (lambda key, default=None: getattr(row, key, default))
    for lo, hi in ((column + "_lo", column + "_hi"), (column + "_min", column + "_max"),
                   INTERVAL_COLUMNS.get(column, (None, None))):
        if lo is not None:
            pair = stats.interval((get(lo, None), get(hi, None)))
            if pair is not None:
                return pair
    return stats.interval(get(column, None))


def compare_medians(a, b, column: str | None = None) -> str:
    """"higher" | "lower" | "tie": a's median against b's, ranked only where their intervals separate.

    a, b: rows of a derived frame (``column`` and its interval, see ``interval``) or plain numbers (a model's
    ceiling, a claim's figure: a point interval). The one comparison every finding and claim ranks by
    (harness.stats.compare); "tie" means within noise, and is what a sentence must then say.
    """
    return stats.compare(interval(a, column) if column else stats.interval(a),
                         interval(b, column) if column else stats.interval(b))


def tied_with(frame: pd.DataFrame, row, column: str) -> list:
    """The variants of ``frame`` (other than row's) whose ``column`` ties with row's within noise."""
    if frame.empty or row is None:
        return []
    return [r["variant"] for _, r in frame.iterrows()
            if r["variant"] != row["variant"] and pd.notna(r.get(column))
            and compare_medians(r, row, column) == TIE]


def valid(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of a derived frame that may be ranked and quoted (all of them when it has no ``valid``)."""
    if frame.empty or "valid" not in frame:
        return frame
    return frame[frame["valid"].astype(bool)].reset_index(drop=True)


def invalid(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows left out as invalid (with their ``invalid_reason``)."""
    if frame.empty or "valid" not in frame:
        return frame.iloc[0:0]
    return frame[~frame["valid"].astype(bool)].reset_index(drop=True)


def sort_variants(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or "variant" not in frame:
        return frame
    rank = {v: i for i, v in enumerate(order(frame["variant"].unique()))}
    others = [c for c in frame.columns if c != "variant"][:1]
    return frame.assign(_rank=frame["variant"].map(rank)).sort_values(["_rank", *others]).drop(columns="_rank") \
        .reset_index(drop=True)


def reference_conns(run) -> int:
    return int(run.profile.get("reference_conns") or DEFAULT_REFERENCE_CONNS)


# -- memory -------------------------------------------------------------------------------------

MIN_R2_POINTS = 3                # experiments.memory: a fit through fewer points has no r² (2 points: r² = 1 always)
# What one idle connection costs, in parts (memory_kernel): the process's RSS, then the kernel's memory, which no RSS
# includes (the server's share: the load generator's end of each connection subtracted; experiments.memory).
MEMORY_PARTS = {"rss_kib": "process RSS", "kernel_sock_kib": "kernel: sockets",
                "kernel_stack_kib": "kernel: thread stacks", "kernel_slab_kib": "kernel: slab",
                "kernel_pte_kib": "kernel: page tables"}
KERNEL_PARTS = [part for part in MEMORY_PARTS if part != "rss_kib"]
MEMORY_FIT_COLUMNS = ["variant", "metric", "per_conn", "per_conn_min", "per_conn_max", "intercept", "r2",
                      "max_abs_residual", "n_points", "repeats"]
MEMORY_KERNEL_COLUMNS = ["variant", *MEMORY_PARTS, "kernel_kib", "total_kib", "kernel_kib_min", "kernel_kib_max",
                         "kernel_both_kib", "client_kib", "rss_r2", "kernel_r2", "rss_points", "kernel_points"]


def memory_points(run) -> pd.DataFrame:
    """Medians per (variant, N); rss_fit_kib: the variant's fitted RSS line (memory_fits: median slope and
    intercept over repeats) at that point's n_conns, rss_r2 its r² (NaN: too few points for one)."""
    points = medians(run.tables["memory"], ["variant", "n_target"],
                     ["n_conns", "rss_kib", "uss_kib", "vms_kib", "threads", "fds", "connect_errors",
                      "time_wait_delta"])
    fits = memory_fits(run)
    rss = fits[fits.metric == "rss_kib"] if not fits.empty else fits
    if points.empty or rss.empty:
        return points
    points = points.merge(rss[["variant", "per_conn", "intercept", "r2"]], on="variant", how="left")
    points["rss_fit_kib"] = points.intercept + points.per_conn * points.n_conns
    return points.drop(columns=["per_conn", "intercept"]).rename(columns={"r2": "rss_r2"})


def memory_fits(run) -> pd.DataFrame:
    """memory_fit.csv per (variant, metric), over repeats: the median slope (per_conn), its min and max, the
    median intercept, r² and largest residual, the points per fit and the repeats. r² and the residual are NaN
    for a fit through fewer than MIN_R2_POINTS points (an older run wrote r² = 1 for a line through 2 points)."""
    fit = run.tables["memory_fit"]
    if fit.empty:
        return pd.DataFrame(columns=MEMORY_FIT_COLUMNS)
    judged = pd.to_numeric(fit.n_points, errors="coerce") >= MIN_R2_POINTS
    fit = fit.assign(r2=fit.r2.where(judged), max_abs_residual=fit.max_abs_residual.where(judged))
    grouped = fit.groupby(["variant", "metric"])
    out = grouped[["per_conn", "intercept", "r2", "max_abs_residual", "n_points"]].median()
    out["per_conn_min"], out["per_conn_max"], out["repeats"] = grouped.per_conn.min(), grouped.per_conn.max(), \
        grouped.size()
    return sort_variants(out.reset_index())[MEMORY_FIT_COLUMNS]


def memory_slopes(run) -> pd.DataFrame:
    """One row per variant: the median slope over repeats of every memory_fit metric (KiB per connection of
    RSS, USS, VMS, the kernel's parts...), and of the RSS fit: r² (rss_r2, NaN with too few points), points
    (rss_points), largest residual (rss_max_residual_kib), the slope's spread (rss_kib_min, rss_kib_max), repeats."""
    fits = memory_fits(run)
    if fits.empty:
        return pd.DataFrame(columns=["variant", "rss_kib", "uss_kib", "vms_kib", "threads", "rss_r2"])
    per_conn = fits.pivot_table(index="variant", columns="metric", values="per_conn", aggfunc="median")
    rss = fits[fits.metric == "rss_kib"].set_index("variant")
    extra = pd.DataFrame({"rss_r2": rss.r2, "rss_points": rss.n_points, "rss_max_residual_kib": rss.max_abs_residual,
                          "rss_kib_min": rss.per_conn_min, "rss_kib_max": rss.per_conn_max, "repeats": rss.repeats})
    return sort_variants(per_conn.join(extra).reset_index())


def memory_kernel(run) -> pd.DataFrame:
    """One row per variant whose kernel memory was measured, KiB per idle connection: the MEMORY_PARTS (process
    RSS, then the kernel's: the server's share), kernel_kib (the kernel parts' sum; its spread over repeats),
    total_kib (RSS + kernel), kernel_both_kib (the machine's change: both ends, nothing subtracted), client_kib
    (the load generator's end, subtracted); r² and points of the RSS and kernel fits. A variant whose kernel had
    too few undisturbed points for a line has NaN there. Empty: no variant has a kernel line."""
    fits = memory_fits(run)
    by = fits.set_index(["variant", "metric"]) if not fits.empty else fits
    kernel = fits[fits.metric == "kernel_kib"] if not fits.empty else fits
    variants = kernel.variant if not kernel.empty and kernel.per_conn.notna().any() else []
    rows = []
    for variant in variants:
        def get(metric, column="per_conn"):
            value = by[column].get((variant, metric)) if column in by else None
            return float(value) if value is not None and pd.notna(value) else float("nan")
        row = {"variant": variant, **{m: get(m) for m in [*MEMORY_PARTS, "kernel_kib", "kernel_both_kib",
                                                            "client_kib"]}}
        row.update(total_kib=row["rss_kib"] + row["kernel_kib"], kernel_kib_min=get("kernel_kib", "per_conn_min"),
                   kernel_kib_max=get("kernel_kib", "per_conn_max"), rss_r2=get("rss_kib", "r2"),
                   kernel_r2=get("kernel_kib", "r2"), rss_points=get("rss_kib", "n_points"),
                   kernel_points=get("kernel_kib", "n_points"))
        rows.append(row)
    return sort_variants(pd.DataFrame(rows, columns=MEMORY_KERNEL_COLUMNS))


# -- throughput and latency -----------------------------------------------------------------------

LOAD_VALUES = ["throughput_rps", "p50_us", "p90_us", "p99_us", "p999_us", "p9999_us", "max_us", "errors",
               "requests", "cpu_us_per_req", "ctx_per_req", "server_cpu_percent", "workers", "conns",
               "conns_served", "unanswered", "max_unanswered_wait_us", "server_conns_active"]


def throughput(run) -> pd.DataFrame:
    return medians(run.tables["throughput"], ["variant", "conns"], LOAD_VALUES)


def at_reference(run) -> pd.DataFrame:
    """Throughput rows at the reference concurrency (closed loop, 64 B ECHO); invalid ones flagged, not dropped."""
    t = throughput(run)
    return t[t.conns == reference_conns(run)].reset_index(drop=True) if not t.empty else t


def latency(run) -> pd.DataFrame:
    return medians(run.tables["latency"], ["variant", "rate_fraction"],
                   ["offered_rps", "capacity_rps", *LOAD_VALUES])


def knees(run) -> pd.DataFrame:
    """Per variant: where latency under load bends (served_knee, p99_knee, top_rps, knee, where).

    The definition is harness.summary.knee, the one place the knee is computed; this applies it to each
    variant's valid rows of latency.csv (a variant without any: ``where`` "no valid point"), and to each
    round's rows apart: ``knee_min`` .. ``knee_max`` and ``knee_lo`` .. ``knee_hi`` (the interval) are over
    the rounds that had a knee in range (``knee_rounds`` of them).
    """
    rows = run.tables["latency"]
    ok, _ = validity(rows)
    rows = rows.assign(valid=ok.astype(float))           # an older run's empty cells judged as medians() does
    out = []
    for variant in order(rows.variant.dropna().unique()):
        mine = rows[rows.variant == variant]
        per_round = [summary.knee(group.to_dict("records"))["knee"] for _, group in mine.groupby("repeat")]
        spread = stats.spread(per_round) or {}
        out.append({"variant": variant, **summary.knee(mine.to_dict("records")),
                    "knee_min": spread.get("min"), "knee_max": spread.get("max"),
                    "knee_lo": spread.get("ci_lo"), "knee_hi": spread.get("ci_hi"), "knee_rounds": spread.get("n", 0)})
    return pd.DataFrame(out, columns=["variant", *summary.KNEE_FIELDS, "knee_min", "knee_max", "knee_lo", "knee_hi",
                                      "knee_rounds"])


def spectrum(run) -> tuple[pd.DataFrame, pd.DataFrame, float | None]:
    """The spectrum's points (variant, percentile, latency_us), the latency rows they come from, and the
    fraction of capacity (nearest SPECTRUM_FRACTION) they were measured at; empty without valid latency rows."""
    lat = valid(latency(run))
    if lat.empty:
        return _percentile_rows(lat), lat, None
    chosen = min(lat.rate_fraction.dropna().unique(), key=lambda f: (abs(f - SPECTRUM_FRACTION), -f))
    rows = lat[lat.rate_fraction == chosen]
    return _percentile_rows(rows), rows, chosen


def _percentile_rows(rows: pd.DataFrame) -> pd.DataFrame:
    out = []
    for _, r in rows.iterrows():
        for column, p in PERCENTILES.items():
            if pd.notna(r.get(column)):
                out.append({"variant": r.variant, "percentile": p, "latency_us": r[column]})
        max_p = 100.0 * (1 - 1 / r["requests"]) if r.get("requests", 0) > 1 else None
        if pd.notna(r.get("max_us")) and max_p and max_p > max(PERCENTILES.values()):
            out.append({"variant": r.variant, "percentile": max_p, "latency_us": r["max_us"]})
    return pd.DataFrame(out, columns=["variant", "percentile", "latency_us"])


# -- io_bound, cpu_bound ----------------------------------------------------------------------------

def io_bound(run) -> pd.DataFrame:
    return medians(run.tables["io_bound"], ["variant", "conns"],
                   ["throughput_rps", "little_ceiling_rps", "conc_ceiling_rps", "p50_us", "p99_us", "errors",
                    "workers", "io_us", "conns_served", "unanswered", "cpu_us_per_req", "ctx_per_req",
                    "server_cpu_percent"])


def cpu_bound(run) -> pd.DataFrame:
    """Per variant and number of server CPUs: the best median throughput over concurrency, and its ceiling."""
    t = medians(run.tables["cpu_bound"], ["variant", "n_server_cpus", "conns"],
                ["throughput_rps", "ceiling_rps", "p99_us", "server_cpu_percent", "errors", "cpu_us",
                 "conns_served", "unanswered", "cpu_us_per_req", "ctx_per_req"])
    if t.empty:
        return t
    t = t.assign(_rank=t["valid"].astype(bool))          # the best valid point; the best invalid one only if none
    t = t[t["_rank"] | ~t.groupby(["variant", "n_server_cpus"])["_rank"].transform("any").astype(bool)]
    best = t.loc[t.groupby(["variant", "n_server_cpus"])["throughput_rps"].idxmax().dropna()]
    return sort_variants(best.drop(columns="_rank").reset_index(drop=True))


# -- switch ---------------------------------------------------------------------------------------

KERNEL_GROUP, RUNTIME_GROUP = "kernel", "runtime-level"
# What each microbenchmark measures (switch.csv ``bench``): the label of its row, bar and sentence. {where} is
# its placement, {each} the kernel switches it took per hand-off (where counted).
SWITCH_MEASURES = {
    "futex": "kernel thread switch (futex, {where})",
    "pipe": "kernel thread switch (pipe, {where})",
    "process_pipe": "process switch (Python processes, pipe, {where})",
    "thread": "Python thread hand-off (lock + GIL{each}), {where}",
    "goroutine": "goroutine switch (Go, unbuffered channel), {where}",
    "greenlet": "greenlet switch",
    "asyncio": "coroutine switch (asyncio)",
    "uvloop": "coroutine switch (uvloop)",
    "generator": "generator switch (send/yield)",
}
SWITCH_GROUPS = {"futex": KERNEL_GROUP, "pipe": KERNEL_GROUP, "process_pipe": KERNEL_GROUP, "thread": KERNEL_GROUP}
TWO_CPU_BENCHES = ("futex", "pipe")      # not pinned = one thread pinned on each of two CPUs (else: left free)
SWITCH_COLUMNS = ["measures", "group", "variant", "bench", "pinned", "ns_per_switch", "ns_min", "ns_max",
                  "ctx_per_switch", "ctx_invol_per_switch", "cpu_ns_per_switch"]


def switch_placement(bench: str, pinned: bool) -> str:
    if pinned:
        return "same CPU"
    return "across CPUs" if bench in TWO_CPU_BENCHES else "unpinned"


def switch_label(bench: str, pinned: bool, ctx_per_switch=None) -> str:
    """What one microbenchmark row measures, in words: "kernel thread switch (futex, same CPU)"."""
    each = ""
    if ctx_per_switch is not None and pd.notna(ctx_per_switch):
        k = round(float(ctx_per_switch), 1)
        each = f"; ~{k:g} kernel switch{'' if k == 1 else 'es'} each"
    template = SWITCH_MEASURES.get(bench, bench + ", {where}")
    return template.format(where=switch_placement(bench, bool(pinned)), each=each)


def switch_micro(run) -> pd.DataFrame:
    """Microbenchmarks: one row per (bench, pinned), medians over repeats: ns per switch, and per switch the OS
    context switches (all, and the involuntary ones) and CPU ns of both parties; ``measures`` says what the row
    measures, ``group`` whether the kernel or a runtime switches. Kernel rows first, slowest first."""
    s = run.tables["switch"]
    s = s[s.backend == MICRO]
    if s.empty:
        return pd.DataFrame(columns=SWITCH_COLUMNS)
    switches = 2 * pd.to_numeric(s["iterations"], errors="coerce") * pd.to_numeric(s["rounds"], errors="coerce")
    switches = switches.where(switches > 0)
    counted = (s["ctx_voluntary"] + s["ctx_involuntary"]) / switches            # runs older than ctx_per_req
    given = pd.to_numeric(s["ctx_per_req"], errors="coerce") if "ctx_per_req" in s else counted * float("nan")
    cpu = pd.to_numeric(s["cpu_us_per_req"], errors="coerce") * 1000 if "cpu_us_per_req" in s else counted * float("nan")
    s = s.assign(pinned=s["pinned"].astype(bool), ctx_per_switch=given.fillna(counted),
                 ctx_invol_per_switch=s["ctx_involuntary"] / switches, cpu_ns_per_switch=cpu)
    out = s.groupby(["variant", "bench", "pinned"])[SWITCH_COLUMNS[5:]].median().reset_index()
    out["measures"] = [switch_label(r.bench, r.pinned, r.ctx_per_switch if r.bench == "thread" else None)
                       for r in out.itertuples()]
    out["group"] = [SWITCH_GROUPS.get(b, RUNTIME_GROUP) for b in out.bench]
    out = out.assign(_kernel=out.group == KERNEL_GROUP).sort_values(["_kernel", "ns_per_switch"], ascending=False)
    return out[SWITCH_COLUMNS].reset_index(drop=True)


def per_request(run) -> pd.DataFrame:
    """Per server variant: CPU µs and context switches per request at the reference point."""
    s = run.tables["switch"]
    s = s[(s.backend != MICRO) & (s.bench == PER_REQUEST)]
    if s.empty:
        ref = valid(at_reference(run))
        keep = [c for c in ref.columns if c == "variant" or c.startswith(("cpu_us_per_req", "ctx_per_req"))]
        return ref[keep].dropna(how="all", subset=["cpu_us_per_req"]) \
            if not ref.empty else pd.DataFrame(columns=["variant", "cpu_us_per_req", "ctx_per_req"])
    return medians(s, ["variant"], ["cpu_us_per_req", "ctx_per_req"])          # with their spread over rounds


# -- c10k -----------------------------------------------------------------------------------------

def c10k(run) -> pd.DataFrame:
    c = run.tables["c10k"]
    if c.empty:
        return pd.DataFrame(columns=["variant", "hold_target", "held", "connect_errors", "requests", "errors",
                                     "p99_us", "rss_kib", "threads", "note", "saturated"])
    out = medians(c, ["variant"], ["hold_target", "held", "connect_errors", "probe_conns", "requests", "errors",
                                   "throughput_rps", "p50_us", "p99_us", "rss_kib", "vms_kib", "threads", "fds",
                                   "workers"])
    notes = c.groupby("variant")["note"].agg(lambda s: "; ".join(sorted(set(s.dropna()))))
    return out.merge(notes.reset_index(), on="variant", how="left")
