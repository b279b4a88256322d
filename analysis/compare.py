"""``conclab report --compare RUN_A RUN_B``: two runs side by side, every headline number with B / A.

For a before/after change or two machines. ``headline(run)`` reduces a run to
one number per (metric, variant), the same numbers the report's findings use;
``compare(a, b)`` joins two of them and adds the ratio B / A and whether that
is better, worse, or within ``NOISE`` of the same. The page has both
machines, the ratio chart, and the table.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, NullFormatter

from . import derive, html, style
from .fmt import Finding, num, say
from .report import machine

NOISE = 0.10                 # a ratio within 1 ± NOISE is "same" (a shared 2-core box is noisier than that)
COMPARE_DIR = "compare-{a}-vs-{b}"
CHART_METRICS = ("throughput", "rss_per_conn")     # the ratio chart's panels: metric keys of headline()
HIGHER, LOWER = "higher", "lower"
RATIO_TICKS = (0.1, 0.2, 0.5, 1, 2, 5, 10)
RATIO_MARGIN = 1.8          # the ratio axis reaches this much further (in log) than the largest change


def _rows(key, label, unit, better, frame, column, scale=1.0) -> list:
    if frame.empty or column not in frame:
        return []
    return [{"key": key, "metric": label, "variant": r.variant, "value": getattr(r, column) * scale, "unit": unit,
             "better": better} for r in frame.itertuples() if pd.notna(getattr(r, column))]


def headline(run) -> pd.DataFrame:
    """One row per (metric, variant): value, unit, and which direction is better."""
    ref, conns = derive.valid(derive.at_reference(run)), derive.reference_conns(run)    # invalid points: no headline
    io = derive.valid(derive.io_bound(run))
    io_top = io[io.conns == io.conns.max()] if not io.empty else io
    cpu = derive.valid(derive.cpu_bound(run))
    cpu_one = cpu[cpu.n_server_cpus == cpu.n_server_cpus.min()] if not cpu.empty else cpu
    knees = derive.knees(run)
    micro = derive.switch_micro(run)
    c = derive.c10k(run)
    rows = [
        *_rows("throughput", f"throughput at {conns} conns", "rps", HIGHER, ref, "throughput_rps"),
        *_rows("p99", f"p99 at {conns} conns", "ms", LOWER, ref, "p99_us", 1e-3),
        *_rows("rss_per_conn", "RSS per idle connection", "KiB", LOWER, derive.memory_slopes(run), "rss_kib"),
        *_rows("knee", "latency knee", "rps", HIGHER, knees, "knee"),
        *_rows("io_bound", f"io_bound throughput at {num(io.conns.max()) if not io.empty else '?'} conns", "rps",
               HIGHER, io_top, "throughput_rps"),
        *_rows("cpu_bound", "cpu_bound throughput, fewest CPUs", "rps", HIGHER, cpu_one, "throughput_rps"),
        *_rows("cpu_per_req", "server CPU per request", "µs", LOWER, derive.per_request(run), "cpu_us_per_req"),
        *_rows("ctx_per_req", "context switches per request", "", LOWER, derive.per_request(run), "ctx_per_req"),
        *_rows("c10k_held", "c10k connections held", "conns", HIGHER, c, "held"),
        *_rows("c10k_p99", "c10k probe p99", "ms", LOWER, c, "p99_us", 1e-3),
        *_rows("switch", "switch cost", "ns", LOWER, micro, "ns_per_switch"),
    ]
    return pd.DataFrame(rows, columns=["key", "metric", "variant", "value", "unit", "better"])


def compare(a, b) -> pd.DataFrame:
    """Headline numbers of both runs joined on (metric, variant), with ratio = B / A and a verdict."""
    ha, hb = headline(a), headline(b)
    joined = ha.merge(hb, on=["key", "metric", "variant", "unit", "better"], how="outer", suffixes=("_a", "_b"))
    comparable = (joined.value_a > 0) & (joined.value_b > 0)        # a ratio of a slope <= 0 means nothing
    joined["ratio"] = (joined.value_b / joined.value_a).where(comparable)
    joined["change"] = [_verdict(r, better, both) for r, better, both in
                        zip(joined.ratio, joined.better, joined.value_a.notna() & joined.value_b.notna())]
    keys = {k: i for i, k in enumerate(dict.fromkeys(pd.concat([ha.key, hb.key])))}
    variants = {v: i for i, v in enumerate(style.order(joined.variant.unique()))}
    joined = joined.assign(_k=joined.key.map(keys), _v=joined.variant.map(variants))
    joined = joined.sort_values(["_k", "metric", "_v"], kind="stable").drop(columns=["_k", "_v"])
    return joined[["key", "metric", "unit", "variant", "value_a", "value_b", "ratio", "change", "better"]] \
        .reset_index(drop=True)


def _verdict(ratio, better, both: bool) -> str:
    if not both:
        return "only in one run"
    if ratio is None or pd.isna(ratio):
        return "not comparable (a value <= 0)"
    if abs(ratio - 1) <= NOISE:
        return "same (within noise)"
    improved = ratio > 1 if better == HIGHER else ratio < 1
    return "better in B" if improved else "worse in B"


def draw_ratios(table: pd.DataFrame, a_id: str, b_id: str, finding):
    panels = [k for k in CHART_METRICS if (table.key == k).any() and table[table.key == k].ratio.notna().any()]
    fig, axes = style.figure(ncols=max(1, len(panels)))
    for ax, key in zip(axes[0], panels):
        rows = derive.sort_variants(table[(table.key == key) & table.ratio.notna()])
        y = np.arange(len(rows))
        ax.barh(y, rows.ratio - 1, left=1, color=[style.color(v) for v in rows.variant])   # bars grow from 1
        ax.axvline(1, color="black", lw=1.5)
        ax.axvspan(1 - NOISE, 1 + NOISE, color=style.NEUTRAL, alpha=0.12, label=f"±{num(NOISE * 100)}% (noise)")
        for yi, value in zip(y, rows.ratio):
            ax.annotate(f" {num(value)}× " if value >= 1 else f"{num(value)}× ", (value, yi), va="center",
                        ha="left" if value >= 1 else "right", fontsize=12)
        ax.set_yticks(y, rows.variant)
        ax.invert_yaxis()
        ax.set_xscale("log")
        reach = float(np.exp(np.abs(np.log(rows.ratio)).max() * RATIO_MARGIN))
        ax.set_xlim(1 / reach, reach)
        ax.set_xticks([t for t in RATIO_TICKS if 1 / reach <= t <= reach])
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{num(v)}×"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{rows.metric.iloc[0]}: B / A ({'higher' if rows.better.iloc[0] == HIGHER else 'lower'} "
                      "is better)")
        ax.legend(frameon=False, loc="lower right", fontsize=11)
    style.title(fig, finding.title)
    return fig


def summarize(table: pd.DataFrame) -> Finding:
    """How many numbers got better, worse or stayed the same, and the median throughput ratio."""
    counts = table.change.value_counts()
    t = table[(table.key == "throughput") & table.ratio.notna()]
    text = ("Of {n} numbers measured in both runs, {better} are better in B, {worse} worse and {same} within "
            "{noise}% of A.")
    if len(t):
        text += " Median throughput ratio B / A at the reference point: {tput}×."
    return say("B vs A: {better} numbers better, {worse} worse, {same} the same within noise", text,
               n=int(table.ratio.notna().sum()), better=int(counts.get("better in B", 0)),
               worse=int(counts.get("worse in B", 0)), same=int(counts.get("same (within noise)", 0)),
               noise=NOISE * 100, tput=float(t.ratio.median()) if len(t) else None)


def differences(a, b) -> list:
    """Why the two runs may not compare like for like: unfinished runs, other profiles, machines, repeats."""
    out = [f"Run {r.id} did not complete (status {r.manifest.get('status')!r}): some of its numbers are missing."
           for r in (a, b) if r.manifest.get("status") != "complete"]
    changed = sorted(k for k in set(a.profile) | set(b.profile) if k != "name" and a.profile.get(k) != b.profile.get(k))
    if changed:
        out.append("The profiles differ in " + ", ".join(f"{k} (A {a.profile.get(k)}, B {b.profile.get(k)})"
                                                          for k in changed) + ".")
    for label, get in (("CPU model", lambda r: (r.manifest.get("host") or {}).get("cpu_model")),
                       ("CPU count", lambda r: (r.manifest.get("host") or {}).get("cpu_count")),
                       ("repeats", lambda r: (r.manifest.get("parameters") or {}).get("repeat"))):
        if get(a) != get(b):
            out.append(f"Different {label}: A {get(a)}, B {get(b)}.")
    return out


def render(a, b, table: pd.DataFrame, finding, chart_files: dict) -> str:
    ma, mb = machine(a), machine(b)
    side = pd.DataFrame({"what": ma["what"], f"A: {a.id}": ma["value"], f"B: {b.id}": mb["value"]})
    shown = table.drop(columns=["key", "better"]).rename(columns={"value_a": "A", "value_b": "B", "ratio": "B / A"})
    body = [f"<h1>conclab: {html.esc(a.id)} (A) vs {html.esc(b.id)} (B)</h1>",
            html.bullets([finding.text], "summary"), html.bullets(differences(a, b), "warnings"),
            "<h2>Machines and runs</h2>", html.table(side)]
    if chart_files:
        body += [html.figure(chart_files["png"], chart_files["svg"], finding.title)]
    body += ["<h2>Every headline number</h2>",
             (f"<p>Ratio = B / A. “same” means within ±{num(NOISE * 100)}%; the direction that is better is in "
             "the metric (throughput: higher; latency, memory, CPU, switches: lower).</p>"),
             html.table(shown, swatch=style.color)]
    return html.page(f"conclab compare {a.id} vs {b.id}", "\n".join(body))


def build(a, b, out_dir: str | None = None) -> str:
    """Write the comparison page (and its chart) and return its path."""
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.normpath(b.path)), COMPARE_DIR.format(a=a.id, b=b.id))
    os.makedirs(out_dir, exist_ok=True)
    table = compare(a, b)
    finding = summarize(table)
    files = {}
    if table[table.key.isin(CHART_METRICS)].ratio.notna().any():
        with style.context():
            paths = style.save(draw_ratios(table, a.id, b.id, finding), os.path.join(out_dir, "charts"), "ratios")
        files = {ext: os.path.relpath(p, out_dir) for ext, p in paths.items()}
    path = os.path.join(out_dir, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(a, b, table, finding, files))
    return path
