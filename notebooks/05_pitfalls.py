# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. Pitfalls: what breaks when a safeguard is missing
#
# The article's risk table (its first chapter) lists the mistakes that make a TCP server fall over in
# production; its last chapter adds two more: no graceful shutdown, and no monitoring of connection
# states. Every backend of this lab has each safeguard, and a teaching switch, `--fault`, that turns
# one off so you can watch the failure (`tests/test_faults.py` checks, on every backend, that each
# switch produces its failure and that the fixed server does not).

# %%
from pathlib import Path

import numpy as np
import pandas as pd

import common
from conclab.analysis import derive, findings, style
from conclab.analysis.fmt import num

run = common.load()
common.describe(run)

RISKS = pd.DataFrame([
    ("未关闭conn: connection never closed", "文件描述符泄漏: file descriptor leak", "defer conn.Close()",
     "--fault leak", "the client hangs up, the server never closes: +1 CLOSE_WAIT socket and +1 fd per client",
     "fds, CLOSE_WAIT"),
    ("无读超时机制: no read deadline", "恶意客户端占连接: idle or malicious clients hold connections",
     "conn.SetReadDeadline()", "--fault no-deadline",
     "a silent client keeps its connection (and its thread, in a pool) long after --idle-timeout",
     "connections held, clients starved"),
    ("不限并发数: no concurrency cap", "内存/CPU过载: memory / CPU overload",
     "使用带缓冲的channel做限流: a buffered channel as a limiter", "--fault unbounded",
     "--max-conns is ignored: every client is accepted, each costs memory (and a thread, in threads)",
     "RSS, threads"),
    ("优雅关闭: no graceful shutdown", "lost requests", "sync.WaitGroup: wait for the handlers, then exit",
     "--fault hard-kill", "SIGTERM kills at once: a request being processed never gets its reply", "replies lost"),
    ("连接状态监控: no monitoring", "CLOSE_WAIT piles up unseen", "export fds and CLOSE_WAIT, alert on growth",
     "--metrics-port", "/metrics serves conclab_open_fds and conclab_close_wait_connections in every backend",
     "CLOSE_WAIT over time"),
], columns=["risk (article)", "consequence", "fix (article)", "lab switch", "what you see", "watch"])
common.table(RISKS)

# %% [markdown]
# ## Predict, then run
#
# The first row of the table: a server that never closes a connection. Scripted clients connect one
# after another, each sends a PING, reads the answer and hangs up. The broken server (`--fault leak`)
# never calls close(); the fixed one does.
#
# **Question:** with the settings printed below, how many of its sockets will the `asyncio` server have
# in CLOSE_WAIT when the clients are done, broken and fixed? Write them into the next cell, for example
# `{"asyncio broken": 10, "asyncio fixed": 0}`.

# %%
settings = common.exercise_settings()
common.note(f"Profile `{settings.name}`: new clients at {num(settings.pitfall_rate)} per second for "
            f"{num(settings.pitfall_s)} s.")
prediction = None          # {"asyncio broken": sockets, "asyncio fixed": sockets}

# %% [markdown]
# The next cell runs `conclab run pitfalls --backends asyncio --profile quick --repeat 1` in a
# subprocess (results in a temporary directory): every pitfall of the table, broken and fixed; we look
# at the leak. One round, so its spread is a single value. It took 43 s here (2 cores, shared and busy
# at the time).

# %%
exercise = common.run_exercise("pitfalls", "asyncio", repeat=1, run_id="pitfalls")

# %% tags=["answer"] jupyter={"source_hidden": true}
ran = common.result_of(exercise, "pitfalls")
if ran is not None:
    leak = ran.tables["pitfalls_summary"]
    leak = leak[leak.pitfall == "leak"]
    leak = leak.assign(case=[f"{r.variant} {'fixed' if r.fixed else 'broken'}" for r in leak.itertuples()])
    common.note(f"{num(leak.clients.max())} clients came and went.")
    common.check(prediction, common.measured(leak, "close_wait_end", key="case"), "sockets")

# %% [markdown]
# ## Broken vs fixed, measured
#
# The `pitfalls` experiment runs each switch against the same server without it and samples the
# server over time (`pitfalls.csv`: fds, CLOSE_WAIT, RSS, threads, requests served, clients
# starved, replies lost). Solid lines are the broken server, dashed lines the fixed one.

# %%
PITFALL_COLUMNS = ["run_id", "backend", "variant", "pitfall", "fixed", "t_s", "fds", "close_wait", "rss_kib",
                   "threads", "served", "starved", "replies_lost"]
METRICS = ["fds", "close_wait", "rss_kib", "threads", "served", "starved", "replies_lost"]
KEY_METRICS = {                     # what each pitfall shows first (the article's "consequence")
    "leak": ["close_wait", "fds"],
    "no-deadline": ["fds", "starved"],
    "unbounded": ["fds", "rss_kib"],
    "hard-kill": ["replies_lost", "served"],
    "no-monitoring": ["close_wait", "fds"],
}
KEYWORDS = {"leak": "leak", "close": "leak", "deadline": "no-deadline", "idle": "no-deadline",
            "unbounded": "unbounded", "cap": "unbounded", "limit": "unbounded", "kill": "hard-kill",
            "shutdown": "hard-kill", "drain": "hard-kill", "monitor": "no-monitoring"}


def canonical(pitfall: str) -> str:
    """The lab's name for a pitfall label (a --fault name or a description of it)."""
    text = str(pitfall).lower()
    return next((name for word, name in KEYWORDS.items() if word in text), text)


def load_pitfalls(run):
    """(frame, where it came from), or (None, why not). The loader first; the CSV itself only while the
    loader does not list the table yet."""
    absent = f"run {run.id} has no pitfalls.csv (measure it with `conclab run pitfalls`)"
    frame = run.tables.get("pitfalls")
    source = "pitfalls.csv"
    if frame is None:
        path = Path(run.path) / "pitfalls.csv"
        if not path.exists():
            return None, absent
        frame = pd.read_csv(path, dtype={"run_id": str, "backend": str, "variant": str, "pitfall": str})
        source = "pitfalls.csv (read directly: this analysis.results does not list the table yet)"
    if frame.empty:
        return None, absent
    frame = frame.reindex(columns=list(dict.fromkeys([*PITFALL_COLUMNS, *frame.columns])))
    frame["fixed"] = frame["fixed"].astype(str).str.strip().str.lower().isin(["1", "1.0", "true", "yes"])
    frame["pitfall"] = frame["pitfall"].map(canonical)
    for column in METRICS + ["t_s"]:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return derive.sort_variants(frame), source


def key_metrics(pitfall: str, rows: pd.DataFrame) -> list:
    """The pitfall's own metrics that were measured; else the two that differ most between broken and fixed."""
    preferred = [m for m in KEY_METRICS.get(pitfall, []) if rows[m].notna().any()]
    if preferred:
        return preferred
    last = rows.sort_values("t_s").groupby("fixed")[METRICS].last()
    if len(last) < 2:
        return [m for m in METRICS if rows[m].notna().any()][:2]
    gap = ((last.loc[False] - last.loc[True]).abs() / last.abs().max().replace(0, np.nan)).dropna()
    return gap.sort_values(ascending=False).index[:2].tolist()


pitfalls, pitfall_source = load_pitfalls(run)
if pitfalls is None:
    common.note(
        f"**No pitfalls measurements in this run**: {pitfall_source}. The table above still holds: each "
        "switch's failure is checked by `tests/test_faults.py` on every backend. Below, the committed samples "
        "show the columns to watch (fds and CLOSE_WAIT) as they were measured in the other experiments.")
else:
    common.note(f"Source: {pitfall_source}.")
    summary = run.tables.get("pitfalls_summary")
    if hasattr(findings, "pitfalls") and summary is not None and not summary.empty:
        common.finding(findings.pitfalls(summary))            # the report's sentence, from pitfalls_summary.csv
    names = list(dict.fromkeys(pitfalls.pitfall))
    chosen = {p: key_metrics(p, pitfalls[pitfalls.pitfall == p]) for p in names}
    ncols = max(len(m) for m in chosen.values())
    with style.context():
        fig, axes = style.figure(ncols=ncols, nrows=len(names))
        fig.set_size_inches(style.FIGSIZE_WIDE[0], 3.4 * len(names) + 1.2)
        for row, pitfall in zip(axes, names):
            rows = pitfalls[pitfalls.pitfall == pitfall]
            for ax, metric in zip(row, chosen[pitfall] + [None] * ncols):
                if metric is None:
                    ax.set_visible(False)
                    continue
                for (variant, fixed), series in rows.groupby(["variant", "fixed"], sort=False):
                    series = series.sort_values("t_s")
                    ax.plot(series.t_s, series[metric], "--" if fixed else "-", color=style.color(variant), lw=2,
                            label=f"{variant} {'fixed' if fixed else 'broken'}")
                ax.set_title(f"{pitfall}: {metric}", fontsize=13)
                ax.set_xlabel("time (s)")
        axes[0][0].legend(frameon=False, fontsize=10)
        style.title(fig, "Each pitfall, broken (solid) vs fixed (dashed)")
    common.show(fig)

# %% [markdown]
# ### Question 1
#
# For each pitfall: at the end of its run, how far apart are the broken and the fixed server on the
# metric that pitfall is about?

# %% tags=["answer"] jupyter={"source_hidden": true}
if pitfalls is None:
    common.answer(f"not measured: {pitfall_source}.")
else:
    ends = []
    for (pitfall, variant), group in pitfalls.groupby(["pitfall", "variant"], sort=False):
        last = group.sort_values("t_s").groupby("fixed")[METRICS].last()
        for metric in key_metrics(pitfall, pitfalls[pitfalls.pitfall == pitfall]):
            broken = last[metric].get(False, np.nan)
            fixed = last[metric].get(True, np.nan)
            ends.append({"pitfall": pitfall, "variant": variant, "metric": metric, "broken": broken, "fixed": fixed,
                         "gap": abs(broken - fixed) / max(abs(broken), abs(fixed), 1e-9)})
    ends = pd.DataFrame(ends, columns=["pitfall", "variant", "metric", "broken", "fixed", "gap"])
    widest = ends.dropna(subset=["gap"]).sort_values("gap", ascending=False).groupby(["pitfall", "variant"],
                                                                                     sort=False).head(1)
    common.answer(*(f"{r.pitfall} ({r.variant}): {r.metric} ended at {num(r.broken)} broken vs {num(r.fixed)} fixed."
                    for r in widest.sort_values(["pitfall", "variant"]).itertuples()))
    common.table(ends.drop(columns="gap"))

# %% [markdown]
# ## CLOSE_WAIT in the committed samples
#
# `CLOSE_WAIT` is the state of a socket whose **peer has closed** while this side **has not called
# close() yet**. A few for a moment is normal: the server is getting to them. A count that stays up
# means nobody will ever close them: leaked fds (the `leak` pitfall), or connections stuck behind
# busy workers. Without a gauge you do not see it until the server runs out of fds.
#
# Every experiment sampled the server every quarter second (`samples.csv`): open fds and its TCP
# sockets by state. Here is the c10k experiment (10,000 idle connections held, then the load
# generator leaves), one panel per backend: ESTABLISHED solid, CLOSE_WAIT dashed.

# %%
samples = run.tables["samples"]
source_experiment = next((e for e in ("c10k", "memory") if (samples.experiment == e).any()),
                         samples.experiment.dropna().iloc[0] if not samples.empty else None)
watch = samples[samples.experiment == source_experiment] if source_experiment else samples
if watch.empty:
    common.missing("samples (no server was sampled in this run)")
else:
    variants = derive.sort_variants(watch[["variant"]].drop_duplicates()).variant.tolist()
    ncols = min(4, len(variants))
    nrows = int(np.ceil(len(variants) / ncols))
    with style.context():
        fig, axes = style.figure(ncols=ncols, nrows=nrows, sharey=True)
        fig.set_size_inches(style.FIGSIZE_WIDE[0], 3.4 * nrows + 1.2)
        for ax in axes.flat[len(variants):]:
            ax.set_visible(False)
        for ax, variant in zip(axes.flat, variants):
            for _, series in watch[watch.variant == variant].groupby(["repeat", "pid"]):
                series = series.sort_values("t_s")
                ax.plot(series.t_s, series.tcp_established, "-", marker="o", markersize=3, color=style.color(variant),
                        lw=2)
                ax.plot(series.t_s, series.tcp_close_wait, "--", marker="o", markersize=3, color="black", lw=2)
            ax.set_title(variant, color=style.color(variant), fontweight="bold")
            ax.set_xlabel("time (s)")
        axes[0][0].plot([], [], "-", color=style.NEUTRAL, label="ESTABLISHED")
        axes[0][0].plot([], [], "--", color="black", label="CLOSE_WAIT")
        axes[0][0].legend(frameon=False, fontsize=11)
        for row in axes:
            row[0].set_ylabel("server sockets")
        style.title(fig, f"Server sockets by TCP state over time ({source_experiment} experiment)")
    common.show(fig)

# %% [markdown]
# ### Question 2
#
# Which backend kept sockets in CLOSE_WAIT the longest in this experiment, how many, and for how
# long? What does that tell you about what its threads were doing?

# %% tags=["answer"] jupyter={"source_hidden": true}
if watch.empty:
    common.answer("no samples in this run.")
else:
    rows = []
    for variant, group in watch.groupby("variant", sort=False):
        peak = group.tcp_close_wait.max()
        high = group[(group.tcp_close_wait > 0) & (group.tcp_close_wait >= peak / 2)]     # at least half its peak
        rows.append({"variant": variant, "peak_close_wait": peak, "samples_above_half_peak": len(high),
                     "above_half_peak_s": high.t_s.max() - high.t_s.min() if len(high) else 0.0,
                     "peak_fds": group.fds.max()})
    lingering = derive.sort_variants(pd.DataFrame(rows))
    worst = lingering.loc[lingering.above_half_peak_s.idxmax()]
    others = lingering[lingering.variant != worst.variant]
    lines = [f"{worst.variant}: CLOSE_WAIT rose to {num(worst.peak_close_wait)} sockets and stayed above half of "
             f"that for {num(worst.above_half_peak_s)} s ({num(worst.samples_above_half_peak)} samples)."]
    if len(others):
        peaks = list(dict.fromkeys(num(p) for p in (others.peak_close_wait.min(), others.peak_close_wait.max())))
        lines.append(f"The others stayed above half their peak for at most {num(others.above_half_peak_s.max())} s "
                     f"(peak{'s' if len(peaks) > 1 else ''} {'–'.join(peaks)}): a passing spike while they closed "
                     "their side after the clients left.")
    c10k = derive.c10k(run)
    row = c10k[c10k.variant == worst.variant] if source_experiment == "c10k" and not c10k.empty else c10k.iloc[0:0]
    if not row.empty and not row.iloc[0].requests:
        lines.append(f"{worst.variant} also answered no probe request while holding: its threads were all busy "
                     "with other connections, so no code ever read the EOF of the rest and called close(). "
                     "That is the head-of-line blocking of notebook 4, seen from the outside: only a CLOSE_WAIT "
                     "gauge (conclab_close_wait_connections) shows it.")
    elif worst.above_half_peak_s > 1:
        lines.append("A CLOSE_WAIT count that stays up means the server's code is not getting to those sockets.")
    common.answer(*lines)
    common.table(lingering)
