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
# # 1. What does an idle connection cost?
#
# The article this lab grew from (docs/article.md) says a goroutine starts with a stack of about
# **2 KB** while an OS thread costs about **1 MB**, so "one goroutine per connection" scales where
# "one thread per connection" cannot. Here we check that claim against measurements.
#
# **How it was measured** (the `memory` experiment): a fresh server of each backend holds N idle
# connections (each sent one PING, then stays silent); once the server has accepted them all, we read
# its memory. The least-squares slope of memory against N is the price of *one more* connection.
#
# Three ways to count a process's memory:
#
# * **RSS** (resident set size): pages that are in RAM right now. This is what you pay for.
# * **USS** (unique set size): the part of RSS no other process shares.
# * **VMS** (virtual memory size): address space *reserved*, used or not. A new thread's stack is
#   reserved here in full (8 MiB by default on Linux), but only the pages the thread touches become
#   resident.
#
# None of the three counts what the **kernel** allocates for a connection: the socket itself (a
# `tcp_sock`, an inode, a dentry, a file, epoll entries: *slab*), the socket's buffers, one kernel
# stack per thread, the page tables of what the process maps. That is measured separately (a
# section below): /proc/meminfo and /proc/net/sockstat before the connections are opened and while they
# are held, less the load generator's end of each connection (it runs on the same machine).

# %%
import pandas as pd

import common
from conclab.analysis import charts, claims, derive, findings, tables
from conclab.analysis.fmt import num

run = common.load()
common.describe(run)
points = derive.memory_points(run)       # median per (variant, N)
slopes = derive.memory_slopes(run)       # one row per variant: KiB per connection of RSS, USS, VMS, fit quality
split = derive.memory_kernel(run)        # one row per variant: process RSS + kernel parts per connection

# %% [markdown]
# ## Predict, then run
#
# Before the charts: what will one more idle connection cost **on this machine**? `threads` gives
# each connection an OS thread; `gevent` gives it a greenlet, a coroutine whose stack lives on the
# heap while it waits, all of them on one OS thread.
#
# **Question:** how many KiB of RAM (RSS) will one more idle connection add with `threads`, and with
# `gevent`? Write your two numbers into the next cell, for example `{"threads": 1024, "gevent": 2}`.

# %%
prediction = None          # {"threads": KiB, "gevent": KiB}: RSS per idle connection

# %% [markdown]
# The next cell runs `conclab run memory --backends threads,gevent --profile quick --repeat 1` in a
# subprocess (the servers never enter this notebook's kernel; the results go to a temporary
# directory): a fresh server of each holds 0, then 10,000 idle connections, and the slope between the
# two is the price of one. One round, so its spread is a single value. It took 35 s here (2 cores,
# shared and busy at the time).

# %%
exercise = common.run_exercise("memory", "threads,gevent", repeat=1, run_id="memory")

# %% tags=["answer"] jupyter={"source_hidden": true}
ran = common.result_of(exercise, "memory")
if ran is not None:
    common.check(prediction, common.measured(derive.memory_slopes(ran), "rss_kib"), "KiB")
    common.note("The rest of this notebook explains the gap, with the committed run: RSS against the reserved "
                "address space (the '1 MB'), and the kernel's memory, which RSS does not count.")

# %% [markdown]
# ## Memory as connections pile up
#
# Dots are the measured RSS, solid lines the least-squares line through them (how far a dot is off
# its line is its residual), dashed lines USS. A steep line is an expensive connection; the height at
# 0 is the empty server (a Python interpreter with its libraries, or a Go binary). With only two
# points (N = 0 and one N) the line goes through both exactly: there is no r² to judge it by.

# %%
if points.empty:
    common.missing("memory (the idle-connection sweep)")
else:
    growth = findings.memory_growth(points)
    common.chart(charts.draw_memory_rss, points, growth)
    common.finding(growth)

# %% [markdown]
# ## The price of one more connection
#
# The slope of each line above, as a bar. Compare the bars with the article's "2 KB" and "1 MB".

# %%
if slopes.empty:
    common.missing("memory (no per-connection fit)")
else:
    per_conn = findings.memory_per_conn(slopes)
    common.chart(charts.draw_memory_per_conn, slopes, per_conn)
    common.finding(per_conn)
    shown = tables.no_r2(slopes, "rss_r2", "rss_points")
    common.table(shown[["variant", *[c for c in tables.SLOPE_COLUMNS if c in shown]]]
                 .rename(columns=tables.SLOPE_COLUMNS))

# %% [markdown]
# ## What RSS does not count: the kernel's memory
#
# Per backend, one idle connection as a stacked bar: the process's RSS (the slope above), then what
# the kernel holds for it: **sockets** (TCP's socket buffer pages), **thread stacks** (a kernel stack
# per thread: only thread-per-connection models grow it), **slab** (the socket's kernel objects,
# epoll entries, a thread's task structures), **page tables**. The counters are the whole machine's,
# so the load generator's end of every connection is in them too: it is estimated with loopback
# pairs the harness opens itself (half a pair, plus an epoll entry) and subtracted.

# %%
if split.empty:
    common.note("**Not in this run:** kernel memory per connection (runs made before it was measured "
                "have only RSS, USS and VMS). Run `conclab run memory` to measure it.")
else:
    kernel = findings.memory_kernel(split)
    common.chart(charts.draw_memory_kernel, split, kernel)
    common.finding(kernel)
    shown = tables.no_r2(split, "kernel_r2", "kernel_points")
    common.table(shown[["variant", *tables.KERNEL_COLUMNS]].rename(columns=tables.KERNEL_COLUMNS))

# %% [markdown]
# ## Where does "1 MB per thread" come from?
#
# The `threads` backend starts one OS thread per connection. Left: its reserved address space (VMS)
# and its RAM (RSS) as connections grow. Right: the per-connection slopes on a log scale, with the
# article's two figures drawn as dashed lines.

# %%
thread_finding = findings.thread_vms(slopes)
if not thread_finding.facts:
    common.missing(f"memory for the {derive.THREAD_VARIANT} backend")
else:
    common.chart(charts.draw_thread_vms, points, slopes, thread_finding)
    common.finding(thread_finding)

# %% [markdown]
# ## Question
#
# 1. The article says "a thread costs ~1 MB, a goroutine ~2 KB". In this run, how much **RAM** (RSS)
#    did one more idle connection add with `threads`, and with `go`? How much **address space** (VMS)
#    did one thread reserve? So which of the two numbers is the "1 MB" really about?
# 2. Say each server may use 1 GiB of RAM for idle connections. About how many could each backend
#    hold, going by its slope?
#
# Think about it with the charts above, then run the next cell.

# %% tags=["answer"] jupyter={"source_hidden": true}
GIB_KIB = 1024 ** 2
lines = []
by_variant = slopes.set_index("variant") if not slopes.empty else pd.DataFrame()
if derive.THREAD_VARIANT in by_variant.index:
    t = by_variant.loc[derive.THREAD_VARIANT]
    reserved = pd.notna(t.vms_kib) and t.vms_kib >= findings.VMS_RESERVED_KIB
    touched = t.rss_kib < findings.RSS_TOUCHED_KIB
    lines.append(f"threads: each connection added {num(t.rss_kib)} KiB of RSS"
                 + (f" and reserved {num(t.vms_kib / 1024)} MiB of VMS (its stack)" if pd.notna(t.vms_kib) else "")
                 + (". So the '1 MB' is reserved address space, not RAM: a thread's RAM was "
                    f"{num(100 * t.rss_kib / 1024)}% of 1 MiB here." if reserved and touched else
                    ". Here a thread did cost the order of 1 MB of RAM." if not touched else "."))
else:
    lines.append("threads was not measured in this run, so the '1 MB' side cannot be checked.")
if "go" in by_variant.index:
    g = by_variant.loc["go"]
    lines.append(f"go: each connection added {num(g.rss_kib)} KiB of RSS, {num(g.rss_kib / 2)}× the 2 KB "
                 "goroutine stack" + (": its user-space read buffer and the runtime's bookkeeping cost more than "
                                      "the stack itself." if g.rss_kib > 2 else "."))
else:
    lines.append("go was not measured in this run (see 'skipped' above), so the '2 KB' side cannot be checked.")
if not by_variant.empty and by_variant.rss_kib.notna().any():
    positive = by_variant.rss_kib[by_variant.rss_kib > 0]
    fits = (GIB_KIB / positive).sort_values(ascending=False)
    lines.append("Idle connections per GiB of RAM (1 GiB / RSS slope): "
                 + ", ".join(f"{v} ≈ {num(n)}" for v, n in fits.items()) + ".")
if not split.empty and split.total_kib.notna().any():
    totals = split.set_index("variant").total_kib
    per_gib = (GIB_KIB / totals[totals > 0]).sort_values(ascending=False)
    lines.append("Counting the kernel's memory too (1 GiB / (RSS + kernel) per connection): "
                 + ", ".join(f"{v} ≈ {num(n)}" for v, n in per_gib.items()) + ".")
    both = split.set_index("variant")[["rss_kib", "total_kib"]].dropna()
    both = both[(both.rss_kib > 0) & (both.total_kib > 0)]
    if not both.empty:
        over = (both.total_kib / both.rss_kib).sort_values(ascending=False)
        lines.append(f"Going by RSS alone overstates it most for {over.index[0]}: {num(over.iloc[0])}× as many "
                     f"connections as fit with the kernel counted.")
common.answer(*lines)
common.table(pd.DataFrame([vars(c) for c in claims.memory_claims(run)]))
