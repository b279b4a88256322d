"""The charts: one function per chart, frames in, matplotlib figure out.

Each ``draw_*`` takes the derived frames (analysis.derive) and the chart's
``Finding`` (its title states the result) and returns a figure; the report
saves it as PNG and SVG (analysis.style.save). Colours come only from
``style.color``; axes carry their units; nothing here computes a finding.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

from conclab.experiments import registry
from conclab.experiments.harness import summary

from . import derive, style
from .fmt import num

MARKER = "o"
LINE_WIDTH = 2.4
SMALL_MULTIPLE_COLS = 4
PANEL_HEIGHT = 3.6               # inches per row of small multiples
TITLE_HEIGHT = 1.2               # inches above them for the title
HEADROOM = 1.18                  # y axis top = this x the tallest bar or ceiling, room for the legend
LOG_RANGE = 20                   # a bar chart whose values span more than this factor gets a log axis
SPECTRUM_TICKS = (50, 90, 99, 99.9, 99.99, 99.999, 99.9999)


def _points(ax, x, y, rows: pd.DataFrame, color: str, fmt: str = "-", markersize: float = 6, **kwargs) -> None:
    """A line through a variant's points: filled markers where valid, hollow where invalid (left out of
    the findings: derive.valid)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = rows["valid"].astype(bool).to_numpy() if "valid" in rows else np.ones(len(x), dtype=bool)
    ax.plot(x, y, fmt, color=color, lw=LINE_WIDTH, **kwargs)
    ax.plot(x[ok], y[ok], MARKER, color=color, markersize=markersize, linestyle="none")
    if (~ok).any():
        ax.plot(x[~ok], y[~ok], MARKER, color=color, markersize=markersize + 3, markerfacecolor="none",
                markeredgewidth=2, linestyle="none", zorder=6)


SPREAD_NOTE = "whiskers: min–max over rounds"


def _whiskers(ax, x, rows: pd.DataFrame, column: str, color: str, scale: float = 1.0, **kwargs) -> bool:
    """Draw each point's min–max over the rounds (``<column>_min`` .. ``_max``, derive.medians) as a whisker around
    its median; True if any point has a spread to draw (a frame without the columns: nothing drawn)."""
    if f"{column}_min" not in rows or f"{column}_max" not in rows:
        return False
    y = rows[column].astype(float).to_numpy() * scale
    lo = rows[f"{column}_min"].astype(float).to_numpy() * scale
    hi = rows[f"{column}_max"].astype(float).to_numpy() * scale
    keep = np.isfinite(y) & np.isfinite(lo) & np.isfinite(hi) & (hi > lo)
    if not keep.any():
        return False
    x = np.asarray(x, dtype=float)
    ax.errorbar(x[keep], y[keep], yerr=[np.clip(y[keep] - lo[keep], 0, None), np.clip(hi[keep] - y[keep], 0, None)],
                fmt="none", ecolor=color, elinewidth=kwargs.pop("elinewidth", 1.6), capsize=kwargs.pop("capsize", 4),
                alpha=0.85, zorder=4, **kwargs)
    return True


def _spread_legend(ax, drawn: bool) -> None:
    if drawn:
        ax.errorbar([], [], yerr=[], fmt="none", ecolor=style.NEUTRAL, capsize=4, label=SPREAD_NOTE)


def _invalid_legend(ax, frame: pd.DataFrame) -> None:
    if "valid" in frame and not frame["valid"].astype(bool).all():
        ax.plot([], [], MARKER, color=style.NEUTRAL, markerfacecolor="none", markeredgewidth=2, markersize=9,
                linestyle="none", label="invalid (left out of findings)")


def _legend(ax, **kwargs) -> None:
    handles, _labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(frameon=False, **kwargs)


def _thousands(ax, axis: str = "y") -> None:
    formatter = FuncFormatter(lambda v, _: num(v) if v else "0")
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(formatter)


def _log_conns(ax) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


# -- memory ---------------------------------------------------------------------------------------

def draw_memory_rss(points: pd.DataFrame, finding):
    fig, axes = style.figure()
    ax = axes[0][0]
    fitted = "rss_fit_kib" in points and points.rss_fit_kib.notna().any()
    for variant, rows in points.groupby("variant", sort=False):
        rows = rows.sort_values("n_conns")
        if fitted:             # the measured points, and the least-squares line: how far each point is off it
            ax.plot(rows.n_conns, rows.rss_kib / 1024, MARKER, color=style.color(variant), markersize=8,
                    label=f"{variant} RSS ({_fit_label(rows)})")
            ax.plot(rows.n_conns, rows.rss_fit_kib / 1024, "-", color=style.color(variant), lw=1.5)
        else:
            ax.plot(rows.n_conns, rows.rss_kib / 1024, MARKER + "-", color=style.color(variant), lw=LINE_WIDTH,
                    label=f"{variant} RSS")
        if rows.uss_kib.notna().any():
            ax.plot(rows.n_conns, rows.uss_kib / 1024, "--", color=style.color(variant), lw=1.5, alpha=0.8)
    if fitted:
        ax.plot([], [], "-", color=style.NEUTRAL, lw=1.5, label="least-squares line (solid)")
    ax.plot([], [], "--", color=style.NEUTRAL, label="USS (dashed)")
    ax.set_xlabel("idle connections held")
    ax.set_ylabel("server memory (MiB)")
    _thousands(ax, "x")
    _legend(ax, ncols=2, loc="upper left")
    style.title(fig, finding.title)
    return fig


def _fit_label(rows: pd.DataFrame) -> str:
    """r² of a variant's RSS line, or why there is none."""
    r2 = rows.rss_r2.dropna() if "rss_r2" in rows else rows.iloc[0:0]
    return f"r² {r2.iloc[0]:.4f}" if not r2.empty else f"{rows.n_conns.notna().sum()} points: no r²"


KERNEL_ALPHA = {"kernel_sock_kib": 0.9, "kernel_stack_kib": 0.65, "kernel_slab_kib": 0.4, "kernel_pte_kib": 0.2}


def draw_memory_kernel(split: pd.DataFrame, finding):
    """Per variant a stacked bar, KiB per idle connection: process RSS (the variant's colour), then the kernel's
    parts (grey shades, derive.MEMORY_PARTS); the total at its end. A part below 0 (noise) is drawn as 0; a
    variant without a kernel line is left out (its finding says why)."""
    split = split.dropna(subset=["kernel_kib"]).reset_index(drop=True)
    fig, axes = style.figure()
    ax = axes[0][0]
    y = np.arange(len(split))
    left = np.zeros(len(split))
    for column, label in derive.MEMORY_PARTS.items():
        values = split[column].astype(float).fillna(0).clip(lower=0).to_numpy()
        if column in KERNEL_ALPHA:
            ax.barh(y, values, left=left, color=style.NEUTRAL, alpha=KERNEL_ALPHA[column], edgecolor="white",
                    label=label)
        else:
            ax.barh(y, values, left=left, color=[style.color(v) for v in split.variant], edgecolor="white",
                    label=f"{label} (the backend's colour)")
        left += values
    for yi, end, total in zip(y, left, split.total_kib):
        ax.annotate(f" {num(total)} KiB", (end, yi), va="center", fontsize=12)
    ax.set_yticks(y, split.variant)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left.max(), 1) * HEADROOM * 1.1)
    ax.set_xlabel("memory per idle connection (KiB/conn): process RSS + kernel")
    _legend(ax, loc="lower right")
    style.title(fig, finding.title)
    return fig


def draw_memory_per_conn(slopes: pd.DataFrame, finding):
    fig, axes = style.figure()
    ax = axes[0][0]
    x = np.arange(len(slopes))
    colors = [style.color(v) for v in slopes.variant]
    ax.bar(x - 0.2, slopes.rss_kib, 0.4, color=colors, label="RSS slope")
    if "uss_kib" in slopes:
        ax.bar(x + 0.2, slopes.uss_kib, 0.4, color=colors, alpha=0.45, hatch="//", label="USS slope")
    for xi, value in zip(x, slopes.rss_kib):
        if pd.notna(value):
            ax.annotate(num(value), (xi - 0.2, value), ha="center", va="bottom", fontsize=12)
    ax.axhline(0, color=style.NEUTRAL, lw=0.8)
    ax.set_xticks(x, slopes.variant, rotation=20, ha="right")
    ax.set_ylabel("memory per idle connection (KiB/conn)")
    _legend(ax)
    style.title(fig, finding.title)
    return fig


def draw_thread_vms(points: pd.DataFrame, slopes: pd.DataFrame, finding):
    """Left: the thread-per-connection server's VMS and RSS as it holds more connections (linear, GiB).
    Right: per-connection cost on a log scale, with the article's 1 MB and 2 KB figures drawn as lines."""
    fig, axes = style.figure(ncols=2)
    left, right = axes[0]
    rows = points[points.variant == derive.THREAD_VARIANT].sort_values("n_conns")
    color = style.color(derive.THREAD_VARIANT)
    left.plot(rows.n_conns, rows.vms_kib / 1024 ** 2, "s-", color=color, lw=LINE_WIDTH, label="VMS (reserved)")
    left.plot(rows.n_conns, rows.rss_kib / 1024 ** 2, "o-", color=color, lw=LINE_WIDTH, alpha=0.5,
              label="RSS (in RAM)")
    left.set_xlabel(f"idle connections ({derive.THREAD_VARIANT}: one OS thread each)")
    left.set_ylabel("server memory (GiB)")
    _thousands(left, "x")
    _legend(left, loc="upper left")
    bars = _per_conn_bars(slopes)
    y = np.arange(len(bars))
    right.barh(y, bars.kib, color=[style.color(v) for v in bars.variant],
               hatch=["//" if m == "vms_kib" else "" for m in bars.metric], edgecolor="white")
    right.set_yticks(y, bars.label)
    for yi, value in zip(y, bars.kib):
        right.annotate(f" {num(value)}", (value, yi), va="center", fontsize=12)
    right.set_xscale("log")
    right.xaxis.set_major_formatter(FuncFormatter(lambda v, _: num(v)))
    for kib, text in ((1024, "claim: thread 1 MB"), (2, "claim: goroutine 2 KB")):
        right.axvline(kib, color="black", ls="--", lw=1.5)
        right.annotate(text, (kib, len(bars) - 0.5), rotation=90, ha="right", va="top", fontsize=11,
                       bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    right.set_xlabel("KiB per connection (log scale)")
    style.title(fig, finding.title)
    return fig


def _per_conn_bars(slopes: pd.DataFrame) -> pd.DataFrame:
    """Rows for the per-connection bars: threads' VMS and RSS slopes, go's RSS slope (what the claim compares)."""
    rows = []
    for variant, metric, what in ((derive.THREAD_VARIANT, "vms_kib", "VMS"), (derive.THREAD_VARIANT, "rss_kib", "RSS"),
                                  ("go", "rss_kib", "RSS")):
        match = slopes[slopes.variant == variant]
        if not match.empty and metric in match and pd.notna(match.iloc[0][metric]) and match.iloc[0][metric] > 0:
            rows.append({"variant": variant, "metric": metric, "kib": match.iloc[0][metric],
                         "label": f"{variant} {what}"})
    return pd.DataFrame(rows, columns=["variant", "metric", "kib", "label"])


# -- latency --------------------------------------------------------------------------------------

def _percentile_x(p):
    """HDR-style x: 1 / (1 - p), so 90% -> 10, 99% -> 100, 99.9% -> 1000."""
    return 1.0 / (1.0 - np.asarray(p, dtype=float) / 100.0)


def draw_spectrum(points: pd.DataFrame, finding, source: str):
    """source: where it was measured, in words (for the x label)."""
    fig, axes = style.figure()
    ax = axes[0][0]
    for variant, rows in points.groupby("variant", sort=False):
        rows = rows.sort_values("percentile")
        ax.plot(_percentile_x(rows.percentile), rows.latency_us / 1000, MARKER + "-", color=style.color(variant),
                lw=LINE_WIDTH, label=variant)
    top = points.percentile.max() if not points.empty else 99.99
    ticks = [p for p in SPECTRUM_TICKS if p <= max(top, 99.99)]
    ax.set_xscale("log")
    ax.set_xticks(_percentile_x(ticks), [f"{p:g}%" for p in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: num(v)))
    ax.set_xlabel(f"percentile (HDR scale: 1/(1−p)); last point = max\n{source}")
    ax.set_ylabel("latency (ms, log scale)")
    _legend(ax, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    style.title(fig, finding.title)
    return fig


def draw_latency_load(lat: pd.DataFrame, knees: pd.DataFrame, finding):
    """Small multiples, one panel per variant: p50/p99/p99.9 against the offered rate, the knee marked."""
    variants = list(dict.fromkeys(lat.variant))
    ncols = min(SMALL_MULTIPLE_COLS, max(1, len(variants)))
    nrows = math.ceil(len(variants) / ncols)
    fig, axes = style.figure(ncols=ncols, nrows=nrows, sharey=True)
    fig.set_size_inches(style.FIGSIZE_WIDE[0], PANEL_HEIGHT * nrows + TITLE_HEIGHT)
    for ax in axes.flat[len(variants):]:
        ax.set_visible(False)
    by_variant = knees.set_index("variant")
    for ax, variant in zip(axes.flat, variants):
        _latency_panel(ax, lat[lat.variant == variant].sort_values("offered_rps"), variant,
                       by_variant.knee.get(variant), by_variant["where"].get(variant))
    for row in axes:
        row[0].set_ylabel("latency (ms, log)")
    _spread_legend(axes.flat[0], any(f"{c}_min" in lat and (lat[f"{c}_max"] > lat[f"{c}_min"]).any()
                                     for c in style.PERCENTILE_STYLES))
    _invalid_legend(axes.flat[0], lat)
    axes.flat[0].legend(frameon=False, fontsize=11, handlelength=3.5)
    style.title(fig, finding.title)
    return fig


def _latency_panel(ax, rows: pd.DataFrame, variant: str, knee, where) -> None:
    for column, dash in style.PERCENTILE_STYLES.items():
        _points(ax, rows.offered_rps, rows[column] / 1000, rows, style.color(variant), dash, markersize=4,
                label=column.replace("_us", ""))
        _whiskers(ax, rows.offered_rps, rows, column, style.color(variant), 1 / 1000, elinewidth=1.2, capsize=3)
    if where == "below":
        ax.text(0.5, 0.5, f"served < {num(derive.KEEPUP * 100)}% of\nthe offered rate", transform=ax.transAxes,
                ha="center", va="center", fontsize=13, color=style.NEUTRAL)
    elif where == summary.NO_VALID:
        ax.text(0.5, 0.5, "no valid point\n(hollow: left out)", transform=ax.transAxes,
                ha="center", va="center", fontsize=13, color=style.NEUTRAL)
    if knee is not None and pd.notna(knee):
        ax.axvline(knee, color=style.NEUTRAL, lw=1.5, ls="-.")
        ax.annotate(f"knee {num(knee)} ", (knee, 0.02), xycoords=("data", "axes fraction"),
                    ha="right", va="bottom", fontsize=11, color=style.NEUTRAL, rotation=90)
    ax.set_title(variant, color=style.color(variant), fontweight="bold")
    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(NullLocator())          # eight log axes' minor ticks cost seconds to draw
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: num(v)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
    ax.set_xlabel("offered load (rps)")


# -- throughput -----------------------------------------------------------------------------------

def draw_throughput(t: pd.DataFrame, finding, reference: int):
    fig, axes = style.figure()
    ax = axes[0][0]
    spread = False
    for variant, rows in t.groupby("variant", sort=False):
        rows = rows.sort_values("conns")
        _points(ax, rows.conns, rows.throughput_rps, rows, style.color(variant), label=variant)
        spread |= _whiskers(ax, rows.conns, rows, "throughput_rps", style.color(variant))
        sat = rows[rows.saturated > 0]
        ax.scatter(sat.conns, sat.throughput_rps, s=180, facecolors="none", edgecolors="black", zorder=5)
    if (t.saturated > 0).any():
        ax.scatter([], [], s=180, facecolors="none", edgecolors="black", label="load generator saturated")
    _spread_legend(ax, spread)
    _invalid_legend(ax, t)
    ax.axvline(reference, color=style.NEUTRAL, ls=":", lw=1.2)
    _log_conns(ax)
    _thousands(ax)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent connections (closed loop, 64 B ECHO; log scale)")
    ax.set_ylabel("throughput (requests/s)")
    _legend(ax, ncols=2, fontsize=11)
    style.title(fig, finding.title)
    return fig


def draw_io_bound(io: pd.DataFrame, finding):
    fig, axes = style.figure()
    ax = axes[0][0]
    spread = False
    for variant, rows in io.groupby("variant", sort=False):
        rows = rows.sort_values("conns")
        _points(ax, rows.conns, rows.throughput_rps, rows, style.color(variant), label=variant)
        spread |= _whiskers(ax, rows.conns, rows, "throughput_rps", style.color(variant))
    _spread_legend(ax, spread)
    _invalid_legend(ax, io)
    ceiling = io.groupby("conns")["conc_ceiling_rps"].max().sort_index()
    ax.plot(ceiling.index, ceiling.values, "--", color=style.NEUTRAL, lw=1.5, label="connections / wait")
    pools = io[io.variant.str.startswith(derive.POOL_BACKEND) & io.workers.notna()]
    if not pools.empty:
        row = pools.iloc[0]
        little = row.workers / (row.io_us / 1e6)
        ax.axhline(little, color=style.color(derive.POOL_BACKEND), ls="-.", lw=2,
                   label=f"pool ceiling: {num(row.workers)} workers / {num(row.io_us / 1000)} ms = {num(little)} rps")
    _log_conns(ax)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: num(v)))
    ax.set_xlabel("concurrent connections (each request waits 10 ms; log scale)".replace(
        "10 ms", f"{num(io.io_us.dropna().iloc[0] / 1000)} ms" if io.io_us.notna().any() else "10 ms"))
    ax.set_ylabel("throughput (requests/s, log scale)")
    _legend(ax, fontsize=11, loc="upper left")
    style.title(fig, finding.title)
    return fig


def draw_cpu_bound(cpu: pd.DataFrame, finding):
    fig, axes = style.figure()
    ax = axes[0][0]
    labels = [f"{r.variant} ({num(r.n_server_cpus)} CPU{'s' if r.n_server_cpus > 1 else ''})"
              for r in cpu.itertuples()]
    x = np.arange(len(cpu))
    wide = cpu.n_server_cpus > cpu.n_server_cpus.min()
    ax.bar(x, cpu.throughput_rps, 0.7, color=[style.color(v) for v in cpu.variant],
           hatch=["//" if w else "" for w in wide], edgecolor="white")
    ax.hlines(cpu.ceiling_rps, x - 0.4, x + 0.4, colors="black", lw=2.5, label="ceiling (CPUs × 10⁶ / cpu_us)")
    _spread_legend(ax, _whiskers(ax, x, cpu, "throughput_rps", "black", elinewidth=1.4, capsize=6))
    ax.set_xticks(x, labels, rotation=30, ha="right")
    tallest = cpu["throughput_rps_max"].max() if "throughput_rps_max" in cpu else cpu.throughput_rps.max()
    ax.set_ylim(0, HEADROOM * max(cpu.ceiling_rps.max(), cpu.throughput_rps.max(),
                                  tallest if pd.notna(tallest) else 0))
    _thousands(ax)
    ax.set_ylabel("throughput (requests/s)")
    _legend(ax, loc="upper left")
    style.title(fig, finding.title)
    return fig


# -- switch ---------------------------------------------------------------------------------------

SWITCH_LABEL_WRAP = 46           # characters per line of a switch bar's label
SWITCH_GROUP_TITLES = {derive.KERNEL_GROUP: "kernel: OS threads and processes switched by the kernel",
                       derive.RUNTIME_GROUP: "runtime-level: switched in user space, no kernel switch"}
SWITCH_BAR_INCHES = 0.62         # figure height per bar (labels take two lines)


def _switch_note(row) -> str:
    """A bar's number: ns per switch, and the OS context switches it took each (where counted)."""
    text = f" {num(row.ns_per_switch)} ns"
    ctx = getattr(row, "ctx_per_switch", None)
    if ctx is not None and pd.notna(ctx):
        ctx = round(float(ctx), 2)
        text += f", {num(ctx)} kernel switch{'' if ctx == 1 else 'es'}"
    return text


def draw_switch(micro: pd.DataFrame, finding):
    """Time per switch, one bar per microbenchmark labelled with what it measures, kernel and runtime-level in
    two panels on one log scale; hatched bars did not run on one CPU."""
    groups = [g for g in (derive.KERNEL_GROUP, derive.RUNTIME_GROUP) if (micro.group == g).any()]
    sizes = [int((micro.group == g).sum()) for g in groups]
    fig, axes = style.figure(nrows=len(groups), wide=True, sharex=True, gridspec_kw={"height_ratios": sizes})
    fig.set_size_inches(style.FIGSIZE_WIDE[0], max(style.FIGSIZE_WIDE[1], 2.2 + SWITCH_BAR_INCHES * sum(sizes)))
    top, low = micro.ns_per_switch.max(), micro.ns_per_switch.min()
    left = 10 ** math.floor(math.log10(low * 0.8))
    right = top * (top / left) ** 0.3                  # room for the numbers right of the longest bar
    for ax, group in zip((row[0] for row in axes), groups):
        rows = micro[micro.group == group].sort_values("ns_per_switch", ascending=False)
        y = np.arange(len(rows))
        ax.barh(y, rows.ns_per_switch, color=[style.bench_color(b) for b in rows.bench],
                hatch=["" if p else "//" for p in rows.pinned], edgecolor="white")
        for yi, row in zip(y, rows.itertuples()):
            ax.annotate(_switch_note(row), (row.ns_per_switch, yi), va="center", fontsize=11)
        ax.set_yticks(y, [style.wrap(m, SWITCH_LABEL_WRAP) for m in rows.measures], fontsize=11)
        ax.invert_yaxis()
        ax.set_title(SWITCH_GROUP_TITLES[group], loc="left", fontsize=13)
        ax.set_xscale("log")
        ax.set_xlim(left, right)
    ax = axes[-1][0]
    ax.xaxis.set_major_locator(LogLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: num(v)))
    ax.set_xlabel("time per switch (ns, log scale; hatched = not on one CPU: across CPUs or unpinned)")
    style.title(fig, finding.title)
    return fig


def draw_per_request(pr: pd.DataFrame, finding):
    fig, axes = style.figure(ncols=2)
    colors = [style.color(v) for v in pr.variant]
    for ax, column, label in ((axes[0][0], "cpu_us_per_req", "server CPU per request (µs)"),
                              (axes[0][1], "ctx_per_req", "context switches per request")):
        ax.bar(pr.variant, pr[column], color=colors)
        if _whiskers(ax, np.arange(len(pr)), pr, column, "black", elinewidth=1.4, capsize=6):
            label += f"\n({SPREAD_NOTE})"
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
        for tick in ax.get_xticklabels():
            tick.set_ha("right")
    style.title(fig, finding.title)
    return fig


# -- c10k -----------------------------------------------------------------------------------------

def draw_c10k(c: pd.DataFrame, finding):
    fig, axes = style.figure(ncols=2)
    held, p99 = axes[0][0], axes[0][1]
    colors = [style.color(v) for v in c.variant]
    failed = c.connect_errors.fillna(0).clip(upper=c.held)
    held.bar(c.variant, c.held - failed, color=colors)
    held.bar(c.variant, failed, bottom=c.held - failed, color="white", edgecolor=colors, hatch="//")
    held.bar([0], [0], color=style.NEUTRAL, label="held")                       # legend entries in grey
    held.bar([0], [0], color="white", edgecolor=style.NEUTRAL, hatch="//", label="accepted, then failed")
    held.axhline(c.hold_target.max(), color="black", ls="--", lw=1.5, label=f"target {num(c.hold_target.max())}")
    held.set_ylabel("idle connections held")
    held.set_ylim(0, HEADROOM * c.hold_target.max())
    _thousands(held)
    _legend(held, loc="upper right", ncols=3, fontsize=11)
    latency = (c.p99_us / 1000).where(c.requests > 0)
    p99.bar(c.variant, latency, color=colors)
    _value_axis(p99, latency)
    for i, row in enumerate(c.itertuples()):
        if not row.requests:
            p99.annotate("starved:\nno answer", (i, 0), xytext=(0, 4), textcoords="offset points", ha="center",
                         va="bottom", fontsize=12, xycoords=("data", "axes fraction"))
    p99.set_ylabel("probe p99 while holding (ms)")
    for ax in (held, p99):
        ax.tick_params(axis="x", rotation=30)
        for tick in ax.get_xticklabels():
            tick.set_ha("right")
    style.title(fig, finding.title)
    return fig


def _value_axis(ax, values: pd.Series) -> None:
    """Log scale when the values span more than LOG_RANGE, else linear from 0; readable labels either way."""
    positive = values[values > 0]
    if len(positive) and positive.max() / positive.min() > LOG_RANGE:
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: num(v)))


# -- pitfalls -------------------------------------------------------------------------------------

def draw_pitfalls(series: pd.DataFrame, finding):
    """One panel per pitfall (the registry's, in the article's order): its series over time, a line per
    variant, solid broken (--fault), dashed fixed."""
    fig, axes = style.figure(ncols=2, nrows=2)
    for ax, pitfall in zip(axes.flat, registry.pitfalls()):
        rows = series[series.pitfall == pitfall.name]
        for (variant, fixed), line in rows.groupby(["variant", "fixed"], sort=False):
            line = line.dropna(subset=[pitfall.series]).sort_values("t_s")
            ax.plot(line.t_s, line[pitfall.series] * pitfall.scale, "--" if fixed else "-",
                    color=style.color(variant), lw=LINE_WIDTH if not fixed else 1.8,
                    label=variant if not fixed else None)
        ax.set_title(f"{pitfall.name}: {pitfall.label}", fontsize=13)
        ax.set_xlabel("time since the clients started (s)")
        ax.set_ylabel(pitfall.axis)
        ax.set_ylim(bottom=0)
    ax = axes.flat[0]
    ax.plot([], [], "-", color=style.NEUTRAL, label="broken (--fault)")
    ax.plot([], [], "--", color=style.NEUTRAL, label="fixed")
    _legend(ax, loc="upper left", fontsize=10, ncols=2)
    style.title(fig, finding.title)
    return fig


# -- the trade-offs: pool sizing, message sizes, M:N ------------------------------------------------

POOL_PANELS = (("io", "throughput_rps", 1.0, "I/O-bound (each request waits 10 ms)", "requests/s (log scale)"),
               ("echo", "throughput_rps", 1.0, "ECHO (64 B, no wait)", "requests/s"),
               ("io", "server_rss_kib", 1 / 1024, "I/O-bound: server memory", "RSS (MiB)"),
               ("io", "ctx_per_req", 1.0, "I/O-bound: context switches", "switches per request"))


def draw_pool_sizing(p: pd.DataFrame, finding):
    """Four panels against the pool size (log): I/O-bound throughput with each size's Little's-law bound, ECHO
    throughput, RSS and switches per request; the models beside the pool as horizontal lines; head-of-line
    points hollow (invalid: not every connection served)."""
    fig, axes = style.figure(ncols=2, nrows=2)
    pools, beside = p[p.workers.notna()], p[p.workers.isna()]
    for ax, (load, column, scale, panel, label) in zip(axes.flat, POOL_PANELS):
        rows_of_load = pools[pools.load == load]
        spread = False
        for variant, rows in rows_of_load.groupby("variant", sort=False):
            rows = rows.sort_values("workers")
            _points(ax, rows.workers, rows[column] * scale, rows, style.color(variant), label=variant)
            spread |= _whiskers(ax, rows.workers, rows, column, style.color(variant), scale)
        if column == "throughput_rps" and load == "io" and not rows_of_load.empty:
            bound = rows_of_load.groupby("workers")["little_bound_rps"].max().sort_index()
            ax.plot(bound.index, bound.values, "--", color=style.NEUTRAL, lw=1.5,
                    label="Little's law: min(workers, conns) / wait")
        for variant, rows in beside[beside.load == load].groupby("variant", sort=False):
            value = rows[column].iloc[0] * scale
            if pd.notna(value):
                ax.axhline(value, color=style.color(variant), ls=":", lw=2, label=f"{variant} (no pool)")
        _spread_legend(ax, spread)
        _invalid_legend(ax, rows_of_load)
        _log_conns(ax)
        if column == "throughput_rps" and load == "io":
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: num(v)))
        ax.set_title(panel, fontsize=13)
        ax.set_xlabel("pool workers (log scale)")
        ax.set_ylabel(label)
    _legend(axes[0][0], fontsize=9, loc="upper left")
    _legend(axes[0][1], fontsize=9, loc="upper right")
    style.title(fig, finding.title)
    return fig


def draw_message_sizes(m: pd.DataFrame, finding):
    """Two panels against the payload (log): requests/s and payload MB/s, a line per variant with its spread."""
    fig, axes = style.figure(ncols=2)
    for ax, column, label in ((axes[0][0], "throughput_rps", "throughput (requests/s, log scale)"),
                              (axes[0][1], "mb_per_s", "payload MB/s each way (log scale)")):
        spread = False
        for variant, rows in m.groupby("variant", sort=False):
            rows = rows.sort_values("size")
            _points(ax, rows["size"], rows[column], rows, style.color(variant), label=variant)
            spread |= _whiskers(ax, rows["size"], rows, column, style.color(variant))
        _spread_legend(ax, spread)
        _invalid_legend(ax, m)
        ax.set_xscale("log")
        ax.set_yscale("log")
        sizes = sorted(m["size"].dropna().unique())
        ax.set_xticks(sizes, [_bytes(v) for v in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: num(v)))
        ax.set_xlabel("ECHO payload (closed loop; log scale)")
        ax.set_ylabel(label)
    _legend(axes[0][0], fontsize=10, ncols=2)
    style.title(fig, finding.title)
    return fig


def _bytes(value: float) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{num(value / size)} {unit}"
    return f"{num(value)} B"


def draw_m_to_n(m: pd.DataFrame, finding):
    """Per variant two bars, log scale: logical units (one per connection by design) and OS threads."""
    fig, axes = style.figure()
    ax = axes[0][0]
    x = np.arange(len(m))
    colors = [style.color(v) for v in m.variant]
    ax.bar(x - 0.2, m.logical_units, 0.4, color=colors, label="logical units (one per connection: "
                                                             "goroutine, greenlet, Protocol, thread...)")
    ax.bar(x + 0.2, m.os_threads, 0.4, color="white", edgecolor=colors, hatch="//", label="OS threads (/proc)")
    labels = [f"{row.variant} ({num(row.units_per_thread)} per thread)" if pd.notna(row.units_per_thread)
              and row.logical_units else row.variant for row in m.itertuples()]
    ax.set_xticks(x, labels, fontsize=11, rotation=25, ha="right")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: num(v)))
    ax.set_ylabel("count while holding (log scale)")
    _legend(ax, loc="lower left", fontsize=10, framealpha=0.9)
    style.title(fig, finding.title)
    return fig


SOAK_PANELS = (("rss_kib", "RSS (MiB)", 1 / 1024), ("fds", "open fds", 1), ("p99_us", "p99 per second (ms)", 1e-3))


def draw_soak(series: pd.DataFrame, finding):
    """The soak's time series, one panel per gauge (RSS, fds, p99), one line per variant; a second where the
    load generator saturated is a hollow marker (its p99 is the generator's as much as the server's)."""
    fig, axes = style.figure(ncols=len(SOAK_PANELS), wide=True)
    for ax, (column, label, scale) in zip(axes[0], SOAK_PANELS):
        for variant in style.order(series.variant.unique()):
            rows = series[series.variant == variant].sort_values("t_s")
            y = rows[column].astype(float) * scale
            ax.plot(rows.t_s, y, "-", color=style.color(variant), lw=LINE_WIDTH, label=variant)
            saturated = rows.loadgen_saturated.astype(str) == "True"
            if saturated.any():
                ax.plot(rows.t_s[saturated], y[saturated], MARKER, color=style.color(variant), markerfacecolor="none",
                        markeredgewidth=2, linestyle="none")
        if column == "p99_us":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: num(v)))
        ax.set_xlabel("seconds into the soak")
        ax.set_ylabel(label)
    if series.loadgen_saturated.astype(str).eq("True").any():
        axes[0][0].plot([], [], MARKER, color=style.NEUTRAL, markerfacecolor="none", markeredgewidth=2,
                        linestyle="none", label="load generator saturated")
    _legend(axes[0][0], fontsize=10)
    style.title(fig, finding.title)
    return fig


# -- the GIL: convoy and cores (frames: analysis.gil) --------------------------------------------------

def draw_convoy(c: pd.DataFrame, finding):
    """Per case, two panels (log): ECHO p99 with / without the CPU work (paired per round, whiskers min–max), and
    the two p99s; invalid cases hollow."""
    fig, axes = style.figure(ncols=2, wide=True)
    y = np.arange(len(c))[::-1]
    colors = [style.color(v) for v in c.variant]
    ok = c["valid"].astype(bool).to_numpy()
    ratio, both = axes[0][0], axes[0][1]
    values = c.ratio_p99.astype(float).fillna(0).to_numpy()
    ratio.barh(y[ok], values[ok], color=[col for col, good in zip(colors, ok) if good])
    lo = (c.ratio_p99 - c.ratio_p99_min).clip(lower=0).fillna(0).to_numpy()
    hi = (c.ratio_p99_max - c.ratio_p99).clip(lower=0).fillna(0).to_numpy()
    ratio.errorbar(values[ok], y[ok], xerr=[lo[ok], hi[ok]], fmt="none", ecolor=style.NEUTRAL, capsize=3)
    ratio.axvline(1, color=style.NEUTRAL, ls="--", lw=1.2, label="1×: no convoy")
    ratio.set_yticks(y, [f"{case}{'' if good else ' (invalid)'}" for case, good in zip(c.case, ok)], fontsize=10)
    ratio.set_xscale("log")
    ratio.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{num(v)}×"))
    ratio.xaxis.set_minor_formatter(NullFormatter())
    ratio.set_xlabel("ECHO p99 with CPU work / without (log; whiskers: min–max over rounds)")
    _legend(ratio, fontsize=9, loc="lower right")
    for offset, column, label, hatch in ((0.2, "p99_us_base", "without CPU work", ""),
                                         (-0.2, "p99_us_with", "with CPU work", "//")):
        both.barh(y + offset, c[column].astype(float).fillna(0) * 1e-3, 0.4, color="white" if hatch else colors,
                  edgecolor=colors, hatch=hatch, label=label)
    both.set_yticks(y, c.case, fontsize=10)
    both.set_xscale("log")
    both.xaxis.set_major_formatter(FuncFormatter(lambda v, _: num(v)))
    both.xaxis.set_minor_formatter(NullFormatter())
    both.set_xlabel("ECHO p99 (ms, log; median over rounds)")
    _legend(both, fontsize=9, loc="lower right")
    style.title(fig, finding.title)
    return fig


CORES_HEADROOM = 1.4             # y axis top = this x the tallest whisker: the legend sits above the bars
CORES_SETTINGS = ((1, 1, "1 CPU, 1 process", ""), (1, 2, "1 CPU, 2 processes", ".."),
                  (2, 1, "2 CPUs, 1 process", "//"), (2, 2, "2 CPUs, 2 processes / GOMAXPROCS 2", "xx"))


def draw_cores(c: pd.DataFrame, finding):
    """Two panels (ECHO, CPU-bound): per variant a bar per setting (CPUs x processes or GOMAXPROCS), whiskers
    min–max over rounds, invalid bars hollow."""
    fig, axes = style.figure(ncols=2, wide=True)
    variants = list(dict.fromkeys(c.variant))
    x = np.arange(len(variants))
    width = 0.8 / len(CORES_SETTINGS)
    for ax, (load, label) in zip(axes[0], (("echo", "ECHO (closed loop)"), ("cpu", "CPU-bound WORK (closed loop)"))):
        rows = c[c.load == load]
        for i, (cpus, par, name, hatch) in enumerate(CORES_SETTINGS):
            cell = rows[(rows.n_server_cpus == cpus) & (rows.par == par)].set_index("variant").reindex(variants)
            pos = x + (i - (len(CORES_SETTINGS) - 1) / 2) * width
            valid = cell["valid"].eq(True).to_numpy()
            ax.bar(pos, cell.throughput_rps.fillna(0), width, color=[style.color(v) if ok else "white"
                                                                     for v, ok in zip(variants, valid)],
                   edgecolor=[style.color(v) for v in variants], hatch=hatch, alpha=0.55 + 0.15 * i, label=name)
            err = cell[["throughput_rps", "throughput_rps_min", "throughput_rps_max"]].astype(float)
            ax.errorbar(pos, err.throughput_rps, yerr=[(err.throughput_rps - err.throughput_rps_min).clip(lower=0),
                                                       (err.throughput_rps_max - err.throughput_rps).clip(lower=0)],
                        fmt="none", ecolor=style.NEUTRAL, capsize=2)
        ax.set_xticks(x, variants, rotation=25, ha="right")
        _thousands(ax)
        tallest = rows[["throughput_rps", "throughput_rps_max"]].max().max() if not rows.empty else None
        if pd.notna(tallest) and tallest:
            ax.set_ylim(0, tallest * CORES_HEADROOM)                 # room above the bars for the legend
        ax.set_ylabel("throughput (requests/s)")
        ax.set_title(label, fontsize=13)
    _legend(axes[0][0], fontsize=9, loc="upper center", ncols=2)
    style.title(fig, finding.title)
    return fig
