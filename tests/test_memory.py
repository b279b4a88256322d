"""The memory experiment's arithmetic and what the report says about it.

The fit (slope, intercept, r², residuals; no r² through 2 points), the kernel's
memory per connection from /proc readings (parse functions take the files' text),
the client end's estimate and its subtraction, and the sentences: kernel memory
is measured apart from RSS, never said to be in it.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conclab.analysis import charts, claims, derive, findings, style, tables
from conclab.analysis.fmt import num
from conclab.analysis.results import Run
from conclab.experiments import holding, memory
from conclab.experiments.harness.tables import COLUMNS

ROOT = Path(__file__).resolve().parent.parent

MEMINFO = """MemTotal:       24684096 kB
MemFree:        23683072 kB
Slab:             {slab} kB
SReclaimable:     {srec} kB
SUnreclaim:        {sunr} kB
KernelStack:        {stack} kB
PageTables:         3444 kB
"""
SOCKSTAT = """sockets: used 37
TCP: inuse 19 orphan 4 tw {tw} alloc {alloc} mem {mem}
UDP: inuse 0 mem 0
"""
STATUS = "Name:\tpython\nVmRSS:\t   26568 kB\nVmPTE:\t     {pte} kB\nThreads:\t{threads}\n"
LOADAVG = "0.52 0.58 0.59 4/{tasks} 27251\n"


def reading(slab, srec, stack, mem, tw=0, pte=None, alloc=19, tasks=161, threads=1, page_kib=4.0) -> dict:
    """A holding.read_kernel-style reading built from /proc texts."""
    out = {**holding.parse_meminfo(MEMINFO.format(slab=slab, srec=srec, sunr=slab - srec, stack=stack)),
           **holding.parse_sockstat(SOCKSTAT.format(tw=tw, mem=mem, alloc=alloc), page_kib=page_kib),
           **holding.parse_loadavg(LOADAVG.format(tasks=tasks))}
    if pte is not None:
        out.update(holding.parse_status(STATUS.format(pte=pte, threads=threads)))
    return out


# -- parsing /proc --------------------------------------------------------------------------------

def test_parse_meminfo_sockstat_and_vm_pte():
    assert holding.parse_meminfo(MEMINFO.format(slab=168396, srec=125992, sunr=42404, stack=1928)) == {
        "slab_kib": 168396, "sreclaimable_kib": 125992, "sunreclaim_kib": 42404, "stack_kib": 1928}
    tcp = holding.parse_sockstat(SOCKSTAT.format(tw=41736, mem=1096, alloc=20013), page_kib=4.0)
    assert tcp == {"sock_kib": 1096 * 4.0, "time_wait": 41736, "tcp_alloc": 20013}   # "mem" is in pages
    assert holding.parse_sockstat(SOCKSTAT.format(tw=1, mem=10, alloc=1), page_kib=16.0)["sock_kib"] == 160.0
    assert holding.parse_status(STATUS.format(pte=152, threads=10001)) == {"pte_kib": 152, "threads": 10001}
    assert holding.parse_status("Name:\tx\n") == {}
    assert holding.parse_loadavg(LOADAVG.format(tasks=161)) == {"tasks": 161}
    assert holding.parse_meminfo("") == {} and holding.parse_sockstat("UDP: inuse 0\n") == {}
    assert holding.parse_loadavg("") == {}


def test_kernel_delta_per_connection_from_two_readings():
    before = reading(slab=100_000, srec=60_000, stack=2_000, mem=100, tw=500, pte=100)
    held = reading(slab=150_000, srec=70_000, stack=162_000, mem=350, tw=480, pte=40_100)
    delta = holding.kernel_delta(before, held)
    assert delta == {"kernel_sock_kib": 250 * 4.0, "kernel_stack_kib": 160_000, "kernel_slab_kib": 50_000,
                     "kernel_sreclaimable_kib": 10_000, "kernel_sunreclaim_kib": 40_000, "kernel_pte_kib": 40_000,
                     "time_wait_delta": -20}
    assert set(delta) <= set(COLUMNS["memory"])
    n = 10_000                                           # per connection: what memory.fit_values divides by (slope)
    assert delta["kernel_stack_kib"] / n == 16.0 and delta["kernel_slab_kib"] / n == 5.0
    partial = holding.kernel_delta({"slab_kib": 1.0}, {"slab_kib": 3.0})
    assert partial["kernel_slab_kib"] == 2.0 and partial["kernel_sock_kib"] is None


def test_other_activity_is_what_the_connections_held_do_not_explain():
    before = reading(slab=1, srec=0, stack=1, mem=1, pte=100, alloc=500, tasks=161, threads=1)
    held = reading(slab=1, srec=0, stack=1, mem=1, pte=100, alloc=20_530, tasks=10_163, threads=10_001)
    other = holding.other_activity(before, held, own_sockets=2 * 10_000)       # both ends of 10,000 connections
    assert other == {"other_sockets_delta": 30, "other_tasks_delta": 2}        # 30 sockets, 2 tasks not ours
    assert holding.other_activity(before, held, 2 * 10_000, own_tasks=2)["other_tasks_delta"] == 0   # the generator
    assert holding.other_activity({}, held, 0) == {"other_sockets_delta": None, "other_tasks_delta": None}
    assert memory.other_kib(time_wait=-400, other_sockets=30, other_tasks=2) == pytest.approx(
        400 * memory.TIME_WAIT_KIB + 30 * memory.OTHER_SOCKET_KIB + 2 * memory.OTHER_TASK_KIB)
    assert not memory.activity_disturbed(10_000, time_wait=400, other_sockets=30, other_tasks=2)
    assert memory.activity_disturbed(10_000, other_sockets=1200)               # 5.4 MiB > 0.5 KiB x 10,000
    assert memory.activity_disturbed(10_000, other_tasks=201)                  # 201 x 25 KiB
    assert memory.activity_disturbed(0, time_wait=-4200)                       # over the 1 MiB floor...
    assert not memory.activity_disturbed(0, other_tasks=10)                    # ...this is under it
    assert not memory.activity_disturbed(1000)                                 # nothing readable: not judged


def test_client_end_is_half_a_pair_plus_an_epoll_entry():
    pairs = 1000
    before = reading(slab=100_000, srec=60_000, stack=2_000, mem=100)
    opened = reading(slab=109_200, srec=63_000, stack=2_000, mem=150)     # 9.2 KiB slab, 0.2 KiB socket per pair
    polled = reading(slab=109_400, srec=63_000, stack=2_000, mem=150)     # +0.2 KiB slab per epoll registration
    end = memory.client_estimate(before, opened, polled, pairs)
    assert not memory.pairs_disturbed(reading(1, 0, 1, 1, alloc=19), reading(1, 0, 1, 1, alloc=2020),
                                      reading(1, 0, 1, 1, alloc=2020), pairs)   # 2 sockets a pair + the listener
    assert memory.pairs_disturbed(reading(1, 0, 1, 1, alloc=19), reading(1, 0, 1, 1, alloc=7020),
                                  reading(1, 0, 1, 1, alloc=7020), pairs)       # someone else opened 5,000
    assert memory.pairs_disturbed(reading(1, 0, 1, 1, tw=9000), reading(1, 0, 1, 1, alloc=2020),
                                  reading(1, 0, 1, 1, alloc=2020), pairs)       # 9,000 TIME_WAIT expired
    assert end["slab_kib"] == pytest.approx(9.2 / 2 + 0.2)
    assert end["sock_kib"] == pytest.approx(0.2 / 2)
    shrunk = reading(slab=99_000, srec=60_000, stack=2_000, mem=90)       # other processes freed more than we took
    assert memory.client_estimate(before, shrunk, shrunk, pairs) == {"slab_kib": 0.0, "sock_kib": 0.0}
    assert memory.client_estimate({}, opened, polled, pairs) == {"slab_kib": None, "sock_kib": None}
    assert memory.client_share({"slab_kib": 4.8, "sock_kib": 0.1}, 2000) == {
        "client_slab_kib": pytest.approx(9600), "client_sock_kib": pytest.approx(200)}
    assert memory.client_share({}, 2000) == {"client_slab_kib": None, "client_sock_kib": None}


# -- the fit ----------------------------------------------------------------------------------------

NOISE_KIB = (0.0, 300.0, -500.0, 200.0, 0.0)
POINTS = (0, 1000, 2500, 5000, 10_000)


def memory_rows(points=POINTS, noise=NOISE_KIB, *, rss_per_conn=20.0, client=(4.8, 0.1), tw=None, other=None) -> list:
    """Synthetic memory.csv rows of a thread-per-connection-like server: RSS 20 KiB/conn plus noise; kernel
    per connection: 16 KiB stack, 4 KiB page tables, slab 4.6 (server) + 4.8 (client), sockets 0.1 + 0.1."""
    rows = []
    for i, (n, e) in enumerate(zip(points, noise)):
        rows.append({"n_conns": n, "rss_kib": 26_000 + rss_per_conn * n + e, "uss_kib": 15_000 + 18 * n,
                     "vms_kib": 32_000 + 8196 * n, "threads": 1 + n, "fds": 4 + n,
                     "kernel_stack_kib": 16.0 * n, "kernel_pte_kib": 4.0 * n,
                     "kernel_slab_kib": (4.6 + client[0]) * n + e, "kernel_sock_kib": (0.1 + client[1]) * n,
                     "time_wait_delta": (tw or {}).get(i, 0), "other_sockets_delta": (other or {}).get(i, 3),
                     "other_tasks_delta": 1,
                     **memory.client_share({"slab_kib": client[0], "sock_kib": client[1]}, n)})
    return rows


def by_metric(rows: list) -> dict:
    return {row["metric"]: row for row in memory.fit_rows(rows)}


def test_fit_through_five_points_has_slope_r2_and_residuals():
    fits = by_metric(memory_rows())
    rss = fits["rss_kib"]
    assert rss["n_points"] == 5 and rss["unit"] == "KiB/conn"
    assert rss["per_conn"] == pytest.approx(20.0, abs=0.1)
    assert 0.99 < rss["r2"] < 1.0                                    # the noise shows: not 1 by construction
    residuals = [tuple(map(float, part.split(":"))) for part in rss["residuals"].split(";")]
    assert [n for n, _ in residuals] == list(POINTS)
    xs, ys = np.array(POINTS, dtype=float), np.array([26_000 + 20 * n + e for n, e in zip(POINTS, NOISE_KIB)])
    slope, intercept = np.polyfit(xs, ys, 1)
    expected = ys - (slope * xs + intercept)
    assert [r for _, r in residuals] == pytest.approx(list(expected), abs=0.01)
    assert rss["max_abs_residual"] == pytest.approx(np.abs(expected).max())
    assert rss["intercept"] == pytest.approx(intercept)
    exact = by_metric(memory_rows(noise=(0,) * 5))["rss_kib"]
    assert exact["r2"] == pytest.approx(1.0) and exact["max_abs_residual"] == pytest.approx(0, abs=1e-6)


def test_two_points_give_no_r2_and_no_residuals():
    fits = by_metric(memory_rows(points=(0, 10_000), noise=(0.0, 700.0)))
    rss = fits["rss_kib"]
    assert rss["n_points"] == 2 and rss["per_conn"] == pytest.approx(20.07)
    assert rss["r2"] is None and rss["max_abs_residual"] is None and rss["residuals"] is None


def test_kernel_fits_subtract_the_client_end_and_add_up():
    fits = by_metric(memory_rows())
    assert fits["kernel_stack_kib"]["per_conn"] == pytest.approx(16.0)
    assert fits["kernel_pte_kib"]["per_conn"] == pytest.approx(4.0)
    assert fits["kernel_slab_kib"]["per_conn"] == pytest.approx(4.6, abs=0.1)    # 9.4 both ends - 4.8 client
    assert fits["kernel_sock_kib"]["per_conn"] == pytest.approx(0.1)
    assert fits["client_kib"]["per_conn"] == pytest.approx(4.9)
    parts = sum(fits[m]["per_conn"] for m in memory.SERVER_KERNEL)
    assert fits["kernel_kib"]["per_conn"] == pytest.approx(parts)
    assert fits["kernel_both_kib"]["per_conn"] == pytest.approx(parts + fits["client_kib"]["per_conn"])
    assert all(fits[m]["unit"] == "KiB/conn" for m in memory.KERNEL_FITS)


def test_a_point_disturbed_by_other_processes_is_left_out_of_the_kernel_fits():
    rows = memory_rows(tw={2: -7670})                    # 7,670 TIME_WAIT sockets expired while n=2500 was measured
    assert memory.disturbed(rows[2]) and not memory.disturbed(rows[3])
    fits = by_metric(rows)
    assert fits["rss_kib"]["n_points"] == 5 and fits["kernel_kib"]["n_points"] == 4
    assert "2500:" not in fits["kernel_kib"]["residuals"] and "2500:" in fits["rss_kib"]["residuals"]
    busy = by_metric(memory_rows(other={3: 20_000, 4: -3000}))   # someone else's 20,000 sockets at n=5000...
    assert busy["kernel_kib"]["n_points"] == 3 and busy["rss_kib"]["n_points"] == 5
    only_one = by_metric(memory_rows(points=(0, 10_000), noise=(0, 0), tw={1: 30_000}))
    assert only_one["kernel_kib"].get("per_conn") is None
    assert only_one["kernel_kib"]["n_points"] == 1 and only_one["rss_kib"]["per_conn"] == pytest.approx(20)


# -- the report: a synthetic run ----------------------------------------------------------------------

def synthetic_run(variants: dict, points=POINTS, old_style: bool = False) -> Run:
    """A Run whose memory and memory_fit tables come from memory.fit_rows over memory_rows, one repeat
    per variant; ``old_style``: memory_fit as an older harness wrote it (r² 1 through 2 points, no residuals)."""
    mem, fit = [], []
    for variant, kwargs in variants.items():
        noise = NOISE_KIB if len(points) == len(NOISE_KIB) else (0.0, 700.0, 0.0)[:len(points)]
        rows = memory_rows(points, noise, **kwargs)
        for row in rows:
            mem.append({"run_id": "synthetic", "experiment": "memory", "backend": variant, "variant": variant,
                        "repeat": 1, "n_target": row["n_conns"], **row})
        for row in memory.fit_rows(rows):
            if old_style:
                row = {**row, "r2": 1.0, "max_abs_residual": None, "residuals": None}
            fit.append({"run_id": "synthetic", "experiment": "memory", "backend": variant, "variant": variant,
                        "repeat": 1, **row})
    frames = {name: pd.DataFrame(columns=list(columns)) for name, columns in COLUMNS.items()}
    frames["memory"] = pd.DataFrame(mem).reindex(columns=list(COLUMNS["memory"]))
    frames["memory_fit"] = pd.DataFrame(fit).reindex(columns=list(COLUMNS["memory_fit"]))
    for name in ("memory", "memory_fit"):
        for column in frames[name]:
            if column not in ("run_id", "experiment", "backend", "variant", "metric", "unit", "residuals"):
                frames[name][column] = pd.to_numeric(frames[name][column], errors="coerce")
    return Run(path="synthetic", manifest={"run_id": "synthetic", "status": "complete"}, tables=frames)


TWO_MODELS = {"threads": {}, "epoll": {"rss_per_conn": 1.0}}


def test_report_says_two_points_give_no_r2():
    for old_style in (False, True):                      # a new run (r² empty) and an older one (r² = 1 written)
        run = synthetic_run(TWO_MODELS, points=(0, 10_000), old_style=old_style)
        slopes = derive.memory_slopes(run)
        assert slopes.rss_r2.isna().all() and (slopes.rss_points == 2).all()
        f = findings.memory_per_conn(slopes)
        assert "2 points: no r²" in f.text and "unexplained" not in f.text
        table = dict(tables.memory(run))["Per-connection slopes (least squares, median over repeats)"]
        assert set(table["RSS fit r²"]) == {"2 points: no r²"}
        points = derive.memory_points(run)
        assert points.rss_r2.isna().all()


def test_report_gives_r2_and_residual_with_five_points():
    run = synthetic_run(TWO_MODELS)
    slopes = derive.memory_slopes(run).set_index("variant")
    fits = by_metric(memory_rows())
    assert slopes.loc["threads", "rss_r2"] == pytest.approx(fits["rss_kib"]["r2"])
    assert slopes.loc["threads", "rss_max_residual_kib"] == pytest.approx(fits["rss_kib"]["max_abs_residual"])
    f = findings.memory_per_conn(derive.memory_slopes(run))
    assert "no r²" not in f.text and "of the variance unexplained" in f.text
    assert f.facts["fit.r2"] == pytest.approx(min(slopes.rss_r2))
    assert f.facts["fit.unexplained"] == pytest.approx(100 * (1 - min(slopes.rss_r2)))
    shown = re.findall(r"(?<![\w.²])-?\d+(?:,\d{3})*(?:\.\d+)?", f.text)            # every number is a fact's
    assert set(shown) <= {num(v) for v in f.numbers.values()}
    points = derive.memory_points(run)
    threads = points[points.variant == "threads"]
    line = threads.rss_fit_kib.to_numpy()
    assert line == pytest.approx(fits["rss_kib"]["intercept"] + fits["rss_kib"]["per_conn"] * threads.n_conns)
    assert not np.allclose(line, threads.rss_kib)                     # the residuals are there to see


def test_memory_kernel_split_adds_process_and_kernel():
    split = derive.memory_kernel(synthetic_run(TWO_MODELS)).set_index("variant")
    threads = split.loc["threads"]
    assert threads.rss_kib == pytest.approx(20.0, abs=0.1)
    assert threads.kernel_stack_kib == pytest.approx(16.0) and threads.kernel_pte_kib == pytest.approx(4.0)
    assert threads.kernel_kib == pytest.approx(sum(threads[p] for p in derive.KERNEL_PARTS))
    assert threads.total_kib == pytest.approx(threads.rss_kib + threads.kernel_kib)
    assert threads.kernel_both_kib == pytest.approx(threads.kernel_kib + threads.client_kib)
    assert list(derive.MEMORY_PARTS.values()) == ["process RSS", "kernel: sockets", "kernel: thread stacks",
                                                  "kernel: slab", "kernel: page tables"]
    old = synthetic_run(TWO_MODELS, old_style=True)
    old.tables["memory_fit"] = old.tables["memory_fit"][~old.tables["memory_fit"].metric.str.startswith(
        ("kernel", "client"))]
    assert derive.memory_kernel(old).empty                           # a run from before: nothing to split
    assert not findings.memory_kernel(derive.memory_kernel(old)).facts


def test_a_variant_without_a_kernel_line_is_named_not_drawn():
    run = synthetic_run({"threads": {}, "epoll": {"rss_per_conn": 1.0, "other": {0: 5000}}}, points=(0, 10_000))
    split = derive.memory_kernel(run).set_index("variant")
    assert np.isnan(split.loc["epoll", "kernel_kib"]) and split.loc["epoll", "kernel_points"] == 1
    f = findings.memory_kernel(split.reset_index())
    assert "epoll: no kernel line, 1 of 2 points" in f.text and f.facts["hi"] == f.facts["lo"] == "threads"
    with style.context():
        fig = charts.draw_memory_kernel(split.reset_index(), f)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["threads"]


def test_kernel_sentence_says_kernel_memory_is_not_in_rss():
    split = derive.memory_kernel(synthetic_run(TWO_MODELS))
    f = findings.memory_kernel(split)
    assert "in no process's RSS" in f.text and "measured apart" in f.text
    assert re.search(r"less the load generator's end of each connection", f.text)
    by = split.set_index("variant")
    assert f.facts["hi"] == "threads" and f.facts["hi_total"] == pytest.approx(by.loc["threads", "total_kib"])
    assert f.facts["hi_rss"] + f.facts["hi_kernel"] == pytest.approx(f.facts["hi_total"])
    assert f.facts["lo"] == "epoll" and f.facts["lo_total"] == pytest.approx(by.loc["epoll", "total_kib"])
    assert f.facts["stack"] == pytest.approx(16.0)                    # threads' kernel stacks, named as such
    assert "kernel stack" in f.text
    shown = re.findall(r"(?<![\w.²/])-?\d+(?:,\d{3})*(?:\.\d+)?", f.text)           # every number is a fact's
    assert set(shown) <= {num(v) for v in f.numbers.values()}


def test_go_claim_no_longer_puts_socket_buffers_in_rss():
    run = synthetic_run({"go": {"rss_per_conn": 9.0}, "threads": {}})
    go = next(c for c in claims.memory_claims(run) if "goroutine" in c.claim)
    assert "socket buffers, read buffer)" not in go.measured
    assert "kernel memory, not in RSS" in go.measured
    thread = next(c for c in claims.memory_claims(run) if "OS thread" in c.claim)
    assert "KiB of kernel stack" in thread.measured


def test_no_text_puts_socket_buffers_in_process_memory():
    """Every mention of socket buffers in the report's code, the notebooks and the docs says they are the kernel's."""
    files = [*ROOT.glob("analysis/*.py"), *ROOT.glob("notebooks/*.py"), *ROOT.glob("docs/*.md")]
    for path in files:
        text = re.sub(r"[\s#]+", " ", path.read_text(encoding="utf-8"))
        for match in re.finditer(r"socket(?:'s)? buffer", text, re.IGNORECASE):
            window = text[max(0, match.start() - 200):match.end() + 200]
            assert "kernel" in window.lower(), f"{path.name}: ...{window}..."


def test_charts_draw_the_line_through_the_points_and_the_split():
    run = synthetic_run(TWO_MODELS)
    points = derive.memory_points(run)
    with style.context():
        fig = charts.draw_memory_rss(points, findings.memory_growth(points))
    ax = fig.axes[0]
    threads = points[points.variant == "threads"].sort_values("n_conns")
    drawn = [line for line in ax.lines if len(line.get_xdata()) == len(threads)]
    ys = [np.asarray(line.get_ydata(), dtype=float) for line in drawn]
    assert any(np.allclose(y, threads.rss_fit_kib / 1024) for y in ys)          # the fitted line...
    assert any(np.allclose(y, threads.rss_kib / 1024) and line.get_linestyle() == "None"
               for y, line in zip(ys, drawn))                                    # ...and the points, unjoined
    assert any("r² " in text.get_text() for text in ax.get_legend().get_texts())
    split = derive.memory_kernel(run)
    with style.context():
        fig = charts.draw_memory_kernel(split, findings.memory_kernel(split))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0].startswith("process RSS") and labels[1:] == ["kernel: sockets", "kernel: thread stacks",
                                                                  "kernel: slab", "kernel: page tables"]
    widths = [patch.get_width() for patch in fig.axes[0].patches]
    assert sum(widths) == pytest.approx(split[list(derive.MEMORY_PARTS)].clip(lower=0).to_numpy().sum())


# -- the client end, for real -------------------------------------------------------------------------

@pytest.mark.slow
def test_loopback_pairs_are_connected_and_measured():
    with memory.loopback_pairs(5) as pairs:
        assert len(pairs) == 5
        client, accepted = pairs[0]
        assert client.getpeername() == accepted.getsockname()
    assert client.fileno() == -1 and accepted.fileno() == -1               # closed on the way out
    end, busy = memory.measure_pairs(300)
    assert set(end) == {"sock_kib", "slab_kib"} and busy in (True, False)
    assert all(value is not None and value >= 0 for value in end.values())


def test_kernel_share_is_ranked_only_where_its_intervals_separate():
    split = derive.memory_kernel(synthetic_run(TWO_MODELS))
    separated = findings.memory_kernel(split)
    assert "largest with epoll" in separated.text and "tie" not in separated.text
    close = split.assign(rss_kib=[20.0, 18.0], kernel_kib_min=[10.0, 10.0], kernel_kib_max=[40.0, 40.0])
    close = close.assign(total_kib=close.rss_kib + close.kernel_kib)
    tied = findings.memory_kernel(close)
    assert "a tie within noise with threads" in tied.text
