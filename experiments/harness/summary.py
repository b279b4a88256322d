"""summary.csv and targets.csv: the medians (and spread) over repeats, and the headline numbers.

summary.csv is long and tidy: one row per (experiment, variant, point, metric)
with the median, min, max and count over the repeats (the interleaved rounds) and
the 95 % interval of the median, ``ci_lo`` .. ``ci_hi`` (``ci_flag``: "bootstrap",
or "min-max" with fewer than 3 rounds); all of it is harness.stats.spread. Its point ``knee``
(metric ``knee_rps``) is, per repeat, the served half of the latency knee
(``served_well``: the highest offered rate served within ``KNEE_KEEPUP``,
without errors, with p99 at most ``KNEE_P99_FACTOR`` times its p99 at the
lowest rate). The knee itself, the one the report shows, is ``knee``: the only
place it is computed (analysis.derive.knees calls it).

targets.csv holds the headline numbers the lab's targets are about: at the
reference point (closed loop, 50 conns, 64 B ECHO, server and generator on their
own CPUs) each variant's throughput as a ratio to go's, and each variant's memory per idle
connection (slope of RSS, and of USS, over connections held).

Invalid points (``valid`` = 0: a connection never served, requests unanswered, the generator saturated, a
window under 20 mean latencies: harness.loadproc.validity; the server had not accepted every connection when
measuring began: harness.run.accepted_check) never make a median, a knee or a target: summary.csv has their metric ``valid``
(0/1 per repeat) and nothing else, a target whose point is invalid has no value and says why.
"""
from __future__ import annotations

import math
from collections import defaultdict

from .stats import spread

KNEE_KEEPUP = 0.95          # served at least this fraction of the offered rate...
KNEE_P99_FACTOR = 10        # ...with p99 at most this multiple of the p99 at the lowest rate
KNEE_FIELDS = ("served_knee", "p99_knee", "top_rps", "knee", "where")
NO_VALID = "no valid point"  # knee "where" of a variant whose every latency point was invalid
REFERENCE_VARIANT = "go"    # ...and throughput ratios are to this variant

# experiment table -> (point label, x column, metrics summarised)
SPECS = {
    "memory": (lambda r: f"n={r['n_target']}", "n_target",
               ("n_conns", "rss_kib", "uss_kib", "vms_kib", "threads", "fds", "connect_errors")),
    "throughput": (lambda r: f"conns={r['conns']}", "conns",
                   ("throughput_rps", "p50_us", "p99_us", "p999_us", "errors", "server_cpu_percent",
                    "cpu_us_per_req", "ctx_per_req")),
    "latency": (lambda r: f"fraction={r['rate_fraction']}", "rate_fraction",
                ("offered_rps", "throughput_rps", "p50_us", "p99_us", "p999_us", "errors", "server_cpu_percent",
                 "cpu_us_per_req", "ctx_per_req")),
    "io_bound": (lambda r: f"conns={r['conns']}", "conns",
                 ("throughput_rps", "little_ceiling_rps", "conc_ceiling_rps", "p50_us", "p99_us", "errors",
                  "server_cpu_percent", "cpu_us_per_req", "ctx_per_req")),
    "cpu_bound": (lambda r: f"conns={r['conns']} cpus={r['server_cpus']}", "conns",
                  ("throughput_rps", "ceiling_rps", "p99_us", "server_cpu_percent", "errors", "cpu_us_per_req",
                   "ctx_per_req")),
    "switch": (lambda r: r["bench"], None, ("ns_per_switch", "cpu_us_per_req", "ctx_per_req")),
    "c10k": (lambda r: f"hold={r['hold_target']}", "hold_target",
             ("held", "connect_errors", "requests", "errors", "p99_us", "rss_kib", "threads")),
}


def number(value):
    """A cell as a float; None when empty or not a number (NaN included)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def is_valid(row: dict) -> bool:
    """Whether a load point may be used (its ``valid`` cell; a row without one: unless the generator was saturated)."""
    valid = number(row.get("valid"))
    if valid is not None:
        return valid != 0
    return not number(row.get("loadgen_saturated"))


def valid_rows(rows) -> list:
    return [r for r in rows if is_valid(r)]


def summarize(tables: dict) -> list:
    """summary.csv rows from this run's table rows ({table: [row, ...]}); invalid points: only ``valid``."""
    out = []
    for table, (point_of, x_column, metrics) in SPECS.items():
        groups = defaultdict(list)
        for row in tables.get(table, []):
            groups[(row["backend"], row["variant"], point_of(row))].append(row)
        for (backend, variant, point), rows in groups.items():
            x = rows[0][x_column] if x_column else ""
            if any("valid" in r for r in rows):
                out.append({"experiment": table, "backend": backend, "variant": variant, "point": point, "x": x,
                            "metric": "valid", **spread(float(is_valid(r)) for r in rows)})
                rows = valid_rows(rows)
            for metric in metrics:
                stats = spread(r.get(metric) for r in rows)
                if stats:
                    out.append({"experiment": table, "backend": backend, "variant": variant, "point": point,
                                "x": x, "metric": metric, **stats})
    out += fit_summary(tables.get("memory_fit", []))
    out += knee_summary(tables.get("latency", []))
    return out


def fit_summary(rows: list) -> list:
    groups = defaultdict(list)
    for row in rows:
        groups[(row["backend"], row["variant"], row["metric"])].append(row)
    out = []
    for (backend, variant, metric), group in groups.items():
        stats = spread(r["per_conn"] for r in group)
        if stats:
            out.append({"experiment": "memory", "backend": backend, "variant": variant, "point": "fit", "x": "",
                        "metric": f"{metric}_per_conn", **stats})
    return out


def knee(rows) -> dict:
    """Where one variant's latency under load bends: KNEE_FIELDS, from its latency rows (every repeat).

    Two signs, whichever comes first. ``served_knee``: per repeat the highest offered rate served well
    (``served_well``), median over repeats (None: none was). ``p99_knee``: over the medians per rate, the
    highest offered rate before p99 first exceeds KNEE_P99_FACTOR x its value at the lightest load (an
    open-loop generator can answer everything late, so the served rate alone can miss a knee). ``knee``:
    the lower of the two inside the range tested (below ``top_rps``, the highest offered rate); ``where``:
    "in range", "beyond" (no knee up to the highest rate), "below" (none served) or "no valid point" (every
    row invalid: nothing to judge). Only valid rows count (``is_valid``).
    """
    every = list(rows)
    rows = valid_rows(every)
    if every and not rows:
        offered = [number(r.get("offered_rps")) for r in every if number(r.get("offered_rps")) is not None]
        return {"served_knee": None, "p99_knee": None, "top_rps": max(offered) if offered else None,
                "knee": None, "where": NO_VALID}
    repeats = defaultdict(list)
    for row in rows:
        repeats[row.get("repeat")].append(row)
    served = spread(served_well(group) for group in repeats.values())
    served_knee = served["median"] if served else None
    points = _median_points(rows)
    offered = [o for o, _ in points if o is not None]
    top = max(offered) if offered else None
    p99_knee = _p99_knee(points)
    inside = [k for k in (served_knee, p99_knee) if k is not None and top is not None and k < top]
    where = "below" if served_knee is None else "in range" if inside else "beyond"
    return {"served_knee": served_knee, "p99_knee": p99_knee, "top_rps": top,
            "knee": min(inside) if inside and where == "in range" else None, "where": where}


def _median_points(rows) -> list:
    """(offered rps, p99 us): medians over repeats per rate_fraction, by offered rate (unknown last)."""
    groups = defaultdict(list)
    for row in rows:
        groups[row.get("rate_fraction", row.get("offered_rps"))].append(row)
    points = []
    for group in groups.values():
        offered, p99 = spread(r.get("offered_rps") for r in group), spread(r.get("p99_us") for r in group)
        points.append((offered["median"] if offered else None, p99["median"] if p99 else None))
    return sorted(points, key=lambda p: (p[0] is None, p[0] or 0.0))


def _p99_knee(points: list):
    base = points[0][1] if points else None
    over = [i for i, (_, p99) in enumerate(points) if base is not None and p99 is not None
            and p99 > KNEE_P99_FACTOR * base]
    return points[over[0] - 1][0] if over and over[0] > 0 else None


def served_well(rows) -> float | None:
    """The highest offered rate still served well in one repeat (None if none was).

    Served well: throughput within KNEE_KEEPUP of the offered rate, no errors,
    and p99 at most KNEE_P99_FACTOR times the p99 at the lowest offered rate.
    """
    rows = sorted((r for r in rows if number(r.get("offered_rps"))), key=lambda r: number(r["offered_rps"]))
    if not rows:
        return None
    base_p99 = number(rows[0].get("p99_us"))
    best = None
    for r in rows:
        offered, served, p99 = number(r["offered_rps"]), number(r.get("throughput_rps")), number(r.get("p99_us"))
        keeps_up = served is not None and served >= KNEE_KEEPUP * offered and not number(r.get("errors"))
        fast = p99 is not None and base_p99 is not None and p99 <= KNEE_P99_FACTOR * max(base_p99, 1.0)
        if keeps_up and fast:
            best = offered
    return best


def knee_summary(rows: list) -> list:
    per_repeat = defaultdict(list)
    for row in valid_rows(rows):
        per_repeat[(row["backend"], row["variant"], row["repeat"])].append(row)
    knees = defaultdict(list)
    for (backend, variant, _), group in per_repeat.items():
        knees[(backend, variant)].append(served_well(group))
    out = []
    for (backend, variant), values in knees.items():
        stats = spread(values)
        if stats:
            out.append({"experiment": "latency", "backend": backend, "variant": variant, "point": "knee", "x": "",
                        "metric": "knee_rps", **stats})
    return out


def targets(summary: list, reference_conns: int, skipped: list) -> list:
    """targets.csv rows: throughput ratio to go at the reference point, KiB per idle connection."""
    point = f"conns={reference_conns}"
    at_point = [r for r in summary if r["experiment"] == "throughput" and r["point"] == point]
    rps = {r["variant"]: (r["backend"], r["median"]) for r in at_point if r["metric"] == "throughput_rps"}
    invalid = {r["variant"]: r["backend"] for r in at_point
               if r["metric"] == "valid" and not r["max"] and r["variant"] not in rps}
    out = []
    go = rps.get(REFERENCE_VARIANT, (None, None))[1]
    why_no_go = ("go's point was invalid" if REFERENCE_VARIANT in invalid else
                 next((s["reason"] for s in skipped if s["variant"] == REFERENCE_VARIANT), "go was not measured"))
    for variant, backend in invalid.items():
        out.append({"target": "throughput_ratio_to_go", "backend": backend, "variant": variant, "value": None,
                    "unit": "ratio", "detail": f"closed loop {reference_conns} conns, 64 B ECHO; no value: the point "
                                               "was invalid in every repeat (throughput.csv invalid_reason)"})
    for variant, (backend, value) in rps.items():
        ratio = value / go if go else None
        detail = (f"closed loop {reference_conns} conns, 64 B ECHO; {value:.0f} rps vs go {go:.0f} rps" if go
                  else f"closed loop {reference_conns} conns, 64 B ECHO; {value:.0f} rps; no ratio: {why_no_go}")
        out.append({"target": "throughput_ratio_to_go", "backend": backend, "variant": variant, "value": ratio,
                    "unit": "ratio", "detail": detail})
    for r in summary:
        if r["experiment"] == "memory" and r["metric"] in ("rss_kib_per_conn", "uss_kib_per_conn"):
            out.append({"target": r["metric"].replace("_per_conn", "_per_idle_conn"), "backend": r["backend"],
                        "variant": r["variant"], "value": r["median"], "unit": "KiB/conn",
                        "detail": f"least-squares slope, median of {r['n']} repeat(s), spread {r['min']:.3g}.."
                                  f"{r['max']:.3g}, 95% interval {r['ci_lo']:.3g}..{r['ci_hi']:.3g} ({r['ci_flag']})"})
    return out
