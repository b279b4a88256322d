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
#   call, scheduler work, and in CPython the GIL changes hands too.
# * **Coroutines** (Python generators, asyncio tasks, greenlets): the switch happens inside the
#   process, in user space: no kernel, just a jump and a few pointers.
# * **Goroutines**: Go's runtime switches them in user space too, on a few OS threads.
#
# The article's claim: thread switches depend on the kernel and cost more; goroutine switches are
# optimised by the runtime. Two measurements check it:
#
# 1. **Microbenchmarks** (the `switch` experiment): two execution contexts pass a token back and
#    forth; time per one-way hand-off, in nanoseconds. "pinned" means both ran on one CPU.
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
micro = derive.switch_micro(run)          # one row per (benchmark, pinned): median ns per switch
per_request = derive.per_request(run)     # per server variant: CPU µs and context switches per request

# %% [markdown]
# ## One hand-off, measured alone
#
# Bars wear the colour of the model they stand for (greenlet = gevent, goroutine = go, ...);
# hatched bars were not pinned to one CPU. The scale is logarithmic: each grid line is 10×.

# %%
if micro.empty:
    common.missing("switch (the microbenchmarks)")
else:
    f = findings.switch(micro)
    common.chart(charts.draw_switch, micro, f)
    common.finding(f)

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
#    OS-thread hand-off, on one CPU?
# 2. Multiply each server's OS context switches per request by the cost of one thread hand-off.
#    Roughly what share of its CPU per request could be switching? (A rough upper bound: the
#    thread benchmark also pays Python's locking, not only the kernel's switch.)

# %% tags=["answer"] jupyter={"source_hidden": true}
costs = findings.switch_costs(micro)      # bench -> ns, pinned runs preferred
thread_ns = costs.get("thread")
lines = []
if thread_ns is None:
    lines.append("the thread hand-off benchmark is not in this run, so there is nothing to compare with.")
else:
    others = {b: ns for b, ns in costs.items() if b not in ("thread", "process_pipe")}
    lines.append(f"1. One OS-thread hand-off took {num(thread_ns)} ns. In that time: "
                 + ", ".join(f"{num(thread_ns / ns)} {b} switches" for b, ns in sorted(others.items(),
                                                                                       key=lambda kv: kv[1]))
                 + "." if others else "1. No coroutine benchmark ran to compare with.")
    if not per_request.empty:
        share = per_request.assign(
            switch_us_per_req=per_request.ctx_per_req * thread_ns / 1000,
            share_of_cpu=per_request.ctx_per_req * thread_ns / 1000 / per_request.cpu_us_per_req)
        top = share.loc[share.share_of_cpu.idxmax()]
        low = share.loc[share.share_of_cpu.idxmin()]
        lines.append(f"2. At most {num(100 * top.share_of_cpu)}% for {top.variant} ({num(top.ctx_per_req)} switches "
                     f"× {num(thread_ns / 1000)} µs = {num(top.switch_us_per_req)} µs of its "
                     f"{num(top.cpu_us_per_req)} µs per request); {num(100 * low.share_of_cpu)}% for {low.variant}"
                     + (", whose loop wakes up once for many requests." if low.ctx_per_req < 0.5 else ".")
                     + " The rest of the CPU goes to the system calls and the code that handle each request.")
    else:
        share = pd.DataFrame()
common.answer(*lines)
if thread_ns is not None and not share.empty:
    common.table(share[["variant", "ctx_per_req", "switch_us_per_req", "cpu_us_per_req", "share_of_cpu"]])
common.table(pd.DataFrame([vars(claims.switch_claim(run))]))
