"""Frames and tables of the GIL experiments: convoy and cores.

convoy (experiments.convoy): ``convoy(run)`` is one row per case (a model and
its server options). Its headline is a ratio of two points of the same server
and round: ECHO p99 with the CPU work beside it over ECHO p99 without it. The
ratio is computed per round (paired: the same server, the same minute of the
machine) from the rows where both points are valid, and summarised with
harness.stats.spread (median, min, max, the 95 % interval of the median:
``ratio_p99``, ``ratio_p99_min`` ... ``ratio_p99_hi``); p50 the same. A case
with no round where both points are valid is kept with ``valid`` False and
the reasons of its invalid points.

cores (experiments.cores): ``cores(run)`` is the medians per (variant, case,
load) (derive.medians); ``cores_scaling(frame, raw)`` the 2-CPU scaling ratios
per variant and load: throughput on 2 CPUs over throughput on 1 CPU with one
process (or GOMAXPROCS 1), paired per round, for two settings on 2 CPUs, 2
processes (go: GOMAXPROCS 2) and one process (what the GIL lets one CPython
process do with a second CPU). ``verdict`` is derive.compare_medians of the two
throughputs ("higher", "lower", or "tie": within noise).

``TABLES`` gives each experiment's tables under its charts (analysis.report).
"""
from __future__ import annotations

import pandas as pd
from conclab.experiments.harness import stats

from . import derive
from .fmt import num
from .tables import MIB_PER_KIB, MS_PER_US, caption, spread_table

CONVOY_VALUES = ["p50_us", "p99_us", "p999_us", "throughput_rps", "work_rps", "work_p99_us", "cpu_us_per_req",
                 "ctx_per_req", "server_cpu_percent", "server_rss_kib", "conns_served", "unanswered",
                 "errors", "late", "unsent"]
CASE_COLUMNS = ["switch_interval", "procs", "gomaxprocs", "n_server_cpus", "shares_loadgen_cpu", "cpu_us", "rate",
                "conns"]
RATIO_SUFFIXES = {"median": "", "min": "_min", "max": "_max", "ci_lo": "_lo", "ci_hi": "_hi", "n": "_n"}
CORES_VALUES = ["throughput_rps", "p99_us", "cpu_us_per_req", "ctx_per_req", "server_cpu_percent", "server_rss_kib",
                "rss_kib_per_proc", "server_procs", "server_threads", "conns", "conns_served", "unanswered", "errors"]
CORES_CASE = ["procs", "gomaxprocs", "n_server_cpus", "shares_loadgen_cpu"]
SCALINGS = (("2 CPUs, 2 processes", 2), ("2 CPUs, 1 process", 1))   # (label, processes or GOMAXPROCS on 2 CPUs)


# -- convoy -------------------------------------------------------------------------------------------

def convoy_points(run) -> pd.DataFrame:
    """Medians per (variant, case, cpu_conns): the baseline (cpu_conns 0) and the point with the CPU work."""
    t = run.tables["convoy"]
    return derive.medians(t, ["variant", "case", "cpu_conns"], CONVOY_VALUES + CASE_COLUMNS)


def paired(t: pd.DataFrame, column: str) -> tuple[pd.Series, pd.Series]:
    """(without, with) the CPU work: ``column`` per (case, round), of the valid points."""
    if t.empty:
        return pd.Series(dtype=float), pd.Series(dtype=float)
    ok, _ = derive.validity(t)
    t = t[ok]
    return (t[t.cpu_conns == 0].groupby(["case", "repeat"])[column].median(),
            t[t.cpu_conns > 0].groupby(["case", "repeat"])[column].median())


def paired_ratios(t: pd.DataFrame, column: str) -> dict:
    """case -> [with / without] of ``column``, one per round where both points of the case are valid."""
    base, loaded = paired(t, column)
    ratios = (loaded / base).dropna()
    ratios = ratios[ratios.map(lambda v: v != float("inf"))]
    return {case: list(values) for case, values in ratios.groupby(level=0)}


def paired_loaded(t: pd.DataFrame, column: str) -> dict:
    """case -> [``column`` with the CPU work], one per round where both points of the case are valid: what a fix
    is compared on (the ECHO p99 beside the CPU work), rounds as the ratios'."""
    base, loaded = paired(t, column)
    both = loaded[loaded.index.isin(base.dropna().index)].dropna()
    return {case: list(values) for case, values in both.groupby(level=0)}


def convoy(run) -> pd.DataFrame:
    """One row per case: its settings, ECHO p50/p99 without and with the CPU work (medians over valid rounds),
    the paired ratios with their spread, the CPU work's throughput, valid and why not."""
    t = run.tables["convoy"]
    points = convoy_points(run)
    if points.empty:
        return pd.DataFrame(columns=["variant", "case", "ratio_p99", "valid", "invalid_reason"])
    ratios = {c: paired_ratios(t, c) for c in ("p99_us", "p50_us")}
    loaded_p99 = paired_loaded(t, "p99_us")
    rows = []
    for case in dict.fromkeys(t.case):                         # the experiment's order (experiments.convoy.SETTINGS)
        mine = points[points.case == case]
        base, loaded = mine[mine.cpu_conns == 0], mine[mine.cpu_conns > 0]
        first = mine.iloc[0]
        row = {"variant": first.variant, "case": case, **{c: first.get(c) for c in CASE_COLUMNS},
               "cpu_conns": loaded.cpu_conns.max() if not loaded.empty else None}
        for side, frame in (("base", base), ("with", loaded)):
            for column in ("p50_us", "p99_us", "work_rps", "server_cpu_percent"):
                row[f"{column}_{side}"] = frame[column].iloc[0] if not frame.empty and column in frame else None
        for values, name in ((ratios["p99_us"], "ratio_p99"), (ratios["p50_us"], "ratio_p50"),
                             (loaded_p99, "p99_beside")):
            spread = stats.spread(values.get(case, []))
            for field, suffix in RATIO_SUFFIXES.items():
                row[name + suffix] = spread[field] if spread else None
        reasons = [r for r in mine.invalid_reason.dropna() if r]
        row["valid"] = bool(row["ratio_p99_n"])
        row["invalid_reason"] = None if row["valid"] else ("; ".join(dict.fromkeys(reasons)) or "no valid pair")
        rows.append(row)
    return pd.DataFrame(rows)


def convoy_tables(run) -> list:
    c = convoy(run)
    if c.empty:
        return []
    shown = pd.DataFrame({
        "case": c.case, "server CPUs": c.n_server_cpus.map(num),
        "shares the generator's CPU": c.shares_loadgen_cpu.map(lambda v: "yes" if v else "no"),
        "ECHO p50 ms without": (c.p50_us_base * MS_PER_US).map(num),
        "ECHO p50 ms with": (c.p50_us_with * MS_PER_US).map(num),
        "ECHO p99 ms without": (c.p99_us_base * MS_PER_US).map(num),
        "ECHO p99 ms with": (c.p99_us_with * MS_PER_US).map(num),
        "p99 with / without": [_ratio_cell(r, "ratio_p99") for _, r in c.iterrows()],
        "p50 with / without": [_ratio_cell(r, "ratio_p50") for _, r in c.iterrows()],
        "CPU work done (rps)": c.work_rps_with.map(num),
        "valid": ["yes" if ok else f"no: {why}" for ok, why in zip(c.valid, c.invalid_reason)]})
    points = convoy_points(run)
    labelled = points.assign(point=[f"{r.case}, {'with' if r.cpu_conns else 'without'} CPU work"
                                    for r in points.itertuples()])
    return [(caption("ECHO latency without and with CPU work beside it, per case: medians over rounds; ratios "
                     "paired per round, median (min–max)", points), shown),
            spread_table(labelled, "point", "case")]


def _ratio_cell(row, name: str) -> str:
    if pd.isna(row.get(name)):
        return "–"
    lo, hi = row.get(name + "_min"), row.get(name + "_max")
    spread = f" ({num(lo)}–{num(hi)})" if pd.notna(lo) and num(lo) != num(hi) else ""
    return f"{num(row[name])}×{spread}, {int(row[name + '_n'])} round(s)"


# -- cores --------------------------------------------------------------------------------------------

def cores(run) -> pd.DataFrame:
    """Medians per (variant, case, load), with the case's processes, GOMAXPROCS, CPUs and memory."""
    return derive.medians(run.tables["cores"], ["variant", "case", "load"], CORES_VALUES + CORES_CASE)


def parallelism(frame: pd.DataFrame) -> pd.Series:
    """Processes (Python) or GOMAXPROCS (go) of each row."""
    return frame.gomaxprocs.where(frame.gomaxprocs.notna(), frame.procs).fillna(1)


def cores_scaling(frame: pd.DataFrame, raw: pd.DataFrame) -> pd.DataFrame:
    """Per variant, load and scaling (``SCALINGS``): throughput on 2 CPUs over 1 CPU with one process, paired per
    round over valid rows (median, min, max, interval, rounds), and the verdict of the two medians' intervals."""
    columns = ["variant", "load", "scaling", "ratio", "ratio_min", "ratio_max", "ratio_lo", "ratio_hi", "ratio_n",
               "verdict", "one_rps", "two_rps", "shares_loadgen_cpu"]
    if frame.empty or raw.empty:
        return pd.DataFrame(columns=columns)
    ok, _ = derive.validity(raw)
    raw = raw[ok].assign(par=parallelism(raw[ok]))
    frame = derive.valid(frame).assign(par=parallelism(derive.valid(frame)))
    rows = []
    for (variant, load), group in frame.groupby(["variant", "load"], sort=False):
        one = group[(group.n_server_cpus == 1) & (group.par == 1)]
        if one.empty:
            continue
        for label, par in SCALINGS:
            two = group[(group.n_server_cpus == 2) & (group.par == par)]
            if two.empty:
                continue
            mine = raw[(raw.variant == variant) & (raw.load == load)]
            base = mine[mine.case == one.case.iloc[0]].groupby("repeat").throughput_rps.median()
            top = mine[mine.case == two.case.iloc[0]].groupby("repeat").throughput_rps.median()
            spread = stats.spread((top / base).dropna())
            if not spread:
                continue
            rows.append({"variant": variant, "load": load, "scaling": label,
                         **{"ratio" + suffix: spread[field] for field, suffix in RATIO_SUFFIXES.items()},
                         "verdict": derive.compare_medians(two.iloc[0], one.iloc[0], "throughput_rps"),
                         "one_rps": one.throughput_rps.iloc[0], "two_rps": two.throughput_rps.iloc[0],
                         "shares_loadgen_cpu": bool(two.shares_loadgen_cpu.iloc[0])})
    return derive.sort_variants(pd.DataFrame(rows, columns=columns))


def cores_frame(run) -> pd.DataFrame:
    """The chart's frame: the medians (``cores``) with each row's parallelism (processes or GOMAXPROCS)."""
    c = cores(run)
    return c.assign(par=parallelism(c)) if not c.empty else c


SCALING_CAPTION = ("2-CPU scaling: throughput on 2 CPUs / on 1 CPU with one process, paired per round, median "
                   "(min–max); verdict from the two medians' 95 % intervals")


def scaling_table(scaling: pd.DataFrame) -> pd.DataFrame:
    """``cores_scaling`` for people: the ratio as "median× (min–max)", the CPU sharing as yes/no."""
    shown = scaling.assign(
        ratio=[f"{num(r.ratio)}× ({num(r.ratio_min)}–{num(r.ratio_max)})" for r in scaling.itertuples()],
        shares_loadgen_cpu=scaling.shares_loadgen_cpu.map(lambda v: "yes" if v else "no"))
    columns = {"variant": "variant", "load": "load", "scaling": "scaling", "ratio": "ratio", "ratio_n": "rounds",
               "verdict": "verdict", "one_rps": "1 CPU rps", "two_rps": "2 CPUs rps",
               "shares_loadgen_cpu": "2-CPU server shared the generator's CPU"}
    return shown[list(columns)].rename(columns=columns)


def cores_tables(run) -> list:
    c = cores_frame(run)
    if c.empty:
        return []
    scaling = cores_scaling(c, run.tables["cores"])
    shown = c[["variant", "case", "load", "n_server_cpus", "par", "throughput_rps", "p99_us", "server_cpu_percent",
               "server_procs", "server_rss_kib", "rss_kib_per_proc"]].assign(
        p99_us=c.p99_us * MS_PER_US, server_rss_kib=c.server_rss_kib * MIB_PER_KIB,
        rss_kib_per_proc=c.rss_kib_per_proc * MIB_PER_KIB,
        throughput_rps=[f"{num(v)} ({num(a)}–{num(b)})" if pd.notna(a) and num(a) != num(b) else num(v)
                        for v, a, b in zip(c.throughput_rps, c.throughput_rps_min, c.throughput_rps_max)]).rename(
        columns={"n_server_cpus": "server CPUs", "par": "processes / GOMAXPROCS", "throughput_rps": "rps",
                 "p99_us": "p99 ms", "server_cpu_percent": "server CPU %", "server_procs": "processes counted",
                 "server_rss_kib": "RSS MiB (summed)", "rss_kib_per_proc": "RSS MiB per process"})
    out = [(caption("Throughput and memory per case and load: median (min–max over rounds); RSS summed over the "
                    "server's processes", c), shown)]
    if not scaling.empty:
        out.append((SCALING_CAPTION, scaling_table(scaling)))
    labelled = c.assign(point=[f"{r.case}, {r.load}" for r in c.itertuples()])
    out.append(spread_table(labelled, "point", "case"))
    return out


TABLES = {"convoy": convoy_tables, "cores": cores_tables}


def experiment_tables(run, experiment: str) -> list:
    """(caption, frame) pairs under one of these experiments' charts; [] for any other experiment."""
    return TABLES[experiment](run) if experiment in TABLES else []
