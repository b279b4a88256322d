"""The trade-off experiments (pool_sizing, message_sizes, m_to_n): their rules, their findings, a tiny real run."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from conclab import servers as variants
from conclab.analysis import findings, report, tradeoffs
from conclab.analysis.results import load_run
from conclab.experiments import m_to_n, message_sizes, pool_sizing, registry
from conclab.experiments.harness.profiles import TINY
from conclab.experiments.harness.tables import COLUMNS
from conclab.servers import processes
from conclab.servers.protocol import DEFAULT_MAX_FRAME

NAMES = ("pool_sizing", "message_sizes", "m_to_n")
POOL, POOL_REQUEST = variants.VARIANTS["threadpool"], variants.VARIANTS["threadpool-request"]
ASYNCIO, THREADS = variants.VARIANTS["asyncio"], variants.VARIANTS["threads"]
BACKENDS = "threads,threadpool,threadpool-request,asyncio"
RUN_ID = "tradeoffs-tiny"


# -- the rules -------------------------------------------------------------------------------------

@pytest.mark.unit
def test_littles_law_bound_is_min_of_workers_and_connections_over_the_wait():
    assert pool_sizing.little_bound(POOL_REQUEST, 6, 1000, 10_000) == pytest.approx(600.0)
    assert pool_sizing.little_bound(POOL_REQUEST, 2048, 1000, 10_000) == pytest.approx(100_000.0)
    assert pool_sizing.little_bound(ASYNCIO, None, 1000, 10_000) == pytest.approx(100_000.0)


@pytest.mark.unit
def test_only_connection_dispatch_with_fewer_workers_than_connections_is_head_of_line():
    assert pool_sizing.dispatch(POOL) == "connection" and pool_sizing.dispatch(POOL_REQUEST) == "request"
    assert pool_sizing.head_of_line(POOL, 512, 1000)
    assert not pool_sizing.head_of_line(POOL, 2048, 1000)
    assert not pool_sizing.head_of_line(POOL_REQUEST, 2, 1000)
    assert not pool_sizing.head_of_line(ASYNCIO, None, 1000)
    note = pool_sizing.bound_note(pool_sizing.Case(POOL, 2), 1000, 2, True)
    assert note.startswith(pool_sizing.HEAD_OF_LINE) and "(2 of 1000)" in note


@pytest.mark.unit
def test_message_sizes_fit_the_default_max_frame():
    class Sizes:
        message_sizes = (64, DEFAULT_MAX_FRAME - 1, DEFAULT_MAX_FRAME)
    assert message_sizes.sizes(Sizes) == [64, DEFAULT_MAX_FRAME - 1]      # op byte + payload <= max frame
    assert message_sizes.mb_per_s(1000.0, 1_000_000) == pytest.approx(1000.0)
    assert message_sizes.mb_per_s(None, 64) is None


@pytest.mark.unit
def test_every_variant_has_a_documented_logical_unit():
    assert set(m_to_n.DESIGN) == set(variants.VARIANTS)
    assert m_to_n.unit_name(m_to_n.DESIGN["go"]) == "goroutines"
    assert m_to_n.units_per_thread(10_000, 4) == 2500 and m_to_n.units_per_thread(10, None) is None


@pytest.mark.unit
def test_the_registry_declares_them_outside_all_with_documented_tables():
    for name in NAMES:
        entry = registry.get(name)
        assert not entry.in_all and entry.load().NAME == name
        assert entry.tables[0].name == name and name in COLUMNS
    assert set(tradeoffs.TABLES) == set(NAMES)


# -- the findings, from frames with known answers ----------------------------------------------------

def pool_frame(rss_per_worker: float, plateau_rps: float) -> pd.DataFrame:
    """Medians as tradeoffs.pool_sizing gives them: request dispatch on the Little's-law line until the CPU
    caps it at ``plateau_rps``; RSS grows ``rss_per_worker`` KiB per worker; connection dispatch below 1000
    workers is head-of-line (invalid)."""
    rows = []
    for workers in (2, 6, 32, 128, 512, 2048):
        bound = min(workers, 1000) / 0.01
        rows.append({"variant": "threadpool-request", "load": "io", "workers": workers, "little_bound_rps": bound,
                     "throughput_rps": min(0.95 * bound, plateau_rps), "server_rss_kib": 20_000 + rss_per_worker
                     * workers, "ctx_per_req": 2.0 + 0.001 * workers, "server_threads": workers + 1,
                     "head_of_line": 0, "valid": True, "conns": 1000, "conns_served": 1000})
        rows.append({"variant": "threadpool", "load": "io", "workers": workers, "little_bound_rps": bound,
                     "throughput_rps": 0.9 * min(workers, 1000) / 0.01, "server_rss_kib": 20_000.0,
                     "ctx_per_req": 3.0, "server_threads": workers + 1, "head_of_line": int(workers < 1000),
                     "valid": workers >= 1000, "conns": 1000, "conns_served": min(workers, 1000),
                     "invalid_reason": None if workers >= 1000 else f"served {workers} of 1000 connections"})
    rows.append({"variant": "go", "load": "io", "workers": np.nan, "little_bound_rps": 100_000.0,
                 "throughput_rps": 20_000.0, "valid": True, "head_of_line": 0, "conns": 1000, "conns_served": 1000})
    return pd.DataFrame(rows)


@pytest.mark.unit
def test_pool_finding_finds_where_the_curve_leaves_the_bound_and_the_cost_per_worker():
    f = findings.pool_sizing(pool_frame(rss_per_worker=8.0, plateau_rps=5_000))
    facts = f.facts
    assert facts["threadpool-request.w"] == 32            # 3,040 rps of 3,200: on the line; at 128, 5,000 of 12,800
    assert facts["threadpool-request.w2"] == 128 and facts["threadpool-request.rps2"] == 5_000
    assert facts["threadpool-request.cost.kib"] == pytest.approx(8.0)
    assert facts["threadpool-request.cost.ctx"] == pytest.approx(0.001)
    assert "not every connection served" in f.text
    assert [facts[f"hol.size{i}"] for i in range(5)] == [2, 6, 32, 128, 512] and "hol.size5" not in facts
    assert facts["threadpool.w"] == 2048                  # its one valid size: the head-of-line ones are left out
    assert facts["beside.b_v"] == "go"


@pytest.mark.unit
def test_pool_finding_moves_with_the_data():
    f = findings.pool_sizing(pool_frame(rss_per_worker=2.0, plateau_rps=1_000_000))
    assert f.facts["threadpool-request.w"] == 2048 and "every size measured" in f.text
    assert f.facts["threadpool-request.cost.kib"] == pytest.approx(2.0)


@pytest.mark.unit
def test_pool_finding_does_not_claim_what_invalid_sizes_did_not_measure():
    frame = pool_frame(rss_per_worker=2.0, plateau_rps=1_000_000)
    large = (frame.variant == "threadpool-request") & (frame.workers > 128)
    frame.loc[large, "valid"] = False
    f = findings.pool_sizing(frame)
    assert f.facts["threadpool-request.w"] == 128
    assert [f.facts["threadpool-request.over0"], f.facts["threadpool-request.over1"]] == [512, 2048]
    assert "not measured here" in f.text


@pytest.mark.unit
def test_message_sizes_finding_ranks_requests_small_and_bytes_large():
    m = pd.DataFrame([{"variant": v, "size": s, "throughput_rps": rps, "mb_per_s": rps * s / 1e6, "valid": True}
                      for v, s, rps in (("go", 64, 50_000), ("asyncio", 64, 20_000), ("go", 1_048_575, 200),
                                        ("asyncio", 1_048_575, 300))])
    f = findings.message_sizes(m)
    assert f.facts["s_v"] == "go" and f.facts["l_v"] == "asyncio"
    assert f.facts["go.fall"] == pytest.approx(250.0)


@pytest.mark.unit
def test_m_to_n_finding_names_the_extremes():
    m = pd.DataFrame([{"variant": "threads", "logical_units": 200, "os_threads": 201, "units_per_thread": 200 / 201,
                       "logical_unit": m_to_n.DESIGN["threads"], "hold_target": 200},
                      {"variant": "asyncio", "logical_units": 200, "os_threads": 1, "units_per_thread": 200.0,
                       "logical_unit": m_to_n.DESIGN["asyncio"], "hold_target": 200},
                      {"variant": "threadpool", "logical_units": 6, "os_threads": 7, "units_per_thread": 6 / 7,
                       "logical_unit": m_to_n.DESIGN["threadpool"], "hold_target": 200, "held": 6,
                       "note": "server accepted 6 of 200"}]).fillna({"held": 200})
    f = findings.m_to_n(m)
    assert f.facts["hi_v"] == "asyncio" and f.facts["lo_v"] == "threads" and "Protocol objects" in f.text
    assert "threadpool held only 6 of 200" in f.text                  # not ranked on what it could not hold


# -- a tiny real run ------------------------------------------------------------------------------

def read(run_dir, table: str) -> pd.DataFrame:
    return pd.read_csv(run_dir / f"{table}.csv")


@pytest.mark.live
def test_tiny_pool_sizing_flags_head_of_line_and_stays_under_the_bound(tiny):
    code, run_dir, _ = tiny
    assert code == 0
    p = read(run_dir, "pool_sizing")
    assert list(p.columns) == list(COLUMNS["pool_sizing"])
    pools = p[p.variant.str.startswith("threadpool")]
    assert sorted(pools.workers.unique()) == sorted(TINY.pool_sizes) and set(p.load) == set(pool_sizing.LOADS)
    assert set(p[p.workers.isna()].variant) == {"asyncio"}                # threads is not among the models beside
    blocked = p[p.head_of_line == 1]
    assert set(blocked.variant) == {"threadpool"} and (blocked.workers < TINY.pool_conns).all()
    assert (blocked.valid == 0).all() and blocked.bound_note.str.startswith(pool_sizing.HEAD_OF_LINE).all()
    assert (blocked.conns_served < blocked.conns).all()
    io = p[(p.load == "io") & (p.valid == 1)]
    assert not io.empty
    assert (io.throughput_rps <= 1.1 * io.little_bound_rps).all()         # Little's law is a bound
    assert (io.little_bound_rps == io.workers.fillna(TINY.pool_conns).clip(upper=TINY.pool_conns) / 0.01).all()
    assert (p.server_threads > 0).all() and (p.server_rss_kib > 1000).all()


@pytest.mark.live
def test_tiny_message_sizes_and_m_to_n_measure_what_they_say(tiny):
    _, run_dir, _ = tiny
    m = read(run_dir, "message_sizes")
    assert sorted(m["size"].unique()) == sorted(TINY.message_sizes)
    assert np.allclose(m.mb_per_s, m.throughput_rps * m["size"] / 1e6, rtol=1e-4)
    mn = read(run_dir, "m_to_n").set_index("variant")
    served_at_once = mn.drop(index="threadpool")      # connection dispatch: the PINGs beyond its workers time out
    assert (served_at_once.held == TINY.mn_conns).all() and (served_at_once.note == "all held").all()
    pool = mn.loc["threadpool"]
    assert pool.held == TINY.mn_conns or f"server accepted {pool.held} of {TINY.mn_conns}" in pool.note
    assert mn.loc["threads", "os_threads"] > TINY.mn_conns                 # one OS thread per connection
    assert mn.loc["asyncio", "os_threads"] < 10 and mn.loc["asyncio", "logical_units"] == TINY.mn_conns
    assert mn.loc["threadpool-request", "os_threads"] <= mn.loc["threadpool-request", "workers"] + 5


@pytest.mark.live
def test_tiny_report_has_their_sections_charts_and_findings(tiny):
    _, run_dir, elapsed = tiny
    path, results = report.write(load_run(str(run_dir)))
    page = open(path, encoding="utf-8").read()
    for name in NAMES:
        assert f'id="{name}"' in page
        drawn = [r for r in results if r.name == name]
        assert drawn and drawn[0].files, name
    assert "not every connection served" in page
    assert processes.live_count() == 0
    assert elapsed < 120
