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
# # 3. Context switches: what it costs to change who runs
#
# A server with many connections keeps handing the CPU from one piece of work to another. How
# expensive one hand-off is depends on *who* does it:
#
# * **OS threads**: the kernel saves one thread's registers, picks another, restores it. A system
#   call and scheduler work. A *Python* thread hand-off is more than that: a lock and the GIL change
#   hands too, and that takes more than one kernel switch.
# * **Coroutines** (Python generators, asyncio tasks, greenlets): the switch happens inside the
#   process, in user space: no kernel, just a jump and a few pointers.
# * **Goroutines**: Go's runtime switches them in user space too, on a few OS threads.
#
# The article's claim: thread switches depend on the kernel and cost more; goroutine switches are
# optimised by the runtime. Two measurements check it:
#
# 1. **Microbenchmarks** (the `switch` experiment): two execution contexts pass a token back and
#    forth; time per one-way hand-off, in nanoseconds. The baseline is a small C program: two OS
#    threads waking each other with a futex (or a pipe), both on one CPU or one on each of two CPUs.
#    Every figure comes with the OS context switches it took, so a bar says what it measures: a
#    bare kernel switch, a Python hand-off worth ~2.5 of them, or a runtime switch worth none.
# 2. **Inside the servers**: OS context switches per request (summed over every thread of the
#    server, from `/proc/PID/task/*/status`) and CPU time per request, at the closed-loop reference
#    point.

# %%
import pandas as pd

import common
from conclab.analysis import charts, claims, derive, findings
from conclab.analysis.fmt import num

run = common.load()
common.describe(run)
micro = derive.switch_micro(run)          # one row per (benchmark, placement): ns and kernel switches per switch
per_request = derive.per_request(run)     # per server variant: CPU µs and context switches per request

# %% [markdown]
# ## Predict, then run
#
# Six ways to hand the CPU from one piece of work to another, each measured alone on one CPU: a
# Python **thread** hand-off (lock and GIL), an **asyncio** and a **uvloop** coroutine hand-off (one
# task completes the other's future), a **greenlet** switch (gevent), a **goroutine** switch (Go, an
# unbuffered channel) and a **generator** switch (`send` and `yield`).
#
# **Question:** order them from the most expensive to the cheapest. Write the list into the next cell,
# for example `["thread", "asyncio", "uvloop", "greenlet", "goroutine", "generator"]`.

# %%
prediction = None          # the benchmarks, most nanoseconds per switch first

# %% [markdown]
# The next cell runs `conclab run switch --backends asyncio,threads --profile quick --repeat 1` in a
# subprocess (results in a temporary directory): every microbenchmark, 3 timed rounds each (the spread
# is their min–max), then what the two servers spend per request. It took 20 s here (2 cores, shared
# and busy at the time; the first run also compiles the C and Go benchmarks).

# %%
exercise = common.run_exercise("switch", "asyncio,threads", repeat=1, run_id="switch")

# %% tags=["answer"] jupyter={"source_hidden": true}
ran = common.result_of(exercise, "switch")
if ran is not None:
    benches = derive.switch_micro(ran)
    benches = benches[benches.pinned.astype(bool) & benches.bench.isin(
        ["thread", "asyncio", "uvloop", "greenlet", "goroutine", "generator"])]
    common.check(prediction, common.measured(benches, "ns_per_switch", key="bench",
                                             rounds=ran.profile.get("switch_rounds")), "ns")

# %% [markdown]
# ## One hand-off, measured alone
#
# Each bar is labelled with what it measures and the kernel switches it took. The top panel is
# switched by the kernel (the C baseline, Python threads and processes), the bottom one in user
# space. Bars wear the colour of the model they stand for (greenlet = gevent, goroutine = go, ...);
# hatched bars did not run on one CPU. The scale is logarithmic: each grid line is 10×.
#
# Pinned or not changes the cost, and the counts say why. Across two CPUs the woken thread's CPU
# was idle and has to be woken first (an inter-processor interrupt; that part is a reading, the
# run measures the time neither thread ran). On one CPU, a Python hand-off makes the woken thread
# take the CPU while the waker still holds the GIL, so it sleeps again: more switches per
# hand-off. Which effect wins depends on the machine; the finding under the chart says which did.

# %%
if micro.empty:
    common.missing("switch (the microbenchmarks)")
else:
    f = findings.switch(micro)
    common.chart(charts.draw_switch, micro, f)
    common.finding(f)
    common.table(micro[["measures", "ns_per_switch", "ctx_per_switch", "ctx_invol_per_switch",
                        "cpu_ns_per_switch"]])

# %% [markdown]
# ## Inside the servers: switches and CPU per request
#
# An event loop (asyncio, uvloop, epoll, gevent) serves many requests per wake-up, so it makes far
# fewer OS switches than requests. A thread per connection, or a pool that hands each request to
# a worker, pays at least one per request.

# %%
if per_request.empty:
    common.missing("switch or throughput (per-request server costs)")
else:
    f = findings.per_request(per_request)
    common.chart(charts.draw_per_request, per_request, f)
    common.finding(f)
    common.table(per_request)

# %% [markdown]
# ## Questions
#
# 1. How many coroutine switches (greenlet, generator, asyncio, goroutine) fit in the time of one
#    Python thread hand-off, on one CPU? And how much of that hand-off is the bare kernel switch?
# 2. Multiply each server's OS context switches per request by the cost of one kernel switch (the
#    C baseline on one CPU; the Python hand-off per kernel switch where the baseline was not run).
#    Roughly what share of its CPU per request could be switching?

# %% tags=["answer"] jupyter={"source_hidden": true}
costs = findings.switch_costs(micro)      # bench -> ns, pinned (one CPU) runs preferred
thread_ns = costs.get("thread")
pinned = micro[micro.pinned.astype(bool)].set_index("bench")
kernel_ns = costs.get("futex")            # the C baseline: one bare kernel switch, one CPU
thread_ctx = pinned.ctx_per_switch.get("thread") if thread_ns is not None else None
if kernel_ns is None and thread_ns is not None and thread_ctx and pd.notna(thread_ctx):
    switch_ns, switch_source = thread_ns / thread_ctx, "the Python hand-off per kernel switch it took"
else:
    switch_ns, switch_source = kernel_ns, "the C baseline"
lines = []
share = pd.DataFrame()
if thread_ns is None:
    lines.append("the thread hand-off benchmark is not in this run, so there is nothing to compare with.")
else:
    others = {b: ns for b, ns in costs.items() if derive.SWITCH_GROUPS.get(b) != derive.KERNEL_GROUP}
    lines.append(f"1. One Python thread hand-off took {num(thread_ns)} ns. In that time: "
                 + ", ".join(f"{num(thread_ns / ns)} {b} switches" for b, ns in sorted(others.items(),
                                                                                       key=lambda kv: kv[1]))
                 + "." if others else "1. No coroutine benchmark ran to compare with.")
    if kernel_ns is not None:
        lines.append(f"   A bare kernel thread switch (futex, one CPU) took {num(kernel_ns)} ns: the hand-off is "
                     f"{num(thread_ns / kernel_ns)}× that, {num(thread_ctx)} kernel switches plus the lock and the "
                     "GIL.")
    else:
        lines.append("   The C kernel baseline is not in this run: run `conclab run switch` to measure it.")
if switch_ns is not None and not per_request.empty:
    share = per_request.assign(
        switch_us_per_req=per_request.ctx_per_req * switch_ns / 1000,
        share_of_cpu=per_request.ctx_per_req * switch_ns / 1000 / per_request.cpu_us_per_req)
    top = share.loc[share.share_of_cpu.idxmax()]
    low = share.loc[share.share_of_cpu.idxmin()]
    lines.append(f"2. With one kernel switch at {num(switch_ns)} ns ({switch_source}): at most "
                 f"{num(100 * top.share_of_cpu)}% for {top.variant} ({num(top.ctx_per_req)} switches "
                 f"× {num(switch_ns / 1000)} µs = {num(top.switch_us_per_req)} µs of its "
                 f"{num(top.cpu_us_per_req)} µs per request); {num(100 * low.share_of_cpu)}% for {low.variant}"
                 + (", whose loop wakes up once for many requests." if low.ctx_per_req < 0.5 else ".")
                 + " The rest of the CPU goes to the system calls and the code that handle each request.")
common.answer(*lines)
if not share.empty:
    common.table(share[["variant", "ctx_per_req", "switch_us_per_req", "cpu_us_per_req", "share_of_cpu"]])
common.table(pd.DataFrame([vars(claims.switch_claim(run))]))
