"""The redis_call experiment: a Redis round trip per request against the memory store, per model.

Unit: Little's-law pool size from a synthetic measurement, the store counters
and the store-error flag, the paired costs and their verdicts (a tie said as a
tie). Live: ``conclab run redis_call --profile tiny`` on go, an event loop and
the request-dispatch pool (their servers take --rate-limit-store) writes its
table with every column, a row per store, Redis's CPU and its CPUs, and the
report renders its section, chart and finding.
"""
from __future__ import annotations

import csv
import html
import math

import pandas as pd
import pytest
from conclab.analysis import redis_cost, report
from conclab.analysis.results import load_run
from conclab.experiments import redis_call, registry
from conclab.experiments.harness.profiles import TINY
from conclab.experiments.harness.tables import COLUMNS
from conclab.servers import VARIANTS, processes

NAMES = ("redis_call",)
BACKENDS = "go,asyncio,threadpool-request"
RUN_ID = "redis-call-tiny"
POOL, POOL_REQUEST = VARIANTS["threadpool"], VARIANTS["threadpool-request"]


# -- the rules -------------------------------------------------------------------------------------

@pytest.mark.unit
def test_littles_law_pool_size_from_a_synthetic_measurement():
    # 10,000 rps to keep, 40 us of service and a 160 us round trip: 10,000 x 200 us = 2 workers busy at once
    assert redis_call.little_workers(10_000, 40.0, 160.0, conns=50) == 2
    assert redis_call.little_workers(10_000, 40.0, 161.0, conns=50) == 3            # rounded up
    assert redis_call.little_workers(1e6, 40.0, 160.0, conns=50) == 50              # never more than in flight
    assert redis_call.little_workers(10, 1.0, 1.0, conns=50) == 1                   # at least one
    assert redis_call.little_workers(None, 40.0, 160.0, conns=50) is None
    assert redis_call.little_workers(10_000, 40.0, None, conns=50) is None
    assert redis_call.pool_workers(POOL_REQUEST, 2, 50) == 2
    assert redis_call.pool_workers(POOL, 2, 50) == 50 + redis_call.CONTROL_CONNS  # a worker per connection
    assert redis_call.pool_workers(POOL, None, 50) == 50 + redis_call.CONTROL_CONNS   # whatever the measurement
    assert redis_call.pool_workers(POOL_REQUEST, None, 50) is None


@pytest.mark.unit
def test_store_counts_are_deltas_and_store_errors_flag_the_point():
    counts = redis_call.store_counts({"rate_store_calls": 10, "rate_store_errors": 1},
                                     {"rate_store_calls": 110, "rate_store_errors": 4})
    assert counts == {"rate_store_calls": 100, "rate_store_errors": 3}
    assert redis_call.store_counts({}, {"rate_store_calls": 5})["rate_store_calls"] is None
    row = {"valid": True, "invalid_reason": None, "rate_store_errors": 3}
    redis_call.flag_store_errors(row)
    assert row["valid"] is False and "3 store errors" in row["store_flag"]
    assert row["store_flag"] in row["invalid_reason"]
    clean = {"valid": True, "rate_store_errors": 0}
    redis_call.flag_store_errors(clean)
    assert clean["valid"] is True and "store_flag" not in clean
    assert redis_call.redis_cost(1.0, 1.5, 10_000) == {"redis_cpu_s": 0.5, "redis_cpu_us_per_req": 50.0}
    assert redis_call.store_order(1) == ("redis", "memory") and redis_call.store_order(2) == ("memory", "redis")


def synthetic_run(cpu_redis: list, cpu_memory: list, rps_redis: list, rps_memory: list):
    """A loaded run whose redis_call table has one case (asyncio) over len(cpu_redis) rounds."""
    rows = []
    for repeat, values in enumerate(zip(cpu_redis, cpu_memory, rps_redis, rps_memory), start=1):
        for store, cpu, rps in (("redis", values[0], values[2]), ("memory", values[1], values[3])):
            rows.append({"variant": "asyncio", "backend": "asyncio", "repeat": repeat, "store": store,
                         "pool_size": None, "cpu_us_per_req": cpu, "ctx_per_req": 0.1, "throughput_rps": rps,
                         "p50_us": 100.0, "p99_us": 900.0, "valid": 1, "invalid_reason": None,
                         "rate_store_calls": 1000 if store == "redis" else 0, "rate_store_errors": 0,
                         "redis_cpu_us_per_req": 30.0 if store == "redis" else None,
                         "redis_shares_loadgen_cpu": 1, "loadgen_saturated": 0})

    class Loaded:
        def __init__(self) -> None:
            self.tables = {"redis_call": pd.DataFrame(rows)}
    return Loaded()


@pytest.mark.unit
def test_the_round_trip_cost_is_paired_per_round():
    run = synthetic_run([70, 80, 90], [20, 22, 24], [5000, 4000, 4500], [10_000, 10_000, 9000])
    frame = redis_cost.redis_call(run)
    row = frame.iloc[0]
    assert row.delta_cpu_us == pytest.approx(58) and row.delta_cpu_us_min == 50 and row.delta_cpu_us_max == 66
    assert row.ratio_rps == pytest.approx(0.5) and row.cpu_verdict == "higher" and row.rps_verdict == "lower"
    finding = redis_cost.finding(frame)
    assert finding.facts["most"] == pytest.approx(58) and "asyncio" in finding.title


@pytest.mark.unit
def test_a_cost_within_noise_is_said_to_be_a_tie():
    run = synthetic_run([20, 30, 19, 31], [25, 25, 25, 25], [9000, 11_000, 9500, 10_500], [10_000] * 4)
    frame = redis_cost.redis_call(run)
    assert frame.iloc[0].cpu_verdict == "tie" and frame.iloc[0].rps_verdict == "tie"
    text = redis_cost.finding(frame).text
    assert "within noise" in text and "tie within noise for asyncio" in text


@pytest.mark.unit
def test_the_registry_declares_it_outside_all_with_a_documented_table():
    entry = registry.get("redis_call")
    assert not entry.in_all and entry.load().NAME == "redis_call" and entry.tables[0].name in COLUMNS
    assert "redis_call" in report.MAKERS and TINY.redis_rtt_calls > 0


# -- a tiny run, end to end ------------------------------------------------------------------------

@pytest.mark.live
def test_tiny_run_writes_a_row_per_store_with_every_column(tiny):
    code, run_dir, _ = tiny
    assert code == 0
    with open(run_dir / "redis_call.csv", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS["redis_call"]
        rows = list(reader)
    stores = {(r["variant"], r["store"], r["pool_size"]) for r in rows}
    for variant in BACKENDS.split(","):
        sizes = ("default", "little") if VARIANTS[variant].is_pool else ("",)
        for size in sizes:
            assert {(variant, "redis", size), (variant, "memory", size)} <= stores, (variant, size)
    for r in rows:
        redis_side = r["store"] == "redis"
        assert r["redis_cpus"] and r["redis_shares_loadgen_cpu"] == "1"
        assert float(r["redis_rtt_us"]) > 0 and r["cpu_us_per_req"] and r["ctx_per_req"] and r["server_threads"]
        assert (int(r["rate_store_calls"]) >= int(r["requests"])) if redis_side else r["rate_store_calls"] == "0"
        assert r["rate_store_errors"] == "0" or r["store_flag"]
        assert r["redis_cpu_us_per_req"] != "" or not redis_side
    little = [r for r in rows if r["pool_size"] == "little"]
    rtt = float(little[0]["redis_rtt_us"])
    expected = math.ceil(float(little[0]["little_rate_rps"]) * (float(little[0]["little_service_us"]) + rtt) * 1e-6)
    assert int(little[0]["little_workers"]) == max(1, min(TINY.reference_conns, expected))


@pytest.mark.live
def test_tiny_report_renders_its_section_chart_and_finding(tiny):
    _, run_dir, elapsed = tiny
    path, results = report.write(load_run(str(run_dir)))
    with open(path, encoding="utf-8") as f:
        page = html.unescape(f.read())
    assert 'id="redis_call"' in page
    drawn = [r for r in results if r.name == "redis_call"]
    assert drawn and drawn[0].files and drawn[0].finding.facts.get("most") is not None
    assert "Redis round trip per request" in page and "Little's law per pool" in page
    assert processes.live_count() == 0
    assert elapsed < 120
