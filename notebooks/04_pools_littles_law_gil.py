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
# # 4. Thread pools: Little's law, the GIL, and head-of-line blocking
#
# A thread pool caps how many threads a server uses: memory and context switches stay bounded
# however many clients come (the article's "pools cap concurrency"). The cap is also a ceiling.
# Three ideas tell you where it is:
#
# * **Little's law**: `requests in service = throughput × time in service` (L = λ·W). If every
#   request waits W seconds (a database call, say) and at most L can wait at once, then
#   `throughput ≤ L / W`. For a pool, L is its number of workers. For a thread per connection or an
#   event loop, L is the number of connections.
# * **The GIL**: CPython runs Python code on one core at a time. If each request computes for
#   `cpu_us` microseconds holding the GIL, no Python server can exceed `1e6 / cpu_us` requests/s,
#   whatever its concurrency model and however many cores it has. Go runs goroutines on
#   `GOMAXPROCS` cores at once.
# * **Head-of-line blocking**: with `--dispatch connection`, a pool worker owns a connection for
#   its whole life. Connections beyond the number of workers wait in the queue until one *closes*,
#   so a few idle clients starve everyone else. `--dispatch request` hands out requests instead.

# %%
import numpy as np
import pandas as pd

import common
from conclab.analysis import charts, claims, derive, findings, style
from conclab.analysis.fmt import num

run = common.load()
common.describe(run)
io = derive.io_bound(run)
cpu = derive.cpu_bound(run)
pools = io[io.variant.str.startswith(derive.POOL_BACKEND) & io.workers.notna()] if not io.empty else io

# %% [markdown]
# ## Predict, then run
#
# A request that **computes** for `cpu_us` microseconds holding the GIL: how many of those can a Python
# server answer per second, and does a second CPU help? `threads` runs one OS thread per connection,
# `asyncio` one thread for all of them.
#
# **Question:** with the settings printed below, how many requests/s will `threads` reach on one CPU,
# `threads` on two CPUs, and `asyncio` on one CPU? Write them into the next cell, for example
# `{"threads on 1 CPU": 4000, "threads on 2 CPUs": 8000, "asyncio on 1 CPU": 4000}`, or the order,
# most first.

# %%
settings = common.exercise_settings()
common.note(f"Profile `{settings.name}`: each request computes cpu_us = {num(settings.cpu_us)} µs; "
            f"{num(max(settings.cpu_conns))} connections in a closed loop; on two CPUs: "
            f"{', '.join(settings.cpu_wide_variants) or 'none'}.")
prediction = None          # {"threads on 1 CPU": req/s, "threads on 2 CPUs": req/s, "asyncio on 1 CPU": req/s}

# %% [markdown]
# The next cell runs `conclab run cpu_bound --backends threads,asyncio --profile quick --repeat 3` in a
# subprocess (results in a temporary directory): three interleaved rounds of each point. It took
# 34 s here (2 cores, shared and busy at the time).

# %%
exercise = common.run_exercise("cpu_bound", "threads,asyncio", repeat=3, run_id="cpu_bound")

# %% tags=["answer"] jupyter={"source_hidden": true}
ran = common.result_of(exercise, "cpu_bound")
if ran is not None:
    best = derive.cpu_bound(ran)
    best = best.assign(point=[f"{r.variant} on {num(r.n_server_cpus)} CPU{'s' * (r.n_server_cpus > 1)}"
                              for r in best.itertuples()])
    common.note(f"The CPython ceiling: 1e6 / {num(best.cpu_us.max())} µs = {num(best.ceiling_rps.min())} req/s, "
                "on any number of CPUs.")
    common.check(prediction, common.measured(best, "throughput_rps", key="point"), "req/s")

# %% [markdown]
# ## Waiting work: the `io_bound` experiment
#
# Each request waits `io_us` (10 ms in the lab's profiles) and is then answered; the closed loop's
# concurrency is swept. The dashed line is `connections / wait`, the ceiling of a server that lets
# every connection wait at once; the dash-dotted one is the pool's `workers / wait`.

# %%
if io.empty:
    common.missing("io_bound")
else:
    f = findings.io_bound(io)
    common.chart(charts.draw_io_bound, io, f)
    common.finding(f)
    common.table(io.assign(of_ceiling=io.throughput_rps / io.little_ceiling_rps)[
        ["variant", "conns", "workers", "throughput_rps", "little_ceiling_rps", "of_ceiling", "p50_us"]])

# %% [markdown]
# ### Question 1
#
# The pool has `workers` threads and each request waits `io_us`. What is the most requests/s the
# pool can ever serve, and how close did it come? At the highest concurrency, the best backend
# served some rate λ: by Little's law, how many workers would the pool need to match it?

# %% tags=["answer"] jupyter={"source_hidden": true}
if io.empty or pools.empty:
    common.answer("this run has no io_bound measurement of a thread pool.")
else:
    wait_s = pools.io_us.dropna().iloc[0] / 1e6
    workers = pools.workers.dropna().iloc[0]
    ceiling = workers / wait_s
    best_pool = pools.loc[pools.throughput_rps.idxmax()]
    n = io.conns.max()
    at_n = io[io.conns == n]
    best = at_n.loc[at_n.throughput_rps.idxmax()]
    needed = best.throughput_rps * wait_s
    common.answer(
        f"Ceiling = workers / wait = {num(workers)} / {num(wait_s * 1000)} ms = {num(ceiling)} rps. The pool's best "
        f"was {num(best_pool.throughput_rps)} rps ({best_pool.variant} at {num(best_pool.conns)} connections), "
        f"{num(100 * best_pool.throughput_rps / ceiling)}% of it"
        + (": more connections did not help." if best_pool.throughput_rps >= 0.8 * ceiling else "."),
        f"At {num(n)} connections {best.variant} served {num(best.throughput_rps)} rps. L = λ·W = "
        f"{num(best.throughput_rps)} × {num(wait_s)} s ≈ {num(np.ceil(needed))} requests waiting at once, so the "
        f"pool would need about {num(np.ceil(needed))} workers ({num(needed / workers)}× as many), each an OS "
        "thread with its own stack.")
    common.table(pd.DataFrame([vars(claims.pool_claim(run))]))

# %% [markdown]
# ## Computing work: the `cpu_bound` experiment
#
# Each request busy-loops `cpu_us` (200 µs) holding the GIL. The black line on each bar is its
# ceiling: `1e6 / cpu_us` for every CPython model, `CPUs × 1e6 / cpu_us` for go. Hatched bars ran
# with the server on more CPUs (shared with the load generator).

# %%
if cpu.empty:
    common.missing("cpu_bound")
else:
    f = findings.cpu_bound(cpu)
    common.chart(charts.draw_cpu_bound, cpu, f)
    common.finding(f)

# %% [markdown]
# ### Question 2
#
# What is the ceiling for a CPython server here, and how close did the Python models get? Did
# giving a server a second CPU raise its throughput (Python's `threads`, and `go`)?

# %% tags=["answer"] jupyter={"source_hidden": true}
if cpu.empty:
    common.answer("this run has no cpu_bound measurement.")
else:
    narrow = cpu.n_server_cpus.min()
    one = cpu[cpu.n_server_cpus == narrow]
    python = one[one.variant != "go"]
    lines = []
    if not python.empty:
        cap = python.ceiling_rps.max()
        lo, hi = python.throughput_rps.min(), python.throughput_rps.max()
        lines.append(f"CPython ceiling: 1e6 / {num(python.cpu_us.max())} µs = {num(cap)} rps on any number of cores. "
                     f"The Python models reached {num(lo)}–{num(hi)} rps ({num(100 * lo / cap)}–{num(100 * hi / cap)}"
                     "% of it). What is missing: the protocol work around each busy loop, and CPU the server did "
                     f"not get (it used {num(python.server_cpu_percent.min())}–{num(python.server_cpu_percent.max())}"
                     "% of its core).")
    for _, wide in cpu[cpu.n_server_cpus > narrow].iterrows():
        base = one[one.variant == wide.variant]
        if base.empty:
            continue
        gain = wide.throughput_rps / base.iloc[0].throughput_rps
        verdict = ("it helped" if gain > 1.1 else
                   "no gain" + (": the GIL lets one thread compute at a time" if wide.variant != "go" else
                                ": the second CPU is the load generator's too, so it had little to give"))
        lines.append(f"{wide.variant}: {num(base.iloc[0].throughput_rps)} rps on {num(narrow)} CPU → "
                     f"{num(wide.throughput_rps)} rps on {num(wide.n_server_cpus)} CPUs ({num(gain)}×): {verdict}.")
    common.answer(*lines)

# %% [markdown]
# ## Head-of-line blocking
#
# Left: in the open-loop `latency` experiment, the share of the offered requests each backend
# answered (the line marks `workers / connections`). Right: in `c10k`, requests a small probe got
# answered while the server held 10,000 idle connections. A pool that hands out *connections*
# gives its few workers to the first connections; the others wait for one of those to close.

# %%
lat = derive.latency(run)
c10k = derive.c10k(run)
lat_conns = run.tables["latency"].conns.median() if run.has("latency") else np.nan
if lat.empty and c10k.empty:
    common.missing("latency and c10k")
else:
    with style.context():
        fig, axes = style.figure(ncols=2)
        left, right = axes[0]
        if not lat.empty:
            served = lat.assign(served=lat.throughput_rps / lat.offered_rps)
            variants = list(dict.fromkeys(served.variant))
            fractions = sorted(served.rate_fraction.unique())
            width = 0.8 / len(fractions)
            for i, variant in enumerate(variants):
                for j, f in enumerate(fractions):
                    value = served[(served.variant == variant) & (served.rate_fraction == f)].served.max()
                    left.bar(i - 0.4 + (j + 0.5) * width, value, width, color=style.color(variant),
                             alpha=0.4 + 0.6 * (j + 1) / len(fractions), edgecolor="white")
            workers = lat.workers.dropna()
            if len(workers) and np.isfinite(lat_conns):
                left.axhline(workers.iloc[0] / lat_conns, color=style.color(derive.POOL_BACKEND), ls="-.", lw=2,
                             label=f"workers / connections = {num(workers.iloc[0])} / {num(lat_conns)}")
            left.axhline(1, color=style.NEUTRAL, lw=1)
            left.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
            left.set_ylabel("answered / offered (open loop)")
            left.set_title("offered " + ", ".join(f"{f:g}×" for f in fractions) + " capacity (darker = more)",
                           fontsize=12)
            left.legend(frameon=False, loc="lower right")
        if not c10k.empty:
            right.bar(c10k.variant, c10k.requests.fillna(0), color=[style.color(v) for v in c10k.variant])
            for i, r in enumerate(c10k.itertuples()):
                if not r.requests:
                    right.annotate("starved", (i, 0), xytext=(0, 4), textcoords="offset points", ha="center",
                                   fontsize=12)
            right.set_ylabel(f"probe requests answered while holding {num(c10k.hold_target.max())}")
            right.tick_params(axis="x", rotation=30)
            for tick in right.get_xticklabels():
                tick.set_ha("right")
        style.title(fig, "Head-of-line blocking: share of the offered load answered (left), probe answers while "
                         "holding idle connections (right)")
    common.show(fig)

# %% [markdown]
# ### Question 3
#
# Before you look at the answer: the latency experiment spread its rate over N connections, and the
# pool with connection dispatch has k workers. Each worker serves one connection and never gets to
# the rest. What share of the offered requests can it answer? Check your prediction against the
# measurement. Why does `threadpool-request` (same k workers) not suffer from this?

# %% tags=["answer"] jupyter={"source_hidden": true}
hol = lat[lat.variant == derive.POOL_BACKEND] if not lat.empty else lat
if hol.empty or hol.workers.isna().all() or not np.isfinite(lat_conns):
    common.answer(f"this run has no open-loop measurement of {derive.POOL_BACKEND} (connection dispatch).")
else:
    k = hol.workers.dropna().iloc[0]
    measured = (hol.throughput_rps / hol.offered_rps).tolist()
    lines = [f"Prediction: k / N = {num(k)} / {num(lat_conns)} = {num(k / lat_conns)}. Measured at "
             + ", ".join(f"{num(f)}× capacity: {num(m)}" for f, m in zip(hol.rate_fraction, measured)) + "."]
    req = lat[lat.variant == f"{derive.POOL_BACKEND}-request"]
    if not req.empty:
        shares = req.throughput_rps / req.offered_rps
        lines.append(f"{derive.POOL_BACKEND}-request answered " + ", ".join(num(m) for m in shares)
                     + " of the offered rate" + (": its workers take one request at a time from any connection, so "
                                                 "no connection is left without a worker." if shares.min() >= 0.9
                                                 else "."))
    starved = c10k[(c10k.requests.fillna(0) == 0) & (c10k.variant == derive.POOL_BACKEND)] if not c10k.empty \
        else c10k
    if len(starved):
        lines.append(f"In c10k the probe got no answer from {derive.POOL_BACKEND} while it held "
                     f"{num(starved.iloc[0].held)} idle connections: each of its {num(k)} workers sat on one of them.")
    common.answer(*lines)
