"""Soak and overload (reliability/soak.py, reliability/overload.py) and their place in the report.

The unit tests feed the verdict logic synthetic samples (a flat server passes; each way of
failing fails with its one-line reason) and draw the report's reliability section from a
fixture run directory (tests/fixtures/reliability: the files of a real ``conclab check --soak 20
--overload-seconds 3 --scenarios max_frame,loopback,half_close --backends epoll,go``).

The live tests soak and overload every variant at the CI sizes, set in one place each:
``soak.CI_SECONDS`` (20 s: a warm-up quarter of 5 s, then 15 one-second samples for the slope;
about 30 s per variant with the capacity run and the settling) and ``overload.CI_SECONDS`` (5 s per
factor; about 40 s per variant with capacity, the normal p99 and two recovery windows).
``CONCLAB_FULL=1`` runs the soak for ``soak.FULL_SECONDS`` and the overload for
``overload.FULL_SECONDS``. Both carry the ``slow`` marker.
"""
from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from conclab.analysis import report, tables
from conclab.analysis.results import Run
from conclab.reliability import cli as check_cli
from conclab.reliability import overload, soak

FIXTURE = Path(__file__).parent / "fixtures" / "reliability"
SIZE = soak.SoakSize(seconds=20.0)          # warm-up: the first 5 s


def samples(n: int = 20, rss_kib=lambda t: 30_000, fds=lambda t: 107, threads=lambda t: 4,
            close_wait=lambda t: 0, p99=lambda t: 500) -> list:
    """One synthetic sample a second; every gauge a function of the second."""
    return [{"t_s": float(t), "rss_kib": rss_kib(t), "fds": fds(t), "threads": threads(t),
             "close_wait": close_wait(t), "latencies": Counter({100: 98, p99(t): 2})} for t in range(n)]


TOTALS = {"lost": 0, "fds_baseline": 7, "fds_after": 7, "close_wait_after": 0}


def failed(verdicts) -> dict:
    return {v.criterion: v.reason for v in verdicts if not v.passed}


# -- arithmetic ------------------------------------------------------------------------------------
def test_slope_interval_of_an_exact_line_is_the_line():
    slope, low, high = soak.slope_interval([0, 1, 2, 3, 4], [5, 8, 11, 14, 17])
    assert slope == pytest.approx(3.0)
    assert low == pytest.approx(3.0) and high == pytest.approx(3.0)


def test_slope_interval_covers_zero_for_noise_and_not_for_growth():
    noise = [0, 4, -3, 2, -1, 3, -4, 1, 0, -2]
    _, low, high = soak.slope_interval(list(range(10)), noise)
    assert low < 0 < high
    _, low, high = soak.slope_interval(list(range(10)), [10 * t + e for t, e in enumerate(noise)])
    assert 8 < low < 10 < high < 12


def test_slope_interval_needs_three_samples():
    with pytest.raises(ValueError):
        soak.slope_interval([0, 1], [1, 2])


def test_t_quantile_approaches_the_normal_and_is_wider_for_few_samples():
    assert soak.t_quantile(10_000) == pytest.approx(1.96, abs=0.001)
    assert soak.t_quantile(10) == pytest.approx(2.228, abs=0.01)        # Student's t table
    assert soak.t_quantile(3) > soak.t_quantile(10)


def test_percentile_of_counts():
    counts = Counter({1: 98, 50: 1, 900: 1})
    assert soak.percentile(counts, 50) == 1
    assert soak.percentile(counts, 99) == 50
    assert soak.percentile(counts, 100) == 900
    assert soak.percentile(Counter(), 99) is None


# -- the verdict -----------------------------------------------------------------------------------
def test_a_steady_server_passes_every_criterion():
    verdicts = soak.judge(samples(), SIZE, TOTALS)
    assert failed(verdicts) == {}
    assert {v.criterion for v in verdicts} == {"RSS slope", "fds", "threads", "CLOSE_WAIT", "lost replies", "p99"}


def test_rss_growth_after_the_warm_up_fails_and_growth_in_it_does_not():
    leaking = soak.judge(samples(rss_kib=lambda t: 30_000 + 4 * t), SIZE, TOTALS)      # 4 KiB a second
    assert "RSS grows" in failed(leaking)["RSS slope"]
    warming = soak.judge(samples(rss_kib=lambda t: 30_000 + 100 * min(t, 4)), SIZE, TOTALS)
    assert "RSS slope" not in failed(warming)


def test_rss_bound_scales_with_the_connections_held():
    # 1 KiB per minute per 1,000 connections: 2,000 B/min grows past it with 100 connections, not with 10,000
    growth = samples(rss_kib=lambda t: 30_000 + (t * 2_000 / 60) / 1024)
    assert "RSS slope" in failed(soak.judge(growth, soak.SoakSize(20.0, conns=100), TOTALS))
    assert "RSS slope" not in failed(soak.judge(growth, soak.SoakSize(20.0, conns=10_000), TOTALS))


def test_fds_that_creep_or_are_not_given_back_fail():
    assert "fds trend" in failed(soak.judge(samples(fds=lambda t: 107 + t), SIZE, TOTALS))["fds"]
    kept = soak.judge(samples(), SIZE, {**TOTALS, "fds_after": 9})
    assert failed(kept)["fds"] == "fds 7 before the load, 9 after it"


def test_threads_that_creep_fail_but_threads_kept_after_the_load_do_not():
    assert "threads" in failed(soak.judge(samples(threads=lambda t: 4 + t), SIZE, TOTALS))
    assert "threads" not in failed(soak.judge(samples(), SIZE, {**TOTALS, "threads_baseline": 2, "threads_after": 9}))


def test_close_wait_fails_when_it_stays_and_not_for_one_transient_sample():
    transient = soak.judge(samples(close_wait=lambda t: 1 if t in (3, 9) else 0), SIZE, TOTALS)
    assert "CLOSE_WAIT" not in failed(transient)
    stuck = soak.judge(samples(close_wait=lambda t: 2 if 10 <= t <= 12 else 0), SIZE, TOTALS)
    assert "consecutive samples" in failed(stuck)["CLOSE_WAIT"]
    left = soak.judge(samples(), SIZE, {**TOTALS, "close_wait_after": 1})
    assert "left after the load" in failed(left)["CLOSE_WAIT"]


def test_a_lost_reply_fails():
    verdicts = soak.judge(samples(), SIZE, {**TOTALS, "lost": 3, "lost_detail": "3 unanswered"})
    assert failed(verdicts)["lost replies"] == "3 requests sent were never answered (3 unanswered)"


def test_p99_is_judged_against_the_first_quarter():
    within = soak.judge(samples(p99=lambda t: 500 if t < 5 else 900), SIZE, TOTALS)
    assert "p99" not in failed(within)
    drifted = soak.judge(samples(p99=lambda t: 500 if t < 10 else 1_500), SIZE, TOTALS)
    assert "3.0x the first 5 s' 500 us" in failed(drifted)["p99"]


def test_the_warm_up_is_the_first_minute_from_two_minutes_on():
    assert soak.SoakSize(30.0).warmup == 7.5
    assert soak.SoakSize(600.0).warmup == 60.0


def test_overload_recovery_is_when_p99_stays_within_twice_normal():
    assert overload.recovery_time([9_000, 5_000, 900, 1_100, 800], 1_000) == 3.0
    assert overload.recovery_time([900, 800], 1_000) == 0.0
    assert overload.recovery_time([900, 5_000, 800], 1_000) == 3.0
    assert overload.recovery_time([9_000, 9_000], 1_000) is None


def test_an_overload_row_fails_on_memory_and_on_slow_recovery_with_one_line_each():
    row = overload.OverloadRow("epoll", 5, 10_000.0, rss_before_mib=20.0, rss_peak_mib=120.0, recovery_s=7.0,
                               normal_p99_us=800)
    overload.judge(row)
    assert row.status == "FAIL"
    assert row.failures == ["RSS peaked at 120.0 MiB, over 20.0 + 64 MiB",
                            "p99 not back within 2x of normal (800 us) 5 s after the load dropped (took 7 s)"]
    fine = overload.OverloadRow("epoll", 2, 10_000.0, rss_before_mib=20.0, rss_peak_mib=21.0, recovery_s=1.0)
    overload.judge(fine)
    assert fine.status == "pass"


def test_check_refuses_a_soak_of_no_time():
    parser = check_cli.argparse.ArgumentParser()
    check_cli.add_parser(parser.add_subparsers())
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["check", "--soak", "0"])
    assert exit_.value.code == 2


# -- the report --------------------------------------------------------------------------------------
def test_report_draws_the_reliability_section_from_the_run_directory(tmp_path):
    for name in tables.RELIABILITY_FILES:
        shutil.copy(FIXTURE / name, tmp_path / name)
    page = report.reliability_section(Run(path=str(tmp_path), manifest={"run_id": "fx"}), str(tmp_path))
    assert "Fault scenarios per variant (check.csv)" in page
    assert "Soak verdicts (soak_summary.csv)" in page
    assert "Overload: how each model degrades (overload.csv)" in page
    assert "No soak" not in page and "No overload" not in page
    png = tmp_path / report.CHART_DIR / f"{report.SOAK_CHART}.png"
    assert png.exists() and png.stat().st_size > 5_000
    for variant in ("epoll", "go"):
        assert f">{variant}<" in page


def test_report_says_plainly_when_a_run_has_no_reliability_files(tmp_path):
    shutil.copy(FIXTURE / "check.csv", tmp_path / "check.csv")
    page = report.reliability_section(Run(path=str(tmp_path), manifest={"run_id": "fx"}), str(tmp_path))
    assert "Fault scenarios per variant" in page
    assert "No soak: this run has no soak.csv" in page
    assert "No overload table: this run has no overload.csv" in page
    assert not os.path.exists(tmp_path / report.CHART_DIR)


# -- live ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_soak_holds_steady(variant):
    """70 % of capacity, 5 % of connections replaced a second, faults: RSS, fds, threads flat, no
    CLOSE_WAIT, no reply lost, p99 within 2x of the first quarter's."""
    backend, options = variant
    server_cpus, loadgen_cpu = check_cli.placement()
    result = soak.soak(backend, options, soak.SoakSize.default(), server_cpus=server_cpus, loadgen_cpu=loadgen_cpu)
    assert result.samples, result.failures
    assert result.passed, f"{result.variant}: " + "; ".join(result.failures)


@pytest.mark.slow
def test_overload_is_survived_and_recovered_from(variant):
    """2x and 5x capacity: alive, RSS within its bound, p99 back to normal within 5 s."""
    backend, options = variant
    server_cpus, loadgen_cpu = check_cli.placement()
    seconds = overload.FULL_SECONDS if os.environ.get("CONCLAB_FULL") == "1" else overload.CI_SECONDS
    rows = overload.overload(backend, options, seconds, server_cpus=server_cpus, loadgen_cpu=loadgen_cpu)
    assert [row.factor for row in rows] == list(overload.FACTORS)
    problems = [f"{row.factor}x: {failure}" for row in rows for failure in row.failures]
    assert not problems, "; ".join(problems)
