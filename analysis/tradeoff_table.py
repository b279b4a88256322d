"""The trade-off table: one row per concurrency model, every cost side by side, and a decision guide under it.

The report's first table (analysis/report.py) and ``tradeoff.csv`` beside the
page. It measures nothing and keeps no number of its own: each cell is read
from a frame the rest of analysis/ already derives from the run's tables, with
the same rules:

=====================  =====================================================================================
column                 from
=====================  =====================================================================================
memory per idle conn   ``derive.memory_kernel``: the least-squares slopes of process RSS plus the kernel's
                       memory (sockets, thread stacks, slab, page tables) per connection (memory_fit.csv)
its switch             ``derive.switch_micro``: the microbenchmark of the hand-off the model makes between two
                       connections' work (``SWITCH_OF``), on one CPU; labelled GIL hand-off, task switch,
                       greenlet switch or goroutine switch (``SWITCH_KIND``)
req/s, CPU µs/req      ``derive.at_reference``: the closed loop at the reference concurrency (throughput.csv)
p99 at 50 % load       ``derive.latency``: the open-loop point nearest half of the model's own capacity
idle conns held        ``derive.c10k``: held all (no connection failed) or not, how many; the probe's p99
2-CPU scaling          ``gil.cores_scaling``: req/s on 2 CPUs with 2 processes (go: GOMAXPROCS 2) over 1 CPU
                       with one, paired per round, for ECHO and for CPU-bound WORK (cores.csv)
convoy                 ``gil.convoy``: ECHO p99 with 2 ms CPU work beside it over without, the model's
                       one-process, one-CPU case (convoy.csv)
past capacity          ``derive.knees`` and ``derive.latency``: where latency bends (the knee, as a fraction of
                       capacity) and what the highest valid open-loop point says
=====================  =====================================================================================

Every figure is a median with its spread over the rounds: the 95 % interval of the median where three or more
rounds made it, else min–max (``derive.interval``). A point the harness marked invalid (load generator
saturated, connections not served or not accepted, a window too short) is never a cell's figure: the cell says
``invalid:`` and why. A column whose experiment the run lacks says ``not measured`` and the table's notes name
the ``conclab run NAME`` that measures it; a model the experiment skipped says so with the harness's reason.

The guide (``guide``) is a handful of sentences, each computed from the cells: every number in it is a cell's
figure (``Sentence.refs`` names the cells), rankings go through ``derive.compare_medians`` (overlapping
intervals are a tie, written "=" or "tie"), a sentence whose cells are not measured is left out, and a sentence
about the models counts all of the table's rows.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field

import pandas as pd

from . import derive, gil, html
from .findings import DEFAULT_SWITCH_INTERVAL, HELD_FRACTION
from .fmt import is_number, num
from .style import VARIANT_ORDER, order

FILE = "tradeoff.csv"
SECTION_ID = "tradeoff"
TITLE = "The trade-off, one row per model"
MEASURED, NOT_MEASURED, INVALID = "measured", "not measured", "invalid"
HALF_LOAD = 0.5                  # the latency column: the offered fraction of capacity nearest this
CONVOY_LIMIT = 2.0               # the guide: models whose ECHO p99 stays within this factor beside CPU work
TWO_CPU_SCALING = gil.SCALINGS[0][0]   # "2 CPUs, 2 processes" (go: GOMAXPROCS 2)

MODEL = {"threads": "thread per connection", "threadpool": "thread pool, a worker per connection",
         "threadpool-request": "thread pool, a worker per request", "asyncio": "coroutines (asyncio)",
         "uvloop": "coroutines (asyncio on uvloop)", "gevent": "coroutines (greenlets)",
         "epoll": "event loop with callbacks", "go": "goroutines (M:N)"}
# The hand-off each model makes from one connection's work to another's (switch.csv ``bench``), and its kind.
SWITCH_OF = {"threads": "thread", "threadpool": "thread", "threadpool-request": "thread", "asyncio": "asyncio",
             "uvloop": "uvloop", "gevent": "greenlet", "go": "goroutine"}
SWITCH_KIND = {"thread": "GIL hand-off (kernel thread switch)", "asyncio": "task switch (asyncio)",
               "uvloop": "task switch (uvloop)", "greenlet": "greenlet switch",
               "goroutine": "goroutine switch (Go runtime)"}
NO_SWITCH = {"epoll": "none: a callback runs, no context is switched"}


@dataclass(frozen=True)
class Column:
    key: str
    header: str                 # {conns}, {target}: the run's reference concurrency, c10k's target
    experiment: str             # `conclab run <experiment>` measures it
    unit: str = ""


COLUMNS = (
    Column("memory", "memory per idle connection, KiB (process RSS + kernel)", "memory", "KiB"),
    Column("switch", "its switch between connections, ns (one CPU)", "switch", "ns"),
    Column("rps", "req/s at {conns} connections", "throughput", "req/s"),
    Column("cpu", "server CPU µs per request at {conns} connections", "throughput", "µs"),
    Column("p99_half", "p99 at 50 % load, ms", "latency", "ms"),
    Column("held", "{target} idle connections held", "c10k"),
    Column("c10k_p99", "probe p99 while holding them, ms", "c10k", "ms"),
    Column("scaling_echo", "2 CPUs / 1, ECHO req/s", "cores", "×"),
    Column("scaling_cpu", "2 CPUs / 1, CPU-bound req/s", "cores", "×"),
    Column("convoy", "ECHO p99 with CPU work beside it / without", "convoy", "×"),
    Column("past", "past capacity", "latency"),
)
BY_KEY = {c.key: c for c in COLUMNS}


@dataclass(frozen=True)
class Cell:
    """One cell: what the table shows, the median it shows (in the column's unit) and its interval, whether it
    was measured, and where it comes from (``source``: the table and the point, to trace it)."""
    text: str
    value: float | None = None
    lo: float | None = None
    hi: float | None = None
    status: str = MEASURED
    source: dict = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        """A figure the guide may quote and rank: measured, valid, a number."""
        return self.status == MEASURED and is_number(self.value)

    @property
    def interval(self) -> tuple:
        return (self.lo, self.hi) if is_number(self.lo) and is_number(self.hi) else (self.value, self.value)


def not_measured(why: str = "") -> Cell:
    return Cell(NOT_MEASURED + (f": {why}" if why else ""), status=NOT_MEASURED)


def invalid(why, source: dict) -> Cell:
    """A cell whose point the harness marked invalid: its reason (each part once), never its figure."""
    parts = dict.fromkeys(p.strip() for p in str(why or "").split(";") if p.strip() and p.strip() != "None")
    return Cell(f"{INVALID}: {'; '.join(parts) or 'marked invalid'}", status=INVALID, source=source)


def figure(row, column: str, scale: float, source: dict, suffix: str = "", rounds: int = 1) -> Cell:
    """The cell of one derived row's ``column``: median (interval) scaled to the column's unit; a row that is
    not valid gives an ``invalid`` cell with its reason, a missing value a ``not measured`` one. A median over
    fewer valid rounds than the run's ``rounds`` says over how many."""
    if row is None:
        return not_measured()
    if "valid" in row and pd.notna(row.get("valid")) and not bool(row.get("valid")):
        return invalid(row.get("invalid_reason"), source)
    value = row.get(column)
    if not is_number(value):
        return not_measured()
    pair = derive.interval(row, column) or (value, value)
    value, lo, hi = value * scale, pair[0] * scale, pair[1] * scale
    n = row.get("n")
    fewer = f" ({num(n)} valid round{'' if n == 1 else 's'} of {rounds})" if is_number(n) and n < rounds else ""
    return Cell(spread_text(value, lo, hi) + fewer + suffix, value, lo, hi, MEASURED, source)


def spread_text(value, lo, hi) -> str:
    """"median (lo–hi)", or the median alone when the interval shows as one number."""
    if num(lo) == num(hi) == num(value) or not (is_number(lo) and is_number(hi)):
        return num(value)
    return f"{num(value)} ({num(lo)}–{num(hi)})"


@dataclass
class Sentence:
    """One line of the decision guide, and the cells (variant, column key) whose figures it quotes."""
    text: str
    refs: list = field(default_factory=list)


@dataclass
class Table:
    """The trade-off table: ``cells[variant][column key]``, the notes under it and the guide."""
    variants: list
    cells: dict
    headers: dict
    notes: list
    guide: list

    def cell(self, variant: str, key: str) -> Cell:
        return self.cells[variant][key]

    def frame(self) -> pd.DataFrame:
        """The table as the page shows it: variant, model, one text column per ``COLUMNS`` entry."""
        return pd.DataFrame([{"variant": v, "model": MODEL.get(v, ""),
                              **{self.headers[c.key]: self.cells[v][c.key].text for c in COLUMNS}}
                             for v in self.variants])

    def records(self) -> pd.DataFrame:
        """tradeoff.csv: per column its text (``<key>``), median, interval and status (``<key>_median``, ...)."""
        rows = []
        for v in self.variants:
            row = {"variant": v, "model": MODEL.get(v, "")}
            for c in COLUMNS:
                cell = self.cells[v][c.key]
                row.update({c.key: cell.text, f"{c.key}_median": cell.value, f"{c.key}_lo": cell.lo,
                            f"{c.key}_hi": cell.hi, f"{c.key}_status": cell.status})
            rows.append(row)
        return pd.DataFrame(rows)


# -- the columns ---------------------------------------------------------------------------------------

def _by_variant(frame: pd.DataFrame) -> dict:
    return {} if frame.empty else {r["variant"]: r for _, r in frame.iterrows()}


def memory_cells(run) -> dict:
    split = _by_variant(derive.memory_kernel(run))
    slopes = _by_variant(derive.memory_slopes(run))
    out = {}
    for variant in set(split) | set(slopes):
        source = {"table": "memory_fit", "variant": variant, "metric": "rss_kib + kernel_kib"}
        row = split.get(variant)
        if row is None or not is_number(row["total_kib"]):
            rss = slopes.get(variant)
            out[variant] = not_measured(f"kernel memory; process RSS alone {num(rss['rss_kib'])} KiB"
                                        if rss is not None and is_number(rss.get("rss_kib")) else "")
            continue
        rss = slopes.get(variant, {})
        lo = _sum(rss.get("rss_kib_min"), row["kernel_kib_min"])
        hi = _sum(rss.get("rss_kib_max"), row["kernel_kib_max"])
        value = row["total_kib"]
        out[variant] = Cell(spread_text(value, lo, hi) + f" (RSS {num(row['rss_kib'])} + kernel "
                            f"{num(row['kernel_kib'])})",
                            value, lo, hi, MEASURED, source)
    return out


def _sum(a, b):
    return a + b if is_number(a) and is_number(b) else None


def switch_cells(run, variants) -> dict:
    micro = derive.switch_micro(run)
    pinned = micro[micro.pinned.astype(bool)] if not micro.empty else micro
    benches = {r["bench"]: r for _, r in pinned.iterrows()}
    out = {}
    for variant in variants:
        bench = SWITCH_OF.get(variant)
        if variant in NO_SWITCH and benches:            # said only where the switch experiment ran
            out[variant] = Cell(NO_SWITCH[variant], status=MEASURED, source={"table": "switch"})
            continue
        row = benches.get(bench)
        if row is None:
            continue
        pair = derive.interval(row, "ns_per_switch")
        source = {"table": "switch", "backend": derive.MICRO, "bench": bench, "pinned": True}
        value = row["ns_per_switch"]
        out[variant] = Cell(f"{spread_text(value, *pair)}: {SWITCH_KIND.get(bench, bench)}", value, pair[0],
                            pair[1], MEASURED, source)
    return out


def rounds(run) -> int:
    """The run's interleaved rounds (manifest parameters ``repeat``)."""
    value = (run.manifest.get("parameters") or {}).get("repeat")
    return int(value) if is_number(value) else 1


def throughput_cells(run) -> tuple[dict, dict]:
    ref = derive.at_reference(run)
    rps, cpu = {}, {}
    for variant, row in _by_variant(ref).items():
        source = {"table": "throughput", "variant": variant, "conns": row["conns"]}
        rps[variant] = figure(row, "throughput_rps", 1.0, source, rounds=rounds(run))
        cpu[variant] = figure(row, "cpu_us_per_req", 1.0, source, rounds=rounds(run))
    return rps, cpu


def half_load_cells(lat: pd.DataFrame, repeat: int = 1) -> dict:
    out = {}
    for variant, rows in (lat.groupby("variant", sort=False) if not lat.empty else ()):
        gap = (rows.rate_fraction - HALF_LOAD).abs()
        row = rows.loc[gap.idxmin()]
        at = "" if row.rate_fraction == HALF_LOAD else f" (at {num(row.rate_fraction)}× capacity)"
        source = {"table": "latency", "variant": variant, "rate_fraction": row.rate_fraction}
        out[variant] = figure(row, "p99_us", 1e-3, source, at, repeat)
    return out


def c10k_cells(run) -> tuple[dict, dict, float | None]:
    c = derive.c10k(run)
    held, p99 = {}, {}
    for variant, row in _by_variant(c).items():
        source = {"table": "c10k", "variant": variant, "hold_target": row["hold_target"]}
        failed = row["connect_errors"] if is_number(row.get("connect_errors")) else 0
        kept = row["held"] - failed
        ok = row["held"] >= HELD_FRACTION * row["hold_target"] and failed == 0
        text = (f"yes: {num(row['held'])} of {num(row['hold_target'])}" if ok else
                f"no: {num(row['held'])} of {num(row['hold_target'])} accepted"
                + (f", {num(failed)} of them failed" if failed else ""))
        held[variant] = Cell(text, kept, kept, kept, MEASURED, source)
        if not row.get("requests"):
            p99[variant] = Cell("no probe reply while holding", status=MEASURED, source=source)
        else:
            p99[variant] = figure(row, "p99_us", 1e-3, source, rounds=rounds(run))
    target = c.hold_target.max() if not c.empty else None
    return held, p99, target


def scaling_cells(run) -> tuple[dict, dict]:
    frame = gil.cores_frame(run)
    scaling = gil.cores_scaling(frame, run.tables["cores"])
    out = {"echo": {}, "cpu": {}}
    for _, r in scaling[scaling.scaling == TWO_CPU_SCALING].iterrows() if not scaling.empty else ():
        if r.load not in out:
            continue
        pair = derive.interval(r, "ratio") or (r.ratio, r.ratio)
        verdict = "tie: no gain within noise" if r.verdict == derive.TIE else \
            "gain" if r.verdict == derive.HIGHER else "loss"
        how = ("GOMAXPROCS 2" if r.variant == "go" else "2 processes") + (
            ", sharing the load generator's CPU" if r.shares_loadgen_cpu else "")
        source = {"table": "cores", "variant": r.variant, "load": r.load, "scaling": r.scaling}
        out[r.load][r.variant] = Cell(f"{spread_text(r.ratio, *pair)}× ({how}; {verdict})", r.ratio, pair[0],
                                      pair[1], MEASURED, source | {"verdict": r.verdict})
    for _, r in derive.invalid(frame).iterrows() if not frame.empty else ():
        if r.load in out and r.variant not in out[r.load]:
            out[r.load][r.variant] = invalid(r.invalid_reason, {"table": "cores", "variant": r.variant,
                                                                "load": r.load, "case": r.case})
    return out["echo"], out["cpu"]


def one_cpu_case(c: pd.DataFrame, variant: str):
    """The model's convoy case on one CPU and one process (threads: CPython's default switch interval;
    go: GOMAXPROCS 1), or None."""
    rows = c[(c.variant == variant) & (c.procs.fillna(1) == 1) & (c.n_server_cpus.fillna(1) == 1)
             & (c.switch_interval.isna() | (c.switch_interval == DEFAULT_SWITCH_INTERVAL))]
    return rows.iloc[0] if not rows.empty else None


def convoy_cells(run, variants) -> dict:
    c = gil.convoy(run)
    out = {}
    for variant in variants if not c.empty else ():
        row = one_cpu_case(c, variant)
        if row is None:
            continue
        source = {"table": "convoy", "variant": variant, "case": row["case"]}
        cell = figure(row, "ratio_p99", 1.0, source)
        if cell.status == MEASURED:
            ms = f"; {num(row['p99_us_base'] / 1000)} → {num(row['p99_us_with'] / 1000)} ms" \
                if is_number(row.get("p99_us_base")) and is_number(row.get("p99_us_with")) else ""
            cell = Cell(f"{cell.text}× ({row['case']}{ms})", cell.value, cell.lo, cell.hi, MEASURED, source)
        out[variant] = cell
    return out


def past_capacity_cells(lat: pd.DataFrame, knees: pd.DataFrame) -> dict:
    """Where latency bends (the knee, × the model's capacity) and what the highest valid point says; the rates
    above it, when invalid, with why."""
    out = {}
    by_knee = _by_variant(knees)
    for variant, rows in (lat.groupby("variant", sort=False) if not lat.empty else ()):
        capacity = rows.capacity_rps.dropna().median()
        knee = by_knee.get(variant)
        ok = derive.valid(rows)
        source = {"table": "latency", "variant": variant}
        if ok.empty:
            out[variant] = invalid(rows.invalid_reason.dropna().iloc[0] if rows.invalid_reason.notna().any()
                                   else "no valid point", source)
            continue
        top = ok.loc[ok.rate_fraction.idxmax()]
        served = top.throughput_rps / top.offered_rps if is_number(top.offered_rps) and top.offered_rps else None
        there = (f"at {num(top.rate_fraction)}× capacity (highest valid): p99 {num(top.p99_us / 1000)} ms"
                 + (f", served {num(100 * served)} %" if is_number(served) else ""))
        above = rows[(rows.rate_fraction > top.rate_fraction) & ~rows.valid.astype(bool)]
        beyond = f"; above: invalid ({above.invalid_reason.iloc[0]})" if not above.empty else ""
        where = knee.get("where") if knee is not None else None
        if where == "in range" and is_number(knee.get("knee")) and capacity:
            value = fraction_at(rows, knee["knee"])
            lo, hi = (knee.get("knee_lo"), knee.get("knee_hi"))
            lo, hi = (fraction_at(rows, lo), fraction_at(rows, hi)) if is_number(lo) and is_number(hi) else \
                (value, value)
            text = f"knee at {spread_text(value, lo, hi)}× capacity ({num(knee['knee'])} req/s); {there}{beyond}"
            out[variant] = Cell(text, value, lo, hi, MEASURED, source | {"knee_rps": knee["knee"]})
        elif where == "below":
            out[variant] = Cell(f"kept up at no rate tested; {there}{beyond}", status=MEASURED, source=source)
        else:
            out[variant] = Cell(f"no knee up to {num(top.rate_fraction)}× capacity; {there}{beyond}",
                                status=MEASURED, source=source)
    return out


def fraction_at(rows: pd.DataFrame, rps: float) -> float:
    """The offered fraction of capacity of the latency point whose offered rate is nearest ``rps`` (a knee is
    one of the offered rates: its fraction is on the experiment's grid, so equal knees compare equal)."""
    return float(rows.loc[(rows.offered_rps - rps).abs().idxmin(), "rate_fraction"])


# -- the table -----------------------------------------------------------------------------------------

def build(run) -> Table:
    """The trade-off table of a loaded run (analysis.results.Run), its notes and its guide."""
    variants = order([*VARIANT_ORDER, *run.variants()])
    lat, knees = derive.latency(run), derive.knees(run)
    rps, cpu = throughput_cells(run)
    held, c10k_p99, target = c10k_cells(run)
    echo, cpu_scaling = scaling_cells(run)
    found = {"memory": memory_cells(run), "switch": switch_cells(run, variants), "rps": rps, "cpu": cpu,
             "p99_half": half_load_cells(lat, rounds(run)), "held": held, "c10k_p99": c10k_p99, "scaling_echo": echo,
             "scaling_cpu": cpu_scaling, "convoy": convoy_cells(run, variants),
             "past": past_capacity_cells(lat, knees)}
    missing = [c.experiment for c in COLUMNS if not run.has(c.experiment)]
    cells = {v: {c.key: found[c.key].get(v) or _absent(run, c, v, missing) for c in COLUMNS} for v in variants}
    headers = {c.key: c.header.format(conns=derive.reference_conns(run),
                                      target=num(target) if target is not None else "many") for c in COLUMNS}
    table = Table(variants, cells, headers, notes(run, missing, headers), [])
    table.guide = guide(table)
    return table


def _absent(run, column: Column, variant: str, missing: list) -> Cell:
    """The cell of a model the column has no row for: the experiment not in the run, or why it was skipped."""
    if column.experiment in missing:
        return not_measured()
    skipped = run.skipped
    reasons = skipped[(skipped.experiment == column.experiment) & (skipped.variant == variant)].reason.dropna() \
        if not skipped.empty else pd.Series(dtype=object)
    return not_measured(f"skipped: {reasons.iloc[0]}" if len(reasons) else "no row for this model")


def notes(run, missing: list, headers: dict) -> list:
    out = [f"Each figure: median (spread over {rounds(run)} round(s): the 95 % interval of the median, or min–max "
           "with fewer than 3). \"invalid\": the point was measured but the harness marked it invalid, so its "
           "figure is not used; the reason follows."]
    for experiment in dict.fromkeys(missing):
        columns = "; ".join(f'"{headers[c.key]}"' for c in COLUMNS if c.experiment == experiment)
        out.append(f"Not measured in this run: {columns}. `conclab run {experiment}` measures "
                   f"{'it' if columns.count(';') == 0 else 'them'}.")
    return out


def write_csv(table: Table, directory: str) -> str:
    """tradeoff.csv into ``directory``; its path."""
    path = os.path.join(directory, FILE)
    table.records().to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL)
    return path


# -- the guide -----------------------------------------------------------------------------------------

def _usable(table: Table, key: str) -> list:
    """(variant, cell) of the cells of one column the guide may use, in table order."""
    return [(v, table.cells[v][key]) for v in table.variants if table.cells[v][key].usable]


def _group(items: list, best) -> list:
    """The items that tie with ``best`` (itself included)."""
    return [(v, c) for v, c in items if derive.compare_medians(c.interval, best[1].interval) == derive.TIE]


def _extreme_groups(items: list) -> tuple[list, list]:
    """(the lowest value and every item tied with it, the highest and every item tied with it)."""
    low = min(items, key=lambda vc: vc[1].value)
    high = max(items, key=lambda vc: vc[1].value)
    return _group(items, low), _group(items, high)


def _names(variants) -> str:
    variants = list(variants)
    return ", ".join(variants[:-1]) + " and " + variants[-1] if len(variants) > 1 else "".join(variants)


def _listed(group: list, unit: str) -> str:
    """"epoll 5.55 and threadpool-request 5.83 KiB (a tie within noise)"."""
    group = sorted(group, key=lambda vc: vc[1].value)
    text = _names(f"{v} {num(c.value)}" for v, c in group) + (f" {unit}" if unit else "")
    return text + (" (a tie within noise)" if len(group) > 1 else "")


def _refs(group: list, key: str) -> list:
    return [(v, key) for v, _ in group]


def _ordered(items: list, unit: str) -> str:
    """Cheapest first, "=" between neighbours that tie within noise, "<" where the intervals separate."""
    ranked = sorted(items, key=lambda vc: vc[1].value)
    text = ""
    for previous, (v, c) in zip([None, *ranked], ranked):
        if previous is not None:
            text += " = " if derive.compare_medians(previous[1].interval, c.interval) == derive.TIE else " < "
        text += f"{v} {num(c.value)}"
    return f"{text} {unit}".rstrip()


def _scope(table: Table, items: list, key: str) -> str:
    """" (of the 8 models; invalid: x; not measured: y)": what a sentence about the models is computed over."""
    used = {v for v, _ in items}
    out = {}
    for v in table.variants:
        if v not in used:
            status = table.cells[v][key].status
            out.setdefault("no figure" if status == MEASURED else status, []).append(v)
    if not out:
        return f" (all {len(table.variants)} models)"
    return f" (of the {len(table.variants)} models; " + "; ".join(f"{k}: {_names(vs)}" for k, vs in out.items()) + ")"


def _all_tie(items: list) -> bool:
    return all(derive.compare_medians(a.interval, b.interval) == derive.TIE for _, a in items for _, b in items)


def _ends(items: list, key: str, unit: str, what: str, low_words: str, high_words: str, table: Table):
    """A sentence about the two ends of one column: every model tied, an order (when the ends' ties overlap),
    or the lowest group and the highest group."""
    scope = _scope(table, items, key)
    if _all_tie(items):
        return Sentence(f"{what}: every model with a figure ties within noise, {_ordered(items, unit)}{scope}.",
                        _refs(items, key))
    low, high = _extreme_groups(items)
    if {v for v, _ in low} & {v for v, _ in high}:
        return Sentence(f"{what}, lowest first: {_ordered(items, unit)}{scope}.", _refs(items, key))
    return Sentence(f"{what}: {_listed(low, unit)} {low_words}, {_listed(high, unit)} {high_words}{scope}.",
                    _refs(low + high, key))


def _memory(table: Table):
    items = _usable(table, "memory")
    if len(items) < 2:
        return None
    return _ends(items, "memory", "KiB", "For many idle connections, memory per idle connection (process RSS "
                 "+ kernel)", "the least", "the most", table)


def _held(table: Table):
    measured = [(v, table.cells[v]["held"]) for v in table.variants if table.cells[v]["held"].status == MEASURED]
    if not measured:
        return None
    yes = [(v, c) for v, c in measured if c.text.startswith("yes")]
    no = [(v, c) for v, c in measured if not c.text.startswith("yes")]
    answered = [v for v, _ in yes if table.cells[v]["c10k_p99"].usable]
    text = (f"Holding {table.headers['held'].split(' ')[0]} idle connections: {len(yes)} of the "
            f"{len(table.variants)} models held them all ({_names(v for v, _ in yes) or 'none'})")
    if no:
        text += "; " + "; ".join(f"{v} did not ({c.text.removeprefix('no: ')})" for v, c in no)
    unmeasured = [v for v in table.variants if v not in {v for v, _ in measured}]
    if unmeasured:
        text += f"; not measured: {_names(unmeasured)}"
    p99 = [(v, table.cells[v]["c10k_p99"]) for v in answered]
    refs = _refs(measured, "held")
    if len(p99) > 1:
        low, high = _extreme_groups(p99)
        text += f". The probe's p99 meanwhile: lowest {_listed(low, 'ms')}, highest {_listed(high, 'ms')}"
        refs += _refs(low + high, "c10k_p99")
    return Sentence(text + ".", refs)


def _switch(table: Table):
    items = _usable(table, "switch")
    if len(items) < 2:
        return None
    kinds = {}
    for v, c in items:                          # one entry per switch: the thread models share one
        kinds.setdefault(c.source.get("bench"), []).append((v, c))
    distinct = [("/".join(v for v, _ in group), group[0][1]) for group in kinds.values()]
    return Sentence(f"To go from one connection's work to another's, cheapest first (ns per switch, one CPU): "
                    f"{_ordered(distinct, 'ns')}{_scope(table, items, 'switch')}.", _refs(items, "switch"))


def _throughput(table: Table):
    rps, cpu = _usable(table, "rps"), _usable(table, "cpu")
    if not rps:
        return None
    _, top = _extreme_groups(rps)
    text = f"For the most requests/s at {table.headers['rps'].split(' at ')[-1]}: {_listed(top, 'req/s')}"
    refs = _refs(top, "rps")
    if cpu:
        least, _ = _extreme_groups(cpu)
        text += f"; the least server CPU per request: {_listed(least, 'µs')}"
        refs += _refs(least, "cpu")
    return Sentence(text + _scope(table, rps, "rps") + ".", refs)


def _latency(table: Table):
    items = _usable(table, "p99_half")
    if len(items) < 2:
        return None
    return _ends(items, "p99_half", "ms", "For a low tail latency at half of each model's capacity, p99",
                 "at the low end", "at the high end", table)


def _convoy(table: Table):
    items = _usable(table, "convoy")
    if not items:
        return None
    within = [(v, c) for v, c in items if derive.compare_medians(c.interval, CONVOY_LIMIT) == derive.LOWER]
    edge = [(v, c) for v, c in items if derive.compare_medians(c.interval, CONVOY_LIMIT) == derive.TIE]
    limit = num(CONVOY_LIMIT)
    text = ("For CPU-bound work beside short requests, " + (
        f"only {_names(f'{v} ({num(c.value)}×)' for v, c in within)} keep the short requests' p99 within {limit}×"
        if within else f"no model keeps the short requests' p99 within {limit}×"))
    if edge:
        text += f"; {_names(f'{v} ({num(c.value)}×)' for v, c in edge)} at {limit}× within noise"
    return Sentence(text + _scope(table, items, "convoy") + ".", _refs(within + edge, "convoy"))


def _scaling(table: Table):
    items = _usable(table, "scaling_cpu")
    if not items:
        return None
    by = {verdict: [(v, c) for v, c in items if c.source.get("verdict") == verdict]
          for verdict in (derive.HIGHER, derive.TIE, derive.LOWER)}
    listed = {k: _names(f"{v} {num(c.value)}×" for v, c in group) for k, group in by.items()}
    text = "For CPU-bound work on a second CPU (2 processes, go: GOMAXPROCS 2), " + (
        f"{listed[derive.HIGHER]} gained" if by[derive.HIGHER] else "no model gained")
    if by[derive.TIE]:
        text += f"; {listed[derive.TIE]} tied with one CPU within noise"
    if by[derive.LOWER]:
        text += f"; {listed[derive.LOWER]} lost"
    return Sentence(text + _scope(table, items, "scaling_cpu") + ".", _refs(items, "scaling_cpu"))


def _past(table: Table):
    items = _usable(table, "past")
    if not items:
        return None
    low = sorted(_extreme_groups(items)[0], key=lambda vc: vc[1].value)
    kept = [v for v in table.variants if table.cells[v]["past"].text.startswith("no knee")]
    text = (f"Past capacity, latency bent earliest (the knee, × the model's capacity) for "
            f"{_names(f'{v} {num(c.value)}×' for v, c in low)}" + (" (a tie within noise)" if len(low) > 1 else ""))
    if kept:
        text += f"; {_names(kept)} showed no knee up to their highest valid rate"
    return Sentence(text + _scope(table, items, "past") + ".", _refs(low, "past"))


GUIDE = (_memory, _held, _switch, _throughput, _latency, _convoy, _scaling, _past)


def guide(table: Table) -> list:
    """The decision guide's sentences (``GUIDE``), each left out when its cells are not measured."""
    return [s for s in (make(table) for make in GUIDE) if s is not None]


# -- the page ------------------------------------------------------------------------------------------

def section(table: Table) -> str:
    """The report's first section: the table, its notes, then the decision guide."""
    guide_items = [s.text for s in table.guide] or ["Nothing to decide from: no column has figures for two models."]
    return "\n".join([
        f'<h2 id="{SECTION_ID}">{html.esc(TITLE)}</h2>',
        "<p>Each cell comes from this run's own tables (the experiment's section below has the detail); "
        f"the whole table is {FILE} beside this page.</p>",
        html.table(table.frame()),
        html.bullets(table.notes, "missing"),
        "<h3>Which model when: the guide, computed from the table</h3>",
        html.bullets(guide_items, "summary")])
