"""``conclab report RUN``: results/<run-id>/report.html, one page with charts, tables and findings.

The page, top to bottom: banners (a noisy, uncalibrated or smoke run says
so), the trade-off table with its decision guide (analysis/tradeoff_table.py; also
written as tradeoff.csv beside the page), "How far to trust this run" (the run's calibration: analysis/trust.py),
a short summary (the charts' findings and the verdicts), warnings (saturated load generator, skipped backends, a noisy
machine, an unfinished run), the machine, the claims of the article the lab
answers (docs/article.md) against the numbers, the performance targets, then
one section per experiment: charts (PNG beside the page in charts/, SVG
linked), the sentence each chart supports, and a table of the medians. An
experiment the run lacks gets a section that says so. Everything on the page
is computed from the run's files.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import pandas as pd

from conclab.experiments import registry
from conclab.experiments.harness.tables import COLUMNS

from . import (charts, claims, derive, findings, gil, html, redis_cost, style, tables, tradeoff_table, tradeoffs,
               trust)
from .fmt import Finding, num
from .results import Run

REPORT_FILE = "report.html"
CHART_DIR = "charts"
SIZE_LIMIT_BYTES = 1_000_000       # a file of the run directory (raw/ aside) above this gets a warning
RAW_DIR = "raw"


@dataclass
class ChartSpec:
    name: str
    experiment: str
    make: object                       # make(run) -> (Finding, draw() -> figure, or None when there is no data)


@dataclass
class ChartResult:
    name: str
    experiment: str
    finding: Finding
    files: dict = field(default_factory=dict)      # {"png": relative path, "svg": ...}; empty: not drawn


# -- the charts: data -> finding -> figure ----------------------------------------------------------

def _memory_rss(run):
    points = derive.memory_points(run)
    f = findings.memory_growth(points)
    return f, (lambda: charts.draw_memory_rss(points, f)) if not points.empty else None


def _memory_per_conn(run):
    slopes = derive.memory_slopes(run)
    f = findings.memory_per_conn(slopes)
    return f, (lambda: charts.draw_memory_per_conn(slopes, f)) if not slopes.empty else None


def _thread_vms(run):
    slopes, points = derive.memory_slopes(run), derive.memory_points(run)
    f = findings.thread_vms(slopes)
    return f, (lambda: charts.draw_thread_vms(points, slopes, f)) if f.facts else None


def _spectrum(run):
    points, rows, fraction = derive.spectrum(run)
    f = findings.spectrum(points, rows, fraction, below_floor=lambda delta_us: trust.below_floor(run, delta_us))
    source = findings.SPECTRUM_SOURCE.format(fraction=num(fraction))
    return f, (lambda: charts.draw_spectrum(points, f, source)) if not points.empty else None


def _latency_load(run):
    lat, knees = derive.latency(run), derive.knees(run)
    f = findings.latency_load(lat, knees)
    return f, (lambda: charts.draw_latency_load(lat, knees, f)) if not lat.empty else None


def _throughput(run):
    t, conns = derive.throughput(run), derive.reference_conns(run)
    f = findings.throughput(derive.at_reference(run), conns)
    return f, (lambda: charts.draw_throughput(t, f, conns)) if not t.empty else None


def _plain(name: str, frames=derive):
    """A chart whose table, finding and drawing all take their name from it: derive.X (or ``frames``.X),
    findings.X, charts.draw_X."""
    derive_table, find, draw = getattr(frames, name), getattr(findings, name), getattr(charts, f"draw_{name}")

    def chart(run):
        table = derive_table(run)
        f = find(table)
        return f, (lambda: draw(table, f)) if not table.empty else None
    return chart


def _switch(run):
    micro = derive.switch_micro(run)
    f = findings.switch(micro)
    return f, (lambda: charts.draw_switch(micro, f)) if not micro.empty else None


def _cores(run):
    frame = gil.cores_frame(run)
    f = findings.cores(frame, gil.cores_scaling(frame, run.tables["cores"]))
    return f, (lambda: charts.draw_cores(frame, f)) if not frame.empty else None


def _pitfalls(run):
    series, summary = run.tables["pitfalls"], run.tables["pitfalls_summary"]
    f = findings.pitfalls(summary)
    return f, (lambda: charts.draw_pitfalls(series, f)) if not series.empty else None


# How the charts that are not _plain are made; which charts there are, their order and experiment: the registry.
MAKERS = {"memory_rss": _memory_rss, "memory_per_conn": _memory_per_conn, "memory_thread_vms": _thread_vms,
          "throughput": _throughput, "latency_spectrum": _spectrum, "latency_load": _latency_load,
          "switch": _switch, "pitfalls": _pitfalls,
          **{name: _plain(name, tradeoffs) for name in tradeoffs.TABLES},
          "convoy": _plain("convoy", gil), "cores": _cores, "redis_call": redis_cost.make}
CHARTS = tuple(ChartSpec(name, e.name, MAKERS.get(name) or _plain(name)) for e in registry.EXPERIMENTS
               for name in e.charts)


def draw_charts(run: Run, out_dir: str) -> list:
    """Every chart of the run (PNG + SVG in out_dir/charts); a chart without data keeps its finding only."""
    results = []
    for spec in CHARTS:
        finding, draw = spec.make(run)
        result = ChartResult(spec.name, spec.experiment, finding)
        if draw is not None:
            with style.context():
                paths = style.save(draw(), os.path.join(out_dir, CHART_DIR), spec.name)
            result.files = {ext: os.path.relpath(p, out_dir) for ext, p in paths.items()}
        results.append(result)
    return results


# -- warnings and metadata ------------------------------------------------------------------------

ROUNDS_FOR_INTERVALS = 3           # harness.stats.MIN_BOOTSTRAP_N: fewer rounds, the interval is min–max (flagged)


def warnings(run: Run) -> list:
    out = []
    rounds = int((run.manifest.get("parameters") or {}).get("repeat") or 1)
    if rounds < ROUNDS_FOR_INTERVALS:
        out.append(f"{rounds} round(s): the intervals are min–max of fewer than {ROUNDS_FOR_INTERVALS} rounds (flagged "
                   "min-max in summary.csv); a ranking that separates here may not separate with more rounds.")
    status = run.manifest.get("status")
    if status != "complete":
        out.append(f"The run's status is {status or 'unknown'!r}: it did not complete, some points are missing.")
    for row in run.skipped.itertuples():
        where = f" ({row.point})" if isinstance(row.point, str) and row.point else ""
        out.append(f"{row.experiment}: {row.variant or '-'}{where} skipped: {row.reason}")
    for table in (t for e in registry.EXPERIMENTS for t in e.tables if "loadgen_saturated" in COLUMNS[t.name]):
        t, point = run.tables[table.name], table.point
        sat = t[t.loadgen_saturated.fillna(0) > 0] if not t.empty else t
        if not sat.empty:
            points = sorted({f"{r.variant}@{point}={num(getattr(r, point))}" for r in sat.itertuples()})
            out.append(f"{table.name}: the load generator was saturated at {len(points)} point(s) "
                       f"({', '.join(points)}); there it measured itself, not the server.")
    for table in (t for e in registry.EXPERIMENTS for t in e.tables if "valid" in COLUMNS[t.name]):
        t, point = run.tables[table.name], table.point
        ok, why = derive.validity(t)
        bad = t[~ok].assign(why_=why[~ok])
        if not bad.empty:
            points = list(dict.fromkeys(f"{r.variant}@{point}={num(getattr(r, point))}: {r.why_}"
                                        for r in bad.itertuples()))
            out.append(f"{table.name}: {len(points)} invalid point(s), marked {tables.INVALID_MARK} in the tables and "
                       f"left out of the findings ({'; '.join(points)}).")
    host = run.manifest.get("host") or {}
    load, cpus = (host.get("loadavg_at_start") or [None])[0], host.get("cpu_count")
    if load is not None and cpus and load > cpus:
        out.append(f"Load average {num(load)} at start on {cpus} CPUs: other work shared the machine, "
                   "every number is noisy.")
    return out


def machine(run: Run) -> pd.DataFrame:
    """The run and the machine it ran on (manifest.json) as (what, value) rows."""
    m, profile = run.manifest, run.profile
    host, params, git = m.get("host") or {}, m.get("parameters") or {}, m.get("git") or {}
    ram_gib = num((host.get("memory_total_kib") or 0) / 1024 ** 2)
    dirty = " (uncommitted changes)" if git.get("dirty") else ""
    rows = {
        "run": f"{run.id}: {m.get('status', '?')}, {num(m.get('elapsed_s'))} s, started {m.get('start', '?')}",
        "machine": f"{host.get('cpu_model', '?')}, {host.get('cpu_count', '?')} CPUs, {ram_gib} GiB RAM",
        "system": f"{host.get('os', '?')} {host.get('kernel', '?')}, Python "
                  f"{(host.get('python') or {}).get('version', '?')}, {host.get('go') or 'no Go'}",
        "pinning": f"servers on CPUs {params.get('server_cpus', '?')}, "
                   f"load generator on {params.get('loadgen_cpus', '?')}",
        "profile": f"{profile.get('name', '?')}: {num(profile.get('point_s'))} s per point, "
                   f"{params.get('repeat', 1)} interleaved round(s), reference point "
                   f"{profile.get('reference_conns', '?')} conns",
        "load average": f"start {_loadavg(host.get('loadavg_at_start'))}, end {_loadavg(m.get('loadavg_at_end'))}",
        "limits": f"open files {host.get('rlimit_nofile', '?')}, stack {host.get('rlimit_stack', '?')}",
        "git": f"{git.get('branch', '?')} {str(git.get('commit', '?'))[:12]}{dirty}",
    }
    return pd.DataFrame(list(rows.items()), columns=["what", "value"])


def _loadavg(values) -> str:
    return " / ".join(num(v) for v in values) if values else "?"


def big_files(path: str) -> list:
    """Files of the run directory (raw/ aside) larger than SIZE_LIMIT_BYTES."""
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not (root == path and d == RAW_DIR)]
        out += [os.path.join(root, f) for f in files if os.path.getsize(os.path.join(root, f)) > SIZE_LIMIT_BYTES]
    return sorted(out)


# -- the page -------------------------------------------------------------------------------------

def summary(run: Run, results: list, claim_rows: list, target_rows: pd.DataFrame) -> list:
    by_name = {r.name: r for r in results}
    headlines = [n for e in registry.EXPERIMENTS for n in e.findings]
    items = [by_name[n].finding.title + "." for n in headlines if n in by_name and by_name[n].files]
    holds = sum(c.verdict.startswith(("holds", "agrees")) for c in claim_rows)
    measured = [c for c in claim_rows if c.verdict != "not measured"]
    items.append(f"The article's claims: {holds} of {len(measured)} measured agree with this run "
                 "(details below).")
    counted = target_rows[target_rows.status != "not measured"]
    items.append(f"Performance targets: {int((counted.status == 'met').sum())} met, "
                 f"{int((counted.status == 'missed').sum())} missed, "
                 f"{int((target_rows.status == 'not measured').sum())} not measured.")
    items.append(rounds_note(run))
    return items


def rounds_note(run: Run) -> str:
    """How the summary's numbers were made: medians over interleaved rounds, ranked only where intervals separate."""
    rounds = int((run.manifest.get("parameters") or {}).get("repeat") or 1)
    text = (f"Every number is a median over {rounds} interleaved round(s) of valid points (every backend measured "
            "once per round, in turn); ranges in parentheses are min–max over the rounds. Two backends are ranked "
            "(faster, most, ...) only where the 95 % intervals of their medians separate; otherwise the page says "
            "they tie within noise.")
    if rounds < ROUNDS_FOR_INTERVALS:
        text += (f" With {rounds} round(s) the interval is only min–max"
                 + (", a single value: no noise was measured, so rankings here can be noise" if rounds == 1 else "")
                 + f"; use {ROUNDS_FOR_INTERVALS} or more (the standard profile).")
    return text


def section(run: Run, experiment: str, results: list) -> str:
    about = registry.get(experiment).about(size=num(run.profile.get("size")))
    parts = [f'<h2 id="{experiment}">{html.esc(experiment)}</h2>', f"<p>{html.esc(about)}</p>"]
    if not run.has(experiment):
        why = ("was requested but produced no rows (see the warnings)" if run.requested(experiment)
               else "was not part of this run")
        parts.append(html.bullets([f"No data: {experiment} {why}. Run `conclab run {experiment}` to measure it."],
                                  "missing"))
        return "\n".join(parts)
    for result in (r for r in results if r.experiment == experiment):
        if result.files:
            parts.append(html.figure(result.files["png"], result.files["svg"], result.finding.title))
        parts.append(f'<p class="finding">{html.esc(result.finding.text)}</p>')
    if registry.get(experiment).pitfalls:
        parts.append("<h3>The article's risk table, measured</h3>" + html.table(pitfall_table(run)))
    for caption, frame in [*tables.experiment_tables(run, experiment), *tradeoffs.experiment_tables(run, experiment),
                           *gil.experiment_tables(run, experiment), *redis_cost.experiment_tables(run, experiment)]:
        if not frame.empty:
            parts.append(f"<h3>{html.esc(caption)}</h3>" + html.table(frame, swatch=style.color))
    return "\n".join(parts)


def pitfall_table(run: Run) -> pd.DataFrame:
    """One row per pitfall: the article's row (Chinese, with English) and what broken vs fixed measured."""
    s = run.tables["pitfalls_summary"]
    rows = []
    for pitfall in registry.pitfalls():
        cases = s[s.pitfall == pitfall.name]
        if cases.empty:
            continue
        broken, fixed = cases[cases.fixed == 0], cases[cases.fixed == 1]
        (risk_zh, risk), (cons_zh, cons), (remedy_zh, remedy) = pitfall.risk, pitfall.consequence, pitfall.remedy
        rows.append({"pitfall": pitfall.name, "risk (风险点)": f"{risk_zh} ({risk})",
                     "consequence (后果)": f"{cons_zh} ({cons})" if cons_zh else cons,
                     "remedy (解决方案)": f"{remedy_zh} ({remedy})", "measure": pitfall.measure,
                     "broken": _by_variant(broken, pitfall.measure), "fixed": _by_variant(fixed, pitfall.measure),
                     "also": _also(pitfall, {"broken": broken, "fixed": fixed})})
    return pd.DataFrame(rows)


def _by_variant(frame: pd.DataFrame, column: str) -> str:
    scale = 1 / 1024 if column.startswith("rss") else 1
    unit = " MiB" if column.startswith("rss") else ""
    return ", ".join(f"{r.variant} {num(getattr(r, column) * scale)}{unit}" for r in frame.itertuples())


def _also(pitfall, sides: dict) -> str:
    """The pitfall's registry Facts in words: "fds +3 broken, +0 fixed; ..."."""
    parts = []
    for fact in pitfall.also:
        values = [f"{_fact_value(fact, sides[side])} {side}" for side in fact.sides]
        parts.append(f"{fact.label} " + ("; " if fact.agg == "each" else ", ").join(values))
    return "; ".join(parts)


def _fact_value(fact, frame: pd.DataFrame) -> str:
    if fact.agg == "each":
        return ", ".join(f"{r.variant} {num(getattr(r, fact.column))}" for r in frame.itertuples())
    first, _, minus = fact.column.partition("-")
    values = frame[first] - frame[minus] if minus else frame[first]
    return fact.sign + num(getattr(values, fact.agg)())


def render(run: Run, results: list, out_dir: str, tradeoff=None) -> str:
    """The page; ``tradeoff``: the run's tradeoff_table.Table (built here when not given)."""
    claim_rows, target_rows = claims.claims(run), claims.targets(run)
    tradeoff = tradeoff or tradeoff_table.build(run)
    body = [trust.banners(run), "<h1>conclab: thread pools vs coroutines vs goroutines</h1>",
            f'<p class="small">Run {html.esc(run.id)} · computed from {html.esc(run.path)} · sections: '
            + " · ".join(f'<a href="#{e}">{e}</a>'
                         for e in (tradeoff_table.SECTION_ID, trust.SECTION_ID, "warnings", "claims", "targets",
                                   *registry.names(), RELIABILITY_ID))
            + "</p>", tradeoff_table.section(tradeoff), trust.section(run),
            "<h2>Summary</h2>", html.bullets(summary(run, results, claim_rows, target_rows), "summary"),
            '<h2 id="warnings">Warnings</h2>', html.bullets(warnings(run) or ["None."], "warnings"),
            "<h2>Machine</h2>", html.table(machine(run)),
            '<h2 id="claims">Claims vs measured</h2>',
            ("<p>The statements of the article the lab answers (docs/article.md: a Go interview write-up) "
             "against this run's numbers.</p>"),
            html.table(pd.DataFrame([c.__dict__ for c in claim_rows])),
            '<h2 id="targets">Targets</h2>',
            (f"<p>Throughput ratio to go at the reference point (closed loop, {derive.reference_conns(run)} "
            f"connections, {num(run.profile.get('size'))} B ECHO) and RSS per idle connection, against the "
            "lab's performance targets.</p>"),
            html.table(target_rows, status_column="status", swatch=style.color)]
    body += [section(run, e, results) for e in registry.names()]
    body.append(reliability_section(run, out_dir))
    body.append(files_section(run, out_dir))
    return html.page(f"conclab report {run.id}", "\n".join(body))


def files_section(run: Run, out_dir: str) -> str:
    """Links to the run's tables (relative to the page, wherever it was written)."""
    names = sorted(f for f in os.listdir(run.path) if f.endswith((".csv", ".json")))
    where = os.path.relpath(run.path, out_dir)
    links = "".join(f'<li><a href="{html.esc(os.path.join(where, n) if where != "." else n)}">{html.esc(n)}</a> '
                    f'<span class="small">{num(os.path.getsize(os.path.join(run.path, n)) / 1024)} KiB</span></li>'
                    for n in names)
    return f"<h2>Files</h2><ul>{links}</ul>"


# -- reliability: conclab check's files, when the run directory has them ----------------------------
RELIABILITY_ID = "reliability"
SOAK_CHART = "soak"


def reliability_section(run: Run, out_dir: str) -> str:
    """check.csv (the scenarios per variant), the soak's time series and verdicts, the overload table;
    each from its file in the run directory, and a plain "none" for each the run lacks."""
    frames = tables.read_reliability(run.path)
    parts = [f'<h2 id="{RELIABILITY_ID}">reliability</h2>',
             ("<p>From <code>conclab check</code> run into this directory (<code>--run-id</code>): the fault "
              "scenarios (check.csv), the soak (<code>--soak</code>: soak.csv, soak_summary.csv) and the overload "
              "runs (<code>--overload</code>: overload.csv). docs/reliability.md describes each.</p>")]
    missing = [f"No {what}: this run has no {name}. Run `conclab check {option}--run-id {run.id}` to add it."
               for key, name, what, option in (("check", "check.csv", "scenario table", ""),
                                                ("soak", "soak.csv", "soak", "--soak SECONDS "),
                                                ("overload", "overload.csv", "overload table", "--overload "))
               if key not in frames]
    if "check" in frames:
        check = frames["check"]
        parts.append("<h3>Fault scenarios per variant (check.csv)</h3>" + html.table(tables.check_table(check)))
        failures = tables.check_failures(check)
        if not failures.empty:
            parts.append("<h3>Scenarios that did not pass</h3>" + html.table(failures))
    if "soak_summary" in frames:
        parts.append("<h3>At a glance: soak and overload per variant</h3>"
                     + html.table(tables.reliability_digest(frames["soak_summary"], frames.get("overload")),
                                swatch=style.color))
    if "soak" in frames:
        finding = soak_finding(frames.get("soak_summary"))
        with style.context():
            paths = style.save(charts.draw_soak(frames["soak"], finding), os.path.join(out_dir, CHART_DIR), SOAK_CHART)
        files = {ext: os.path.relpath(p, out_dir) for ext, p in paths.items()}
        parts += [html.figure(files["png"], files["svg"], finding.title),
                  f'<p class="finding">{html.esc(finding.text)}</p>']
    if "soak_summary" in frames:
        parts.append("<h3>Soak verdicts (soak_summary.csv)</h3>"
                     + html.table(tables.soak_table(frames["soak_summary"]), swatch=style.color))
    if "overload" in frames:
        parts.append("<h3>Overload: how each model degrades (overload.csv)</h3>"
                     + html.table(tables.overload_table(frames["overload"]), status_column="verdict",
                                  swatch=style.color))
    if missing:
        parts.append(html.bullets(missing, "missing"))
    return "\n".join(parts)


def soak_finding(summary: pd.DataFrame | None) -> Finding:
    """The soak chart's title and text: how many variants passed every criterion, and which criteria failed."""
    if summary is None or summary.empty:
        return Finding("Soak: RSS, fds and p99 per second", "The run has soak.csv but no soak_summary.csv: "
                                                               "no verdicts to show.")
    verdicts = summary.groupby("variant", sort=False).verdict.apply(lambda v: (v != "FAIL").all())
    failed = summary[summary.verdict == "FAIL"]
    unresolved = summary[summary.verdict == "unresolved"]
    text = (f"{int(verdicts.sum())} of {len(verdicts)} variants had no soak criterion FAIL"
            + (": failed " + "; ".join(f"{r.variant} {r.criterion}" for r in failed.itertuples()) if len(failed) else "")
            + (f". Unresolved (the run could not decide, see why): {len(unresolved)} criteria"
               if len(unresolved) else "")
            + ". Hollow markers: seconds where the load generator saturated (its own self-check).")
    undecided = unresolved.variant.nunique()
    title = (f"Soak: no criterion failed in {int(verdicts.sum())} of {len(verdicts)} variants"
             + (f", {undecided} with a criterion left unresolved" if undecided else "")
             + " (RSS, fds, p99 per second)")
    return Finding(title, text, {"passed": int(verdicts.sum()), "variants": len(verdicts),
                                 "unresolved_variants": int(undecided)})


def write(run: Run, out_dir: str | None = None) -> tuple[str, list]:
    """Write report.html, tradeoff.csv and charts/ for one run (into the run's directory by default).

    Returns the page's path and the ChartResults (each chart's finding and files).
    """
    out_dir = out_dir or run.path
    os.makedirs(out_dir, exist_ok=True)
    results = draw_charts(run, out_dir)
    tradeoff = tradeoff_table.build(run)
    tradeoff_table.write_csv(tradeoff, out_dir)
    path = os.path.join(out_dir, REPORT_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(run, results, out_dir, tradeoff))
    for big in big_files(out_dir):
        print(f"conclab report: warning: {big} is over {SIZE_LIMIT_BYTES // 1_000_000} MB; keep raw dumps in "
              f"{RAW_DIR}/ (git-ignored)", file=sys.stderr)
    return path, results


def build(run: Run, out_dir: str | None = None) -> str:
    """Write the report (see ``write``) and return the page's path."""
    return write(run, out_dir)[0]
