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
# # 2. Latency under load, and how a benchmark can lie about it
#
# There are two ways to load a server:
#
# * **Closed loop** (the `throughput` experiment): N connections; each sends a request, waits for the
#   reply, sends the next. It finds the most requests/s the server can do. But the load *adapts to
#   the server*: when the server stalls, the clients stall too and simply send nothing.
# * **Open loop** (the `latency` experiment): requests are *scheduled* at a fixed rate, like users who
#   arrive whether or not the server is keeping up. Request *k* is due at `start + k / rate`.
#
# **Coordinated omission.** If the server freezes for one second, a closed-loop client records *one*
# slow request; the thousands of requests real users would have sent during that second never
# exist, so the percentiles look fine. The open loop keeps its schedule and measures latency **from
# the scheduled send time**, so every request that should have gone out during the stall carries the
# wait it would really have had (what wrk2 does; see `docs/loadgen.md`).
#
# **Little's law** explains the closed loop: with N requests always in flight,
# `N = throughput × mean latency`, so `mean latency = N / throughput`. A closed loop cannot offer
# more than the server does; its latency is decided by N, not by how users would fare.

# %%
import numpy as np
import pandas as pd

import common
from conclab.analysis import charts, derive, findings, style
from conclab.analysis.fmt import num

run = common.load()
common.describe(run)
closed = derive.throughput(run)      # closed loop: median per (variant, conns)
opened = derive.latency(run)         # open loop: median per (variant, rate_fraction)
knees = derive.knees(run)
latency_conns = run.tables["latency"].conns.median() if run.has("latency") else None

# %% [markdown]
# ## Predict, then run
#
# The open loop offers each backend a fixed share of **its own** capacity, so a slow backend gets a
# light load and a fast one a heavy load. At half its capacity each should have room to spare.
#
# **Question:** offered half of its own capacity, what p99 latency (ms) will `asyncio` (one thread, an
# event loop) and `threads` (a thread per connection) show? Write your numbers into the next cell, for
# example `{"asyncio": 5, "threads": 5}`, or just the order, larger p99 first: `["threads", "asyncio"]`.

# %%
prediction = None          # {"asyncio": ms, "threads": ms}, or a list: larger p99 first

# %% [markdown]
# The next cell runs `conclab run latency --backends asyncio,threads --profile quick --repeat 2` in a
# subprocess (results in a temporary directory): each backend's capacity (a closed loop at 50
# connections), then the open loop at fractions of it, two interleaved rounds. It took 40 s here (2
# cores, shared and busy at the time).

# %%
exercise = common.run_exercise("latency", "asyncio,threads", repeat=2, run_id="latency")

# %% tags=["answer"] jupyter={"source_hidden": true}
ran = common.result_of(exercise, "latency")
if ran is not None:
    half = common.nearest_rate(derive.latency(ran), 0.5)
    common.note("p99 at the offered rate nearest half of capacity: " + ", ".join(
        f"{r.variant} {num(r.rate_fraction)}× ({num(r.offered_rps)} req/s offered)" for r in half.itertuples()) + ".")
    common.check(prediction, common.measured(half, "p99_us", scale=1e-3), "ms")

# %% [markdown]
# ## Closed loop: throughput as concurrency grows
#
# A circled point means the load generator itself was saturated (the number is a lower bound).

# %%
if closed.empty:
    common.missing("throughput (closed loop)")
else:
    reference = derive.reference_conns(run)
    f = findings.throughput(derive.at_reference(run), reference)
    common.chart(charts.draw_throughput, closed, f, reference)
    common.finding(f)

# %% [markdown]
# Little's law at work: for each closed-loop point, `connections / throughput` (the mean latency
# the law predicts) next to the measured median and p99.

# %%
if not closed.empty:
    little = closed.assign(little_ms=closed.conns / closed.throughput_rps * 1000, p50_ms=closed.p50_us / 1000,
                           p99_ms=closed.p99_us / 1000)
    little["law/median"] = little.little_ms / little.p50_ms
    common.table(little[["variant", "conns", "throughput_rps", "little_ms", "p50_ms", "p99_ms", "law/median"]])
    far = little.loc[little["law/median"].idxmax()]
    common.note(f"Largest gap: {far.variant} at {num(far.conns)} connections, where the law's mean "
                f"({num(far.little_ms)} ms) is {num(far['law/median'])}× the measured median ({num(far.p50_ms)} ms).")

# %% [markdown]
# Where the law's mean is far above the measured median, either a few requests are very slow (a long
# tail pulls the mean up: compare p99), or some connections were **never answered** and so are
# missing from the histogram altogether: a thread pool that gives each worker a whole connection
# serves only `workers` connections, the others just wait (notebook 4). Either way, the closed loop's
# percentiles alone would not have told you.

# %% [markdown]
# ## Open loop: latency against the offered rate
#
# Each backend was offered fixed fractions of its own closed-loop capacity (its throughput at
# 50 connections), spread over the same number of connections. One panel per backend: p50, p99 and
# p99.9 against the offered rate; the knee, where latency starts to climb, is marked when it is
# inside the range tested.

# %%
if opened.empty:
    common.missing("latency (open loop)")
else:
    f = findings.latency_load(opened, knees)
    common.chart(charts.draw_latency_load, opened, knees, f)
    common.finding(f)

# %% [markdown]
# The whole latency distribution at one load, on an HDR scale (each step right is ten times rarer):
# the tail is where queueing shows first.

# %%
spectrum_points, spectrum_rows, fraction = derive.spectrum(run)
if spectrum_points.empty:
    common.missing("latency (open loop)")
else:
    f = findings.spectrum(spectrum_points, spectrum_rows, fraction)
    common.chart(charts.draw_spectrum, spectrum_points, f, findings.SPECTRUM_SOURCE.format(fraction=num(fraction)))
    common.finding(f)

# %% [markdown]
# ## Same server, same connections: closed loop vs open loop
#
# For each backend: p99 reported by the closed loop at the open loop's number of connections, next
# to the open loop's p99 at each offered fraction of that capacity. Both used the same connections
# and the same 64-byte ECHO; only the way requests were sent differs.

# %%
def closed_vs_open(closed, opened, conns):
    """One row per (variant, loop): p50/p99 of the closed loop at `conns` and of the open loop per fraction."""
    rows = []
    at_conns = closed[closed.conns == conns] if conns is not None else closed.iloc[0:0]
    for r in at_conns.itertuples():
        rows.append({"variant": r.variant, "loop": "closed", "fraction": np.nan, "offered_rps": np.nan,
                     "served_rps": r.throughput_rps, "p50_us": r.p50_us, "p99_us": r.p99_us})
    for r in opened.itertuples():
        rows.append({"variant": r.variant, "loop": "open", "fraction": r.rate_fraction, "offered_rps": r.offered_rps,
                     "served_rps": r.throughput_rps, "p50_us": r.p50_us, "p99_us": r.p99_us})
    return derive.sort_variants(pd.DataFrame(rows, columns=["variant", "loop", "fraction", "offered_rps",
                                                            "served_rps", "p50_us", "p99_us"]))


both = closed_vs_open(closed, opened, latency_conns)
fractions = sorted(both.fraction.dropna().unique())
if both.empty or not (both.loop == "closed").any() or not fractions:
    common.missing("throughput and latency (both are needed for this comparison)")
else:
    with style.context():
        fig, axes = style.figure()
        ax = axes[0][0]
        variants = list(dict.fromkeys(both.variant))
        bars = ["closed"] + [f"open {f:g}×" for f in fractions]
        width = 0.8 / len(bars)
        for i, variant in enumerate(variants):
            rows = both[both.variant == variant]
            values = [rows[rows.loop == "closed"].p99_us.max()] + \
                     [rows[rows.fraction == f].p99_us.max() for f in fractions]
            for j, value in enumerate(values):
                ax.bar(i - 0.4 + (j + 0.5) * width, value / 1000, width, color=style.color(variant),
                       alpha=1.0 if j == 0 else 0.35 + 0.65 * j / len(fractions), hatch="" if j else "//",
                       edgecolor="white")
        ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("p99 latency (ms, log scale)")
        ax.bar([0], [np.nan], color=style.NEUTRAL, hatch="//", edgecolor="white", label="closed loop")
        steps = ", ".join(f"{f:g}×" for f in fractions)
        ax.bar([0], [np.nan], color=style.NEUTRAL, alpha=0.6, label=f"open loop at {steps} capacity (darker = more)")
        ax.legend(frameon=False, loc="upper left")
        style.title(fig, f"p99 at {num(latency_conns)} connections: closed loop (hatched) vs open loop at rising load")
    common.show(fig)

# %% [markdown]
# ## Question
#
# Take the open loop's highest offered fraction (above 1×: more than the closed loop managed).
# For each backend, how many times larger is the open-loop **median** than the closed-loop median
# at the same connections? Which number would your users feel if they kept arriving at that rate?
# And for which backends should you not trust the open-loop percentiles at all? (Hint: compare what
# was served with what was offered.)

# %% tags=["answer"] jupyter={"source_hidden": true}
if both.empty or not fractions or not (both.loop == "closed").any():
    common.answer("this run lacks the closed-loop or the open-loop measurements needed to compare them.")
else:
    top = max(fractions)
    c = both[both.loop == "closed"].set_index("variant")
    o = both[(both.loop == "open") & (both.fraction == top)].set_index("variant")
    common_variants = [v for v in c.index if v in o.index]
    cmp = pd.DataFrame({
        "closed_p50_ms": c.loc[common_variants, "p50_us"] / 1000,
        "open_p50_ms": o.loc[common_variants, "p50_us"] / 1000,
        "open/closed": o.loc[common_variants, "p50_us"] / c.loc[common_variants, "p50_us"],
        "served/offered": o.loc[common_variants, "served_rps"] / o.loc[common_variants, "offered_rps"],
    }).reset_index()
    short = cmp[cmp["served/offered"] < derive.KEEPUP]
    worse = cmp[cmp["open/closed"] > 1]
    common.answer(
        f"At {num(top)}× capacity the open-loop median was larger than the closed-loop median for "
        f"{len(worse)} of {len(cmp)} backends"
        + (f", up to {num(worse['open/closed'].max())}× ({worse.loc[worse['open/closed'].idxmax(), 'variant']})."
           if len(worse) else "."),
        "The open-loop number is what users arriving at that rate would feel: it includes the time their "
        "request waited behind the backlog. The closed loop never builds a backlog: it just sends less.",
        ("Do not trust the open-loop percentiles of " + ", ".join(
            f"{r.variant} (served {num(100 * r['served/offered'])}% of the offered rate)" for _, r in short.iterrows())
         + ": the requests it never answered are not in its histogram at all.") if len(short) else
        f"Every backend served at least {num(100 * derive.KEEPUP)}% of what was offered, so its percentiles "
        "cover (nearly) all requests.")
    common.table(cmp)
