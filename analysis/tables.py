"""The tables under each experiment's charts: medians over repeats, pivoted to read across.

``experiment_tables(run, experiment)`` returns (caption, DataFrame) pairs; the
page renders them with analysis.html.table. Units are in the column names.
An invalid point (derive.valid) is shown, marked ``INVALID_MARK``, and listed
with its reason in the experiment's "left out" table; the findings never use it.
A cell of a metric with a spread over rounds reads "median (min–max)"; each load
experiment also has a long table of its medians with min, max and the 95 %
interval of the median (``spread_table``; derive.SPREAD_VALUES), and the server's
CPU µs per request next to its throughput.
"""
from __future__ import annotations

import pandas as pd

from . import derive
from .fmt import MISSING, num
from .results import Run

MS_PER_US = 1e-3
MIB_PER_KIB = 1 / 1024
INVALID_MARK = "✗"                 # after the number of an invalid point (left out of the findings)
INVALID_NOTE = f" ({INVALID_MARK}: invalid point, left out of the findings; why: the table below)"


def pivot(frame: pd.DataFrame, columns: str, values: str, label: str, scale: float = 1.0) -> pd.DataFrame:
    """One row per variant, one column per point (``label`` + the point's number); invalid points marked; where
    the frame has the value's spread over rounds, a cell is "median (min–max)"."""
    if frame.empty:
        return frame
    p = frame.pivot_table(index="variant", columns=columns, values=values, aggfunc="median") * scale
    if f"{values}_min" in frame and f"{values}_max" in frame:
        lo = frame.pivot_table(index="variant", columns=columns, values=f"{values}_min", aggfunc="median") * scale
        hi = frame.pivot_table(index="variant", columns=columns, values=f"{values}_max", aggfunc="median") * scale
        p = p.astype(object)
        for variant in p.index:
            for point in p.columns:
                value, a, b = p.at[variant, point], _at(lo, variant, point), _at(hi, variant, point)
                if pd.notna(value) and a is not None and b is not None and num(a) != num(b):
                    p.at[variant, point] = f"{num(value)} ({num(a)}–{num(b)})"
    bad = derive.invalid(frame)
    if not bad.empty:
        p = p.astype(object)
        for r in bad.itertuples():
            value = p.at[r.variant, getattr(r, columns)] if r.variant in p.index else None
            if value is not None and not (isinstance(value, float) and pd.isna(value)):
                p.at[r.variant, getattr(r, columns)] = f"{num(value)} {INVALID_MARK}"
    p.columns = [f"{label}{c:g}" for c in p.columns]
    return derive.sort_variants(p.reset_index())


def _at(frame: pd.DataFrame, row, column):
    value = frame.at[row, column] if row in frame.index and column in frame.columns else None
    return value if value is not None and pd.notna(value) else None


# metric column -> (label, scale) of the spread tables
SPREAD_LABELS = {"throughput_rps": ("throughput (rps)", 1.0), "p50_us": ("p50 (ms)", MS_PER_US),
                 "p99_us": ("p99 (ms)", MS_PER_US), "p999_us": ("p99.9 (ms)", MS_PER_US),
                 "cpu_us_per_req": ("server CPU per request (µs)", 1.0),
                 "ctx_per_req": ("context switches per request", 1.0),
                 "server_cpu_percent": ("server CPU (% of one CPU, measured window)", 1.0)}


def spread_table(frame: pd.DataFrame, point: str, label: str, metrics=tuple(SPREAD_LABELS)) -> tuple:
    """(caption, long table): per valid point and metric the median, min, max over the rounds, the 95 % interval
    of the median and how it was made (harness.stats: a bootstrap, or min–max with fewer than 3 rounds)."""
    caption_text = ("Medians over the rounds with their spread: min, max and the 95 % interval of the median "
                    "(bootstrap; with fewer than 3 rounds the interval is min–max, flagged). Two backends are "
                    "ranked only where their intervals separate.")
    rows = []
    for _, r in derive.valid(frame).iterrows():
        for metric in metrics:
            if metric not in r or pd.isna(r.get(metric)):
                continue
            name, scale = SPREAD_LABELS[metric]
            lo, hi = r.get(f"{metric}_lo"), r.get(f"{metric}_hi")
            rows.append({"variant": r["variant"], label: r[point], "metric": name, "median": num(r[metric] * scale),
                         "min": num(r.get(f"{metric}_min", r[metric]) * scale),
                         "max": num(r.get(f"{metric}_max", r[metric]) * scale),
                         "95% interval": f"{num(lo * scale)}–{num(hi * scale)}" if pd.notna(lo) and pd.notna(hi)
                         else "–", "rounds": num(r.get("n")), "interval": r.get("ci_flag", "")})
    return caption_text, pd.DataFrame(rows)


def caption(text: str, frame: pd.DataFrame) -> str:
    return text + (INVALID_NOTE if not derive.invalid(frame).empty else "")


def left_out(frame: pd.DataFrame, point: str, label: str) -> tuple:
    """("Invalid points, left out of the findings", one row per invalid point and why), empty if none."""
    bad = derive.invalid(frame)
    columns = {"variant": "variant", point: label, "conns_served": "connections served",
               "conns": "of connections", "unanswered": "requests unanswered",
               "max_unanswered_wait_us": "oldest unanswered waited (ms)", "invalid_reason": "why"}
    if point == "conns":
        columns[point] = "connections"
    present = [c for c in columns if c in bad]
    rows = bad[present].copy()
    if "max_unanswered_wait_us" in rows:
        rows["max_unanswered_wait_us"] = rows["max_unanswered_wait_us"] * MS_PER_US
    return ("Invalid points, left out of the findings", rows.rename(columns=columns))


SLOPE_COLUMNS = {"rss_kib": "RSS KiB/conn", "rss_kib_min": "min over repeats", "rss_kib_max": "max over repeats",
                 "uss_kib": "USS KiB/conn", "vms_kib": "VMS KiB/conn", "threads": "threads/conn", "fds": "fds/conn",
                 "rss_r2": "RSS fit r²", "rss_max_residual_kib": "largest residual (KiB)", "rss_points": "points"}
KERNEL_COLUMNS = {**{part: f"{label} KiB/conn" for part, label in derive.MEMORY_PARTS.items()},
                  "kernel_kib": "kernel KiB/conn", "kernel_kib_min": "kernel min over repeats",
                  "kernel_kib_max": "kernel max over repeats", "total_kib": "total KiB/conn",
                  "kernel_both_kib": "kernel, both ends (nothing subtracted)",
                  "client_kib": "load generator's end (subtracted)", "kernel_r2": "kernel fit r²",
                  "kernel_points": "kernel fit points"}


def no_r2(frame: pd.DataFrame, r2: str, points: str) -> pd.DataFrame:
    """The r² column as text: 4 decimals (3 digits would round 0.9996 to 1), or why there is none where a fit
    had too few points for one ("2 points: no r²")."""
    if frame.empty or r2 not in frame or points not in frame:
        return frame
    text = [f"{num(k)} points: no r²" if pd.isna(v) and pd.notna(k) and k < derive.MIN_R2_POINTS
            else f"{v:.4f}" if pd.notna(v) else v for v, k in zip(frame[r2], frame[points])]
    return frame.assign(**{r2: pd.Series(text, index=frame.index, dtype=object)})


def memory(run: Run) -> list:
    points = derive.memory_points(run)
    slopes = no_r2(derive.memory_slopes(run), "rss_r2", "rss_points")
    slopes = slopes[["variant", *[c for c in SLOPE_COLUMNS if c in slopes]]].rename(columns=SLOPE_COLUMNS)
    split = no_r2(derive.memory_kernel(run), "kernel_r2", "kernel_points")
    out = [("RSS (MiB) by idle connections held", pivot(points, "n_target", "rss_kib", "n=", MIB_PER_KIB)),
           ("Connections actually held", pivot(points, "n_target", "n_conns", "n=")),
           ("Per-connection slopes (least squares, median over repeats)", slopes)]
    if not split.empty:
        out.append(("Per idle connection: process RSS + kernel (the server's share; least squares, median over "
                    "repeats)", split[["variant", *KERNEL_COLUMNS]].rename(columns=KERNEL_COLUMNS)))
    return out


def throughput(run: Run) -> list:
    t = derive.throughput(run)
    return [(caption("Throughput (rps) by concurrency: median (min–max over rounds)", t),
             pivot(t, "conns", "throughput_rps", "conns=")),
            (caption("Server CPU per request (µs) by concurrency: what that throughput cost", t),
             pivot(t, "conns", "cpu_us_per_req", "conns=")),
            (caption("p99 latency (ms) by concurrency", t), pivot(t, "conns", "p99_us", "conns=", MS_PER_US)),
            spread_table(t, "conns", "connections"), left_out(t, "conns", "conns")]


def latency(run: Run) -> list:
    knees = derive.knees(run).rename(columns={
        "served_knee": f"served ≥{derive.KEEPUP:.0%} up to (rps)",
        "p99_knee": f"p99 < {derive.KNEE_P99_FACTOR}× up to (rps)",
        "top_rps": "highest offered (rps)", "knee": "knee (rps)", "where": "knee is",
        "knee_min": "knee min (rps)", "knee_max": "knee max (rps)", "knee_lo": "knee 95% lo", "knee_hi": "knee 95% hi",
        "knee_rounds": "rounds with a knee"})
    lat = derive.latency(run)
    p99 = pivot(lat, "rate_fraction", "p99_us", "p99 ms @", MS_PER_US)
    return [(caption("p99 (ms) by offered load (fraction of capacity): median (min–max over rounds)", lat), p99),
            (caption("Server CPU per request (µs) by offered load", lat),
             pivot(lat, "rate_fraction", "cpu_us_per_req", "CPU µs @")),
            ("The knee (valid points only; min, max and interval over the rounds with a knee in range)", knees),
            spread_table(lat, "rate_fraction", "fraction of capacity"),
            left_out(lat, "rate_fraction", "fraction of capacity")]


def io_bound(run: Run) -> list:
    io = derive.io_bound(run)
    return [(caption("Throughput (rps) by concurrency: median (min–max over rounds)", io),
             pivot(io, "conns", "throughput_rps", "conns=")),
            (caption("Server CPU per request (µs) by concurrency", io), pivot(io, "conns", "cpu_us_per_req", "conns=")),
            ("Little's-law ceiling (rps)", pivot(io.assign(valid=True), "conns", "little_ceiling_rps", "conns=")),
            spread_table(io, "conns", "connections"), left_out(io, "conns", "conns")]


def cpu_bound(run: Run) -> list:
    cpu = derive.cpu_bound(run)
    if cpu.empty:
        return []
    columns = ["variant", "n_server_cpus", "conns", "throughput_rps", "ceiling_rps", "p99_us", "server_cpu_percent",
               "cpu_us_per_req"]
    frame = cpu[[c for c in columns if c in cpu]].assign(p99_us=cpu.p99_us * MS_PER_US).rename(
        columns={"p99_us": "p99_ms", "cpu_us_per_req": "CPU µs/req"})
    for column, shown in (("throughput_rps", "throughput_rps"), ("cpu_us_per_req", "CPU µs/req")):
        if f"{column}_min" in cpu:
            frame[shown] = [f"{num(v)} ({num(a)}–{num(b)})" if pd.notna(a) and num(a) != num(b) else num(v)
                            for v, a, b in zip(cpu[column], cpu[f"{column}_min"], cpu[f"{column}_max"])]
    frame["valid"] = ["yes" if ok else f"{INVALID_MARK} {why}" for ok, why in zip(cpu["valid"], cpu["invalid_reason"])]
    cpu_points = cpu.assign(point=[f"{num(k)} CPU(s), {num(c)} conns" for k, c in zip(cpu.n_server_cpus, cpu.conns)])
    return [(caption("Best throughput per variant and CPU count (the best valid point): median (min–max over "
                     "rounds)", cpu), frame), spread_table(cpu_points, "point", "point")]


def switch(run: Run) -> list:
    pr = derive.per_request(run)
    shown = pr[[c for c in ("variant", "cpu_us_per_req", "cpu_us_per_req_min", "cpu_us_per_req_max", "ctx_per_req",
                            "ctx_per_req_min", "ctx_per_req_max", "n") if c in pr]] if not pr.empty else pr
    return [("Microbenchmarks (ns per switch, median over rounds)", derive.switch_micro(run)),
            ("Server cost per request at the reference point (median, min, max over rounds)", shown)]


def c10k(run: Run) -> list:
    c = derive.c10k(run)
    if c.empty:
        return []
    columns = ["variant", "hold_target", "held", "connect_errors", "requests", "errors", "p99_us", "rss_kib",
               "threads", "note"]
    frame = c[columns].assign(p99_us=c.p99_us * MS_PER_US, rss_kib=c.rss_kib * MIB_PER_KIB).rename(columns={
        "held": "connected", "connect_errors": "failed", "requests": "probe requests", "p99_us": "p99 ms",
        "rss_kib": "RSS MiB"})
    return [("Holding idle connections", frame)]


TABLES = {"memory": memory, "throughput": throughput, "latency": latency, "io_bound": io_bound,
          "cpu_bound": cpu_bound, "switch": switch, "c10k": c10k}


def experiment_tables(run: Run, experiment: str) -> list:
    """(caption, frame) pairs shown under an experiment's charts; empty frames are left out by the page."""
    return TABLES[experiment](run) if experiment in TABLES else []


# -- reliability: conclab check's files in the run directory ---------------------------------------
RELIABILITY_FILES = ("check.csv", "soak.csv", "soak_summary.csv", "overload.csv")


def read_reliability(path: str) -> dict:
    """The reliability files of a run directory by name (without .csv); a missing or empty file is left out."""
    import os
    frames = {}
    for name in RELIABILITY_FILES:
        file = os.path.join(path, name)
        if os.path.exists(file) and os.path.getsize(file) > 0:
            frame = pd.read_csv(file, keep_default_na=False, na_values=[""])
            if not frame.empty:
                frames[name.removesuffix(".csv")] = frame
    return frames


def check_table(check: pd.DataFrame) -> pd.DataFrame:
    """check.csv as one row per variant, one column per scenario: pass, limit or FAIL."""
    table = check.pivot_table(index="variant", columns="scenario", values="status", aggfunc="first")
    scenarios = list(dict.fromkeys(check.scenario))
    return table.reindex(columns=scenarios).fillna("").reset_index().rename_axis(columns=None)


def check_failures(check: pd.DataFrame) -> pd.DataFrame:
    """The scenarios that did not pass, with their figure and why."""
    bad = check[check.status != "pass"]
    return bad[["variant", "scenario", "status", "figure", "failures", "limit"]].fillna("").reset_index(drop=True)


def soak_table(summary: pd.DataFrame) -> pd.DataFrame:
    """soak_summary.csv as one row per variant: the capacity and rate, then each criterion's value and verdict."""
    rows = []
    for variant, group in summary.groupby("variant", sort=False):
        first = group.iloc[0]
        saturated = " (load generator saturated)" if str(first.capacity_loadgen_saturated) == "True" else ""
        row = {"variant": variant, "capacity req/s": f"{num(first.capacity_rps)}{saturated}",
               "soak req/s": num(first.rate), "conns": num(first.conns), "seconds": num(first.seconds),
               "generator saturated s": num(first.loadgen_saturated_seconds)}
        if "machine_busy" in group:            # runs that measured the machine (floor probe, others' CPU)
            row["machine"] = (f"{'busy' if str(first.machine_busy) == 'True' else 'quiet'}: floor p99 "
                              f"{num(first.floor_p99_us)} us, others {num(first.others_cpu_pct)} % CPU")
        for r in group.itertuples():
            row[r.criterion] = f"{r.verdict}: {r.value}" if r.value != "" and pd.notna(r.value) else r.verdict
        row["why not"] = "; ".join(str(r.reason) for r in group.itertuples()
                                   if r.verdict != "pass" and pd.notna(r.reason))
        rows.append(row)
    return pd.DataFrame(rows)


def overload_table(overload: pd.DataFrame) -> pd.DataFrame:
    """overload.csv, one row per variant and factor, in words: how each model degrades."""
    out = pd.DataFrame({
        "variant": overload.variant, "x capacity": overload.factor.map(lambda f: f"{num(f)}x"),
        "offered req/s": overload.offered_rps, "sent req/s": overload.sent_rps, "served req/s": overload.served_rps,
        "p99 during ms": overload.p99_us * MS_PER_US, "normal p99 ms": overload.normal_p99_us * MS_PER_US,
        "errors by kind": overload.errors.map(_errors_text), "never sent": overload.unsent,
        "unanswered": overload.unanswered, "RSS peak MiB": overload.rss_peak_mib,
        "RSS before MiB": overload.rss_before_mib, "recovery s": overload.recovery_s,
        "generator saturated": overload.loadgen_saturated.map(lambda v: "yes" if str(v) == "True" else ""),
        "verdict": overload.status, "why not": overload.failures.fillna("")})
    if "recovery_p99_us" in overload:          # runs judged on robust statistics and the machine's floor
        out.insert(7, "p99 after drop ms", overload.recovery_p99_us * MS_PER_US)
        out.insert(8, "floor p99 ms", overload.floor_p99_us * MS_PER_US)
        if "normal_worst_p99_us" in overload:  # runs whose baseline kept its worst second
            out.insert(7, "normal worst second ms", overload.normal_worst_p99_us * MS_PER_US)
        out["machine busy"] = overload.machine_busy.map(lambda v: "yes" if str(v) == "True" else "")
        out["why not"] = [("; ".join(t for t in (str(f), str(u)) if t and t != "nan"))
                          for f, u in zip(overload.failures.fillna(""), overload.unresolved.fillna(""))]
    return out


EXACT_CRITERIA = ("fds", "threads", "CLOSE_WAIT", "lost replies")


def reliability_digest(summary: pd.DataFrame, overload: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per variant: the soak's rate and verdicts, then each overload factor's served rate, p99 and
    recovery, and the RSS peak over the factors. The report's at-a-glance table, and docs/reliability.md's."""
    rows = []
    for variant, group in summary.groupby("variant", sort=False):
        first, by = group.iloc[0], group.set_index("criterion")
        exact = [c for c in EXACT_CRITERIA if c in by.index]
        off = [f"{c} {by.verdict[c]}: {by.value[c]}" for c in exact if by.verdict[c] != "pass"]
        row = {"variant": variant, "capacity req/s": num(first.capacity_rps),
               "soak": f"{num(first.rate)} req/s for {num(first.seconds)} s",
               "RSS slope": _verdict_cell(by, "RSS slope"),
               ", ".join(exact): "; ".join(off) or ("pass" if exact else MISSING),
               "p99 first -> last quarter": _verdict_cell(by, "p99", until=" (")}
        rows.append({**row, **_overload_cells(overload, variant)})
    return pd.DataFrame(rows)


def _verdict_cell(by: pd.DataFrame, criterion: str, until: str | None = None) -> str:
    if criterion not in by.index:
        return MISSING
    value = str(by.value[criterion]) if pd.notna(by.value[criterion]) else ""
    value = value.split(until)[0] if until else value
    return f"{by.verdict[criterion]}: {value}" if value else str(by.verdict[criterion])


def _overload_cells(overload: pd.DataFrame | None, variant: str) -> dict:
    rows = overload[overload.variant == variant] if overload is not None else pd.DataFrame()
    cells = {}
    for r in rows.itertuples():
        cells[f"{num(r.factor)}x: served req/s, p99 ms"] = (f"{num(r.served_rps)} of {num(r.offered_rps)}, "
                                                             f"{num(r.p99_us * MS_PER_US)}")
        cells[f"{num(r.factor)}x: verdict, back in s"] = f"{r.status}: {num(r.recovery_s)}"
    if len(rows):
        cells["RSS before -> peak MiB"] = f"{num(rows.rss_before_mib.min())} -> {num(rows.rss_peak_mib.max())}"
    return cells


def to_markdown(frame: pd.DataFrame) -> str:
    """A table as Markdown, every cell as it stands (pipes escaped)."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|")
    lines = ["| " + " | ".join(map(cell, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _errors_text(text) -> str:
    import json
    try:
        errors = json.loads(text) if isinstance(text, str) and text else {}
    except ValueError:
        return str(text)
    return ", ".join(f"{kind} {num(n)}" for kind, n in sorted(errors.items())) or "none"
