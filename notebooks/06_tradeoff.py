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
# # 6. The trade-off: thread pools against coroutines, on one page
#
# Notebooks 1 to 5 looked at one cost at a time. Here they are side by side, for every backend the
# run measured, so you can see what each model buys and what it pays for it:
#
# | model | backends | one connection is ... |
# |---|---|---|
# | thread per connection | `threads` | an OS thread |
# | thread pool, a worker per connection | `threadpool` | a queue entry, until a worker takes it for good |
# | thread pool, a worker per request | `threadpool-request` | a socket; each request queues for a worker |
# | coroutines on an event loop | `asyncio`, `uvloop`, `gevent` (greenlets) | a coroutine: a few objects in one thread |
# | event loop with callbacks | `epoll` | a buffer and a callback |
# | goroutines (M:N) | `go` | a goroutine, on a few OS threads |
#
# Every figure is a **median over the run's rounds** with its spread (the 95 % interval of the median,
# or min–max with fewer than 3 rounds). Two backends whose spreads overlap are a **tie**: the run cannot
# tell them apart, and the text says so (`=` in an order below) rather than rank them.

# %%
import numpy as np
import pandas as pd

import common
from conclab.analysis import derive, findings, tradeoff_table, tradeoffs
from conclab.analysis.fmt import num

run = common.load()
common.describe(run)

SWITCH_OF, HALF_LOAD = tradeoff_table.SWITCH_OF, tradeoff_table.HALF_LOAD
THREAD_MODELS = ("threads", "threadpool", "threadpool-request")

# %% [markdown]
# ## The trade-off table
#
# The report's first table (`report.html`, and `tradeoff.csv` beside it): one row per model, each cell
# read from this run's own tables by `conclab.analysis.tradeoff_table`. A cell says `invalid:` and why
# where the harness marked the point invalid (its number is not used), and `not measured` where the run
# lacks the experiment: the notes under the table name the `conclab run` that measures it. Under it, the
# decision guide: sentences computed from the cells, ties said as ties. The sections after it show how
# each column is made, one cost at a time.

# %%
trade_off = tradeoff_table.build(run)
common.table(trade_off.frame())
for line in trade_off.notes:
    common.note(line)
common.answer(*[sentence.text for sentence in trade_off.guide]) if trade_off.guide else \
    common.missing("the columns the guide needs")


def spread(row, column, scale=1.0) -> str:
    """"median (low–high)" of one derived row's column."""
    pair = derive.interval(row, column)
    if pair is None or pd.isna(row.get(column)):
        return "not measured"
    lo, hi = pair[0] * scale, pair[1] * scale
    middle = num(row[column] * scale)
    return middle if num(lo) == num(hi) == middle else f"{middle} ({num(lo)}–{num(hi)})"


def in_order(frame, column, scale=1.0, smallest_first=True) -> str:
    """The backends by column, ties (overlapping spreads) joined by "="; invalid points left out."""
    quantities = {k: q for k, q in common.measured(frame, column, scale=scale).items() if not q.invalid}
    return common.measured_order(quantities, smallest_first=smallest_first) if quantities else "nothing measured"


def group_of(frame, column, variants, name, scale=1.0):
    """The group's median of its members' valid medians, its spread the median of their lows and of their highs,
    ``rounds`` the members counted (None: no member measured)."""
    members = [q for v, q in common.measured(frame, column, scale=scale).items() if v in variants and not q.invalid]
    if not members:
        return None
    middle, lo, hi = (float(np.median([getattr(q, f) for q in members])) for f in ("median", "lo", "hi"))
    return common.Measured(name, middle, lo, hi, len(members))


def group_ratio(frame, column, a_variants, b_variants, scale=1.0):
    """a's group median / b's, with its spread (common.ratio); None if either group has no valid member."""
    a, b = group_of(frame, column, a_variants, "a", scale), group_of(frame, column, b_variants, "b", scale)
    return common.ratio(a, b, "a/b") if a and b and b.median else None


# %% [markdown]
# ## 1. Memory per idle connection: the process, and the kernel
#
# From the `memory` experiment: the least-squares slope of memory against idle connections held
# (notebook 1). The process's RSS is what `top` shows; the kernel's part (socket objects, buffers, a
# kernel stack per thread, page tables) is in no process's RSS, and decides how many connections a
# machine can hold just as much.

# %%
slopes = derive.memory_slopes(run)
split = derive.memory_kernel(run)
if slopes.empty:
    common.missing("memory (no per-connection fit)")
    memory = pd.DataFrame(columns=["variant", "rss_kib", "kernel_kib", "total_kib"])
else:
    memory = slopes[["variant", "rss_kib", "rss_kib_min", "rss_kib_max"]].merge(
        split[["variant", "kernel_kib", "kernel_kib_min", "kernel_kib_max"]] if not split.empty else
        pd.DataFrame(columns=["variant", "kernel_kib", "kernel_kib_min", "kernel_kib_max"]), on="variant", how="left")
    memory = memory.astype({c: float for c in memory.columns if c != "variant"})
    memory["total_kib"] = memory.rss_kib + memory.kernel_kib
    memory["total_kib_min"] = memory.rss_kib_min + memory.kernel_kib_min
    memory["total_kib_max"] = memory.rss_kib_max + memory.kernel_kib_max
    common.table(pd.DataFrame({"variant": memory.variant,
                               "process RSS KiB/conn": [spread(r, "rss_kib") for _, r in memory.iterrows()],
                               "kernel KiB/conn": [spread(r, "kernel_kib") for _, r in memory.iterrows()],
                               "total KiB/conn": [spread(r, "total_kib") for _, r in memory.iterrows()]}))
    column = "total_kib" if memory.total_kib.notna().any() else "rss_kib"
    x = group_ratio(memory, column, ["threads"], [v for v in memory.variant if v not in THREAD_MODELS])
    common.note(f"Cheapest first ({'process and kernel' if column == 'total_kib' else 'process RSS only'}, KiB): "
                f"{in_order(memory, column)}."
                + (f" A thread per connection costs {num(x.median)}× the median of the models that are not threads."
                   if x else ""))

# %% [markdown]
# ## 2. The cost of switching from one connection's work to another's
#
# Left: one hand-off between two execution contexts, alone, pinned to one CPU (the `switch`
# microbenchmarks, notebook 3), as each model makes it. Right: what each server really made per request
# at the reference point: OS context switches per request. A model that switches in user space makes
# almost none.

# %%
micro = derive.switch_micro(run)
per_request = derive.per_request(run)
pinned = micro[micro.pinned.astype(bool)].set_index("bench") if not micro.empty else micro
switch_rows = []
for variant in run.variants():
    bench = SWITCH_OF.get(variant)
    row = pinned.loc[bench] if bench is not None and bench in pinned.index else None
    switch_rows.append({"variant": variant, "switch": row["measures"] if row is not None else
                        ("none: a callback runs, no context is switched" if variant == "epoll" else "not measured"),
                        "ns_per_switch": row["ns_per_switch"] if row is not None else np.nan,
                        "ns_per_switch_min": row["ns_min"] if row is not None else np.nan,
                        "ns_per_switch_max": row["ns_max"] if row is not None else np.nan})
switches = pd.DataFrame(switch_rows, columns=["variant", "switch", "ns_per_switch", "ns_per_switch_min",
                                              "ns_per_switch_max"])
if micro.empty and per_request.empty:
    common.missing("switch (microbenchmarks and per-request costs)")
else:
    shown = switches.merge(per_request[["variant", *[c for c in per_request.columns if c.startswith("ctx_per_req")]]]
                           if not per_request.empty else pd.DataFrame(columns=["variant"]), on="variant", how="left")
    common.table(pd.DataFrame({"variant": shown.variant, "its switch": shown.switch,
                               "ns per switch": [spread(r, "ns_per_switch") for _, r in shown.iterrows()],
                               "OS switches per request": [spread(r, "ctx_per_req") if "ctx_per_req" in r else
                                                           "not measured" for _, r in shown.iterrows()]}))
    unique = switches.drop_duplicates("switch").dropna(subset=["ns_per_switch"])
    if len(unique):
        common.note(f"Cheapest switch first (ns): {in_order(unique, 'ns_per_switch')}.")
    if not per_request.empty:
        common.note(f"Fewest OS switches per request first: {in_order(per_request, 'ctx_per_req')}.")

# %% [markdown]
# ## 3. Requests per second and CPU per request
#
# The closed loop at the reference point (50 connections, 64-byte ECHO): what each server can do
# when it is kept busy, and the server CPU each request costs (from the `switch` experiment's
# per-request rows, else the throughput rows). A throughput point the load generator saturated, or
# that left connections unserved, is not valid: it is shown, but not ranked.

# %%
at_ref = derive.at_reference(run)
if at_ref.empty:
    common.missing("throughput (the closed-loop reference point)")
else:
    cpu = per_request if not per_request.empty else at_ref
    both = at_ref[["variant", "valid", "invalid_reason", *[c for c in at_ref.columns if c.startswith("throughput")]]] \
        .merge(cpu[["variant", *[c for c in cpu.columns if c.startswith("cpu_us_per_req")]]], on="variant", how="left")
    common.table(pd.DataFrame({
        "variant": both.variant, "req/s": [spread(r, "throughput_rps") for _, r in both.iterrows()],
        "valid": [bool(v) for v in both.valid],
        "why not valid": [r if isinstance(r, str) else "" for r in both.invalid_reason],
        "CPU µs/request": [spread(r, "cpu_us_per_req") for _, r in both.iterrows()]}))
    ranked = derive.valid(both)
    saturated = both[~both.valid.astype(bool)]
    common.note(f"Most requests/s first, valid points only: {in_order(ranked, 'throughput_rps', smallest_first=False)}."
                + (f" Not valid, so not ranked: {', '.join(saturated.variant)} ({len(saturated)} of {len(both)}); "
                   "where the load generator saturated, the number is what the generator could send, a lower bound "
                   "for the server." if len(saturated) else "")
                + f" Least CPU per request first (µs): {in_order(cpu, 'cpu_us_per_req')}.")

# %% [markdown]
# ## 4. p99 at half load
#
# The open loop (`latency`), each backend offered half of its own closed-loop capacity: a load it can
# carry. The p99 latency counts from the scheduled send (notebook 2), so queueing shows.

# %%
lat = derive.latency(run)
half = pd.DataFrame()
if lat.empty:
    common.missing("latency (open loop)")
else:
    half = common.nearest_rate(lat, HALF_LOAD)
    common.table(pd.DataFrame({"variant": half.variant, "offered (× capacity)": half.rate_fraction,
                               "offered req/s": half.offered_rps,
                               "p99 ms": [spread(r, "p99_us", 1e-3) for _, r in half.iterrows()],
                               "valid": [bool(v) for v in half.valid]}))
    common.note(f"Lowest p99 first (ms), valid points only: {in_order(derive.valid(half), 'p99_us', 1e-3)}.")

# %% [markdown]
# ## 5. 10,000 idle connections held
#
# `c10k`: each server holds many idle connections while a small closed loop (the probe) asks for
# answers. Held is what the server accepted; the probe's requests show whether it still served
# anyone; RSS and threads are what holding them cost.

# %%
c10k = derive.c10k(run)
if c10k.empty:
    common.missing("c10k")
else:
    common.table(c10k[["variant", "hold_target", "held", "requests", "p99_us", "rss_kib", "threads", "note"]].assign(
        p99_us=c10k.p99_us / 1000, rss_kib=c10k.rss_kib / 1024).rename(columns={
            "hold_target": "asked", "requests": "probe requests answered", "p99_us": "probe p99 ms",
            "rss_kib": "RSS MiB"}))
    starved = c10k[c10k.requests.fillna(0) == 0].variant.tolist()
    held_all = c10k[c10k.held >= c10k.hold_target].variant.tolist()
    common.note(f"Held all {num(c10k.hold_target.max())}: {', '.join(held_all) or 'none'}. "
                + (f"Answered no probe request meanwhile: {', '.join(starved)}." if starved else
                   "Every backend answered the probe meanwhile.")
                + f" Fewest threads to hold them first: {in_order(c10k, 'threads')}.")

# %% [markdown]
# ## 6. Past capacity
#
# What happens as the offered rate climbs towards and past what a backend can do: the **knee** (the
# rate where latency bends: served within 95 % and p99 under 10 times its value at the lightest load;
# notebook 2), as a fraction of the backend's capacity, and the highest offered rate whose point is
# still valid. Above that, either the server stopped keeping up or the load generator did (its rows
# say which): this machine cannot tell what the server would do there.

# %%
knees = derive.knees(run)
past = pd.DataFrame()
if lat.empty:
    common.missing("latency (open loop)")
else:
    rows = []
    for variant, group in lat.groupby("variant", sort=False):
        ok = group[group.valid.astype(bool)]
        top = group.loc[group.rate_fraction.idxmax()]
        knee = knees.set_index("variant").knee.get(variant, np.nan) if not knees.empty else np.nan
        capacity = group.capacity_rps.dropna().median()
        rows.append({"variant": variant, "capacity_rps": capacity,
                     "knee_x": knee / capacity if pd.notna(knee) and capacity else np.nan,
                     "highest_valid_x": ok.rate_fraction.max() if len(ok) else np.nan,
                     "p99_ms_there": ok.loc[ok.rate_fraction.idxmax(), "p99_us"] / 1000 if len(ok) else np.nan,
                     "top_x": top.rate_fraction, "served_at_top": top.throughput_rps / top.offered_rps,
                     "top_why_not_valid": top.invalid_reason if not top.valid else ""})
    past = derive.sort_variants(pd.DataFrame(rows))
    common.table(past.rename(columns={
        "capacity_rps": "capacity req/s", "knee_x": "knee (× capacity)",
        "highest_valid_x": "highest valid (× capacity)", "p99_ms_there": "p99 ms there",
        "top_x": "highest offered (× capacity)",
        "served_at_top": "served / offered there", "top_why_not_valid": "why not valid there"}))
    bent = past.dropna(subset=["knee_x"])
    short = past[past.served_at_top < derive.KEEPUP]
    common.note((f"Latency bent earliest for {bent.loc[bent.knee_x.idxmin(), 'variant']} (at "
                 f"{num(bent.knee_x.min())}× its capacity). " if len(bent) else "No knee inside the tested range. ")
                + (f"At the highest offered rate, {', '.join(short.variant)} served less than "
                   f"{num(100 * derive.KEEPUP)}% of it." if len(short) else
                   "At the highest offered rate every backend served what was offered (or its generator saturated)."))

# %% [markdown]
# ## 7. How big a pool, and how many units per OS thread
#
# Two experiments that `conclab run all` leaves out, shown when the run has them. `pool_sizing`: the
# pool at growing `--workers`, and what one more worker costs (least-squares slopes of RSS and of OS
# switches per request against the worker count). `m_to_n`: while each server holds many idle
# connections, its logical units (threads, greenlets, protocol objects, goroutines: one per
# connection) against its OS threads: the M:N ratio.

# %%
if run.has("pool_sizing"):
    sizes = tradeoffs.pool_sizing(run)
    common.finding(findings.pool_sizing(sizes))
    common.table(tradeoffs.pool_costs(sizes).rename(columns={
        "rss_kib_per_worker": "RSS KiB per worker", "ctx_per_req_per_worker": "OS switches/req per worker",
        "threads_per_worker": "threads per worker", "from_workers": "from workers", "to_workers": "to workers",
        "points": "sizes"}))
else:
    common.missing("pool_sizing (thread pools at growing --workers)")
if run.has("m_to_n"):
    units = tradeoffs.m_to_n(run)
    common.finding(findings.m_to_n(units))
    common.note(f"Most connections per OS thread first: {in_order(units, 'units_per_thread', smallest_first=False)}.")
else:
    common.missing("m_to_n (logical units against OS threads)")

# %% [markdown]
# ## Thread pools against coroutines
#
# The sentences below compare the groups by their medians: the thread models (`threads` and the two
# pools) against the coroutine models (`asyncio`, `uvloop`, `gevent`), with the event loop and Go beside.

# %%
columns = {"memory KiB/conn": (memory, "total_kib" if "total_kib" in memory and memory.total_kib.notna().any()
                               else "rss_kib", 1.0),
           "switch ns": (switches, "ns_per_switch", 1.0),
           "OS switches/req": (per_request, "ctx_per_req", 1.0),
           "req/s at reference": (derive.valid(at_ref), "throughput_rps", 1.0),
           "CPU µs/req": (per_request if not per_request.empty else at_ref, "cpu_us_per_req", 1.0),
           "p99 ms at half load": (derive.valid(half), "p99_us", 1e-3),
           "c10k held": (c10k, "held", 1.0),
           "c10k probe answers": (c10k, "requests", 1.0),
           "knee (× capacity)": (past, "knee_x", 1.0)}
COROUTINES = ("asyncio", "uvloop", "gevent")
lines = []
for label, (frame, column, scale), better in (
        ("memory per idle connection (KiB)", columns["memory KiB/conn"], "less"),
        ("CPU per request (µs)", columns["CPU µs/req"], "less"),
        ("requests/s at the reference point", columns["req/s at reference"], "more"),
        ("p99 at half load (ms)", columns["p99 ms at half load"], "less")):
    if frame.empty or column not in frame:
        continue
    x = group_ratio(frame, column, THREAD_MODELS, COROUTINES, scale)
    if x is None:
        continue
    a, b = group_of(frame, column, THREAD_MODELS, "a", scale), group_of(frame, column, COROUTINES, "b", scale)
    counts = f"valid: {a.rounds} thread model{'s' * (a.rounds > 1)}, {b.rounds} coroutine model{'s' * (b.rounds > 1)}"
    if x.lo <= 1 <= x.hi:
        lines.append(f"{label}: a tie within noise (thread models' median {num(a.median)}, coroutine models' "
                     f"{num(b.median)}; {counts}).")
    else:
        lines.append(f"{label}: the thread models' median is {num(x.median)}× the coroutine models' "
                     f"({num(x.lo)}–{num(x.hi)}×; {counts}; {better} is better).")
if not c10k.empty:
    pools_starved = [v for v in THREAD_MODELS if v in set(c10k[c10k.requests.fillna(0) == 0].variant)]
    lines.append("Holding many idle connections: " + (
        f"{', '.join(pools_starved)} answered nobody else while holding them (a worker per connection)."
        if pools_starved else "every thread model still answered the probe.")
        + f" threads needed {num(c10k.set_index('variant').threads.get('threads', np.nan))} OS threads for it.")
common.answer(*lines) if lines else common.missing("the tables this comparison needs")

# %% [markdown]
# ## Predict, then run
#
# The reference run measured the closed loop at 50 connections only. What happens at **ten times
# that**, 500 connections (the quick profile's largest)? `threadpool-request` still has its few worker
# threads and a queue of requests; `asyncio` has 500 coroutines on one thread.
#
# **Question:** how many requests/s will `threadpool-request` and `asyncio` serve at the run's largest
# concurrency? Write your numbers into the next cell, for example
# `{"threadpool-request": 20000, "asyncio": 30000}`, or just the order, most first:
# `["asyncio", "threadpool-request"]`. Then run the two cells after it.

# %%
prediction = None          # {"threadpool-request": req/s, "asyncio": req/s}, or a list: most first

# %% [markdown]
# This runs `conclab run throughput --backends threadpool-request,asyncio --profile quick --repeat 2` in
# a subprocess (the servers never enter this notebook's kernel; the results go to a temporary
# directory): 3 concurrencies, 2 interleaved rounds, so the spread is their min–max. It took 36 s here
# (2 cores, shared and busy at the time).

# %%
exercise = common.run_exercise("throughput", "threadpool-request,asyncio", repeat=2, run_id="tradeoff")

# %% tags=["answer"] jupyter={"source_hidden": true}
ran = common.result_of(exercise, "throughput")
if ran is not None:
    measured_tp = derive.throughput(ran)
    top_conns = measured_tp.conns.max()
    common.note(f"At {num(top_conns)} connections, requests/s (median and spread over the rounds):")
    common.check(prediction, common.measured(measured_tp[measured_tp.conns == top_conns], "throughput_rps"), "req/s")

# %% [markdown]
# ## One Redis round trip per request
#
# The shared rate limit keeps its token bucket in Redis (docs/ratelimit.md): every request then waits for
# one `EVALSHA` round trip before it is answered. How a model waits is where the models differ: `go`
# parks the goroutine on the netpoller, `asyncio` awaits a future while the loop runs the others, a
# thread blocks in `recv`. The `redis_call` experiment measures each model twice per round, paired: the
# bucket in Redis and the same bucket in memory, at a rate that never limits, so the difference is the
# round trip alone (`conclab run redis_call`; not part of `all`).

# %%
from conclab.analysis import redis_cost

if run.has("redis_call"):
    costs = redis_cost.redis_call(run)
    common.finding(redis_cost.finding(costs))
else:
    common.missing("redis_call (a Redis round trip per request, against the memory store)")

# %% [markdown]
# **Question:** how many µs of server CPU per request will the round trip add for `go` and for `asyncio`
# (with Redis minus without, paired per round)? And will throughput with Redis be closer to the memory
# store's for one of them? Write your numbers into the next cell, for example `{"go": 20, "asyncio": 40}`,
# or the order, most first: `["asyncio", "go"]`. Then run the two cells after it.

# %%
redis_prediction = None    # {"go": µs, "asyncio": µs}, or a list: the bigger cost first

# %% [markdown]
# This runs `conclab run redis_call --backends go,asyncio` in a subprocess at the exercises' profile
# (quick unless `CONCLAB_NOTEBOOK_PROFILE` says otherwise; `--profile tiny` is the shortest), with a
# `redis-server` of its own on a free loopback port, pinned to the load generator's CPU, which it
# shares; the results go to a temporary directory. It is stopped at 60 s; at quick it took 20 s here
# (2 cores, shared and busy at the time). A point where Redis answered later than the store's 50 ms
# deadline is flagged and not judged: those verdicts were not Redis's.

# %%
redis_exercise = common.run_exercise("redis_call", "go,asyncio", repeat=1, run_id="redis-call")

# %% tags=["answer"] jupyter={"source_hidden": true}
redis_ran = common.result_of(redis_exercise, "redis_call")
if redis_ran is not None:
    measured_cost = redis_cost.redis_call(redis_ran)
    common.note("Server CPU µs per request, with Redis minus without (paired per round):")
    common.check(redis_prediction, common.measured(measured_cost.assign(n=measured_cost.delta_cpu_us_n),
                                                   "delta_cpu_us", key="case"), "µs")
    common.note("Throughput with Redis / without: " + ", ".join(
        f"{r.case} {num(r.ratio_rps)}×" for r in measured_cost.itertuples() if pd.notna(r.ratio_rps)) + ".")
