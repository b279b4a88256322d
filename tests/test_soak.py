"""Soak and overload (reliability/soak.py, reliability/overload.py) and their place in the report.

The unit tests feed the verdict logic synthetic samples (a flat server passes; each way of
failing fails with its one-line reason) and draw the report's reliability section from a
fixture run directory (tests/fixtures/reliability: the files of a real ``conclab check --soak 20
--overload-seconds 3 --scenarios max_frame,loopback,half_close --backends epoll,go``).

The live tests are sized in one place, ``soak.SuiteSize`` (``soak.SUITE_CI``; ``CONCLAB_FULL=1``:
``soak.SUITE_FULL``): CI soaks every variant 5 s at half its capacity (about 9 s per variant with
the capacity run, the floor probe and the settling) and overloads two variants that degrade
differently (threads, threadpool-request: ``SuiteSize``'s docstring says why) at 2x and
5x for 2 s each; full soaks 30 s and overloads every variant for 30 s per factor. They assert what
a run measures exactly (no crash, no lost reply, no CLOSE_WAIT left, fds back to the baseline, no
thread left beyond what the model keeps) and that no verdict FAILed; an unresolved one (too short
a run, a busy machine) is printed, not hidden. Both carry the ``slow`` marker.
"""
from __future__ import annotations

import os
import shutil
import socket
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from conclab.analysis import report, tables
from conclab.analysis.fmt import num
from conclab.analysis.results import Run
from conclab.reliability import cli as check_cli
from conclab.reliability import overload, soak
from conclab.servers import VARIANTS, tcpdiag
from conclab.servers.launcher import wait_until

FIXTURE = Path(__file__).parent / "fixtures" / "reliability"
SIZE = soak.SoakSize(seconds=20.0)          # warm-up: the first 5 s


def samples(n: int = 20, rss_kib=lambda t: 30_000, fds=lambda t: 107, threads=lambda t: 4,
            close_wait=lambda t: 0, p99=lambda t: 500) -> list:
    """One synthetic sample a second; every gauge a function of the second."""
    return [{"t_s": float(t), "rss_kib": rss_kib(t), "fds": fds(t), "threads": threads(t),
             "close_wait": close_wait(t), "latencies": Counter({100: 98, p99(t): 2})} for t in range(n)]


TOTALS = {"lost": 0, "fds_baseline": 7, "fds_after": 7, "close_wait_after": 0}


def failed(verdicts) -> dict:
    return {v.criterion: v.reason for v in verdicts if v.state == soak.FAIL}


def states(verdicts) -> dict:
    return {v.criterion: v.state for v in verdicts}


def by_criterion(verdicts, criterion: str):
    return next(v for v in verdicts if v.criterion == criterion)


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
def test_a_steady_short_run_fails_nothing_and_leaves_the_rss_slope_unresolved():
    verdicts = soak.judge(samples(), SIZE, TOTALS)
    assert failed(verdicts) == {}
    assert states(verdicts) == {"RSS slope": "unresolved", "fds": "pass", "threads": "pass", "CLOSE_WAIT": "pass",
                                "lost replies": "pass", "p99": "pass"}
    reason = by_criterion(verdicts, "RSS slope").reason
    assert reason.startswith("a 20 s run resolves RSS slopes down to +-") and "the bound is 102 B/min" in reason


def test_the_run_length_an_unresolved_slope_asks_for_resolves_it():
    short = by_criterion(soak.judge(samples(), SIZE, TOTALS), "RSS slope")
    needed = int(short.reason.split("about ")[1].split(" s")[0])
    assert needed > 120
    long_size = soak.SoakSize(float(needed))
    flat = by_criterion(soak.judge(samples(n=needed), long_size, TOTALS), "RSS slope")
    assert flat.state == "pass", flat.value
    shorter = by_criterion(soak.judge(samples(n=needed // 2), soak.SoakSize(needed / 2), TOTALS), "RSS slope")
    assert shorter.state == "unresolved"


def test_a_flat_gauge_is_not_taken_for_an_exact_line():
    _, low, high = soak.slope_interval(list(range(15)), [4096] * 15, noise_floor=1182.0)
    assert low < 0 < high and high - low > 100
    assert soak.slope_interval(list(range(15)), [4096] * 15) == (0.0, 0.0, 0.0)


LONG = soak.SoakSize(180.0)                 # warm-up: the first minute


def test_rss_growth_after_the_warm_up_fails_and_growth_in_it_does_not():
    leaking = soak.judge(samples(n=180, rss_kib=lambda t: 30_000 + 4 * t), LONG, TOTALS)      # a page a second
    assert "RSS grows" in failed(leaking)["RSS slope"] and "in both halves" in failed(leaking)["RSS slope"]
    warming = soak.judge(samples(n=180, rss_kib=lambda t: 30_000 + 100 * min(t, 50)), LONG, TOTALS)
    assert states(warming)["RSS slope"] == "unresolved"    # flat after the minute, but 2 minutes resolve no 102 B/min


def test_growth_in_the_servers_first_minute_is_unresolved_and_said():
    short = by_criterion(soak.judge(samples(rss_kib=lambda t: 30_000 + 4 * t), SIZE, TOTALS), "RSS slope")
    assert short.state == "unresolved"
    assert short.reason.startswith("RSS grew +245760 B/min") and "inside the server's first minute" in short.reason


def test_one_page_or_a_settling_level_is_unresolved_and_steady_steps_fail():
    one_page = by_criterion(soak.judge(samples(n=180, rss_kib=lambda t: 30_000 + (4 if t >= 150 else 0)), LONG,
                                       TOTALS), "RSS slope")
    assert one_page.state == "unresolved", one_page.value
    settling = by_criterion(soak.judge(samples(n=180, rss_kib=lambda t: 30_000 + 8 * min(t, 110)), LONG, TOTALS),
                            "RSS slope")
    assert settling.state == "unresolved" and "but not throughout" in settling.reason, settling.value
    steps = by_criterion(soak.judge(samples(n=180, rss_kib=lambda t: 30_000 + 16 * (t // 10)), LONG, TOTALS),
                         "RSS slope")
    assert steps.state == "FAIL", steps.value          # 4 pages every 10 s, steadily: growth the run does show


def test_rss_bound_scales_with_the_connections_held():
    # 1 KiB per minute per 1,000 connections: over 10 minutes, 2,000 B/min is demonstrably past the bound
    # with 100 connections (102 B/min) and demonstrably under it with 10,000 (10,240 B/min)
    growth = samples(n=600, rss_kib=lambda t: 30_000 + 4 * round(t * 2_000 / 60 / 4096))
    assert states(soak.judge(growth, soak.SoakSize(600.0, conns=100), TOTALS))["RSS slope"] == "FAIL"
    assert states(soak.judge(growth, soak.SoakSize(600.0, conns=10_000), TOTALS))["RSS slope"] == "pass"


def test_a_run_passes_with_unresolved_verdicts_and_fails_with_a_failed_one():
    result = soak.SoakResult("epoll", SIZE, verdicts=soak.judge(samples(), SIZE, TOTALS))
    assert result.passed and result.unresolved and result.unresolved[0].startswith("RSS slope: a 20 s run")
    result.verdicts = soak.judge(samples(), SIZE, {**TOTALS, "lost": 1})
    assert not result.passed and result.failures == ["1 requests sent were never answered ()"]


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


def test_close_wait_in_consecutive_samples_fails_only_for_the_same_socket_where_they_are_named():
    def named(ids_at):
        rows = samples(close_wait=lambda t: len(ids_at(t)))
        return [{**row, "close_wait_ids": frozenset(ids_at(int(row["t_s"])))} for row in rows]
    passing = soak.judge(named(lambda t: {100 + t} if 10 <= t <= 12 else set()), SIZE, TOTALS)
    assert "CLOSE_WAIT" not in failed(passing)                 # three sockets, each caught once on its way
    staying = soak.judge(named(lambda t: {7, 100 + t} if 10 <= t <= 12 else set()), SIZE, TOTALS)
    assert "consecutive samples" in failed(staying)["CLOSE_WAIT"]   # socket 7 stayed


@pytest.mark.live
def test_close_wait_sockets_are_named_and_a_staying_one_keeps_its_name():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        accepted = [listener.accept()[0] for _ in clients]
        assert tcpdiag.close_wait_sockets(port) == frozenset()
        clients[0].close()
        assert wait_until(lambda: len(tcpdiag.close_wait_sockets(port)) == 1, 5.0)
        first = tcpdiag.close_wait_sockets(port)
        clients[1].close()
        assert wait_until(lambda: len(tcpdiag.close_wait_sockets(port)) == 2, 5.0)
        assert first < tcpdiag.close_wait_sockets(port)           # the first kept its name
        accepted[0].close()
        assert wait_until(lambda: len(tcpdiag.close_wait_sockets(port)) == 1, 5.0)
        assert not first & tcpdiag.close_wait_sockets(port)
        accepted[1].close()


def test_a_lost_reply_fails():
    verdicts = soak.judge(samples(), SIZE, {**TOTALS, "lost": 3, "lost_detail": "3 unanswered"})
    assert failed(verdicts)["lost replies"] == "3 requests sent were never answered (3 unanswered)"


def test_p99_is_the_median_of_the_last_quarters_seconds_against_the_first_quarters():
    within = soak.judge(samples(p99=lambda t: 500 if t < 5 else 900), SIZE, TOTALS)
    assert states(within)["p99"] == "pass"
    drifted = soak.judge(samples(p99=lambda t: 500 if t < 10 else 1_500), SIZE, TOTALS)
    assert "3.0x the first quarter's 500 us, every second over" in failed(drifted)["p99"]
    mixed = by_criterion(soak.judge(samples(p99=lambda t: 500 if t < 10 or t == 17 else 1_500), SIZE, TOTALS), "p99")
    assert mixed.state == "unresolved" and "1 of its 5 seconds are within it" in mixed.reason
    short = by_criterion(soak.judge(samples(n=12, p99=lambda t: 500 if t < 6 else 1_500), soak.SoakSize(12.0),
                                    TOTALS), "p99")
    assert short.state == "unresolved" and "3 seconds cannot demonstrate a drift (need 5)" in short.reason
    spikes = soak.judge(samples(p99=lambda t: 90_000 if t in (3, 16, 18) else 500), SIZE, TOTALS)
    assert states(spikes)["p99"] == "pass"          # one bad second in a quarter moves a median nowhere


def test_the_latency_floor_widens_the_p99_tolerance_when_it_is_larger():
    drift = samples(p99=lambda t: 500 if t < 10 else 1_500)
    assert states(soak.judge(drift, SIZE, {**TOTALS, "floor_p99_us": 400}))["p99"] == "FAIL"
    assert states(soak.judge(drift, SIZE, {**TOTALS, "floor_p99_us": 1_200}))["p99"] == "pass"
    assert soak.p99_tolerance(500, 1_200) == 1_700 and soak.p99_tolerance(500, 100) == 1_000


def test_p99_on_a_busy_machine_is_unresolved_never_passed_or_failed():
    busy = {**TOTALS, "others_cpu_pct": 35.0}
    for p99 in (lambda t: 500, lambda t: 500 if t < 10 else 5_000):
        verdict = by_criterion(soak.judge(samples(p99=p99), SIZE, busy), "p99")
        assert verdict.state == "unresolved"
        assert verdict.reason.startswith("machine busy: other processes used 35 % of a CPU")
    assert states(soak.judge(samples(), SIZE, {**TOTALS, "others_cpu_pct": 4.0}))["p99"] == "pass"


def test_seconds_where_the_load_generator_saturated_are_left_out():
    size = soak.SoakSize(40.0)
    rows = samples(n=40, p99=lambda t: 500 if t < 30 else 9_000)
    for row in rows:
        row["loadgen_saturated"] = row["t_s"] >= 30
    verdict = by_criterion(soak.judge(rows, size, TOTALS), "p99")
    assert verdict.state == "unresolved" and "0 in the last" in verdict.reason
    for row in rows[33:]:
        row["loadgen_saturated"] = False         # 30..32 stay saturated: 33..39 still judge, and 9 ms is a FAIL
    assert by_criterion(soak.judge(rows, size, TOTALS), "p99").state == "FAIL"


def test_the_warm_up_is_the_first_minute_from_two_minutes_on():
    assert soak.SoakSize(30.0).warmup == 7.5
    assert soak.SoakSize(600.0).warmup == 60.0


def test_overload_recovery_time_is_when_p99_stays_within_tolerance():
    assert overload.recovery_time([9_000, 5_000, 900, 1_100, 800], 1_000) == 3.0
    assert overload.recovery_time([900, 800], 1_000) == 0.0
    assert overload.recovery_time([900, 5_000, 800], 1_000) == 3.0
    assert overload.recovery_time([9_000, 9_000], 1_000) is None
    assert overload.recovery_time([2_500, 900], 1_000, floor_us=2_000) == 0.0
    assert overload.recovery_time([9_000, None, 900], 1_000) == 2.0         # a saturated second judges nothing


def test_the_overload_baseline_is_as_long_as_one_factor_within_its_bounds():
    assert overload.baseline_seconds(2.0) == overload.BASELINE_MIN_S
    assert overload.baseline_seconds(10.0) == 10.0
    assert overload.baseline_seconds(30.0) == overload.BASELINE_MAX_S


def test_overload_p99_is_the_median_of_enough_usable_seconds():
    assert overload.robust_p99([800, 9_000, 700, None, 750]) == 775
    assert overload.robust_p99([800, None, None, 700]) is None


def row(**fields) -> overload.OverloadRow:
    base = {"rss_before_mib": 20.0, "rss_peak_mib": 21.0, "normal_p99_us": 800.0, "floor_p99_us": 300,
            "recovery_p99_us": 900.0, "recovery_best_p99_us": 700, "others_cpu_pct": 2.0}
    r = overload.OverloadRow("epoll", 5, 10_000.0, **{**base, **fields})
    overload.judge(r)
    return r


def test_an_overload_row_fails_on_memory_and_on_a_p99_not_back_with_one_line_each():
    bad = row(rss_peak_mib=120.0, recovery_p99_us=7_000.0, recovery_best_p99_us=5_000)
    assert bad.status == "FAIL"
    assert bad.failures == ["RSS peaked at 120.0 MiB, over 20.0 + 64 MiB",
                            ("p99 not back: median per-second p99 7000 us over the 5 s after the load dropped, "
                             "over 1600 us (2x normal 800 us, or + the floor's 300 us), every second")]
    mixed = row(recovery_p99_us=7_000.0, recovery_best_p99_us=900)
    assert mixed.status == "unresolved" and mixed.unresolved[0].endswith("slow recovery not told from noise")
    swinging = row(recovery_p99_us=7_000.0, recovery_best_p99_us=5_000, normal_worst_p99_us=9_000)
    assert swinging.status == "unresolved" and swinging.failures == []
    assert "none over the baseline's worst second (9000 us)" in swinging.unresolved[0]
    beyond = row(recovery_p99_us=12_000.0, recovery_best_p99_us=10_000, normal_worst_p99_us=9_000)
    assert beyond.failures[0].endswith("every second, and over the baseline's worst second (9000 us)")
    assert row().status == "pass"
    assert row(recovery_p99_us=1_900.0, floor_p99_us=1_500).status == "pass"


def test_an_overload_rows_recovery_is_unresolved_on_a_busy_machine_or_without_enough_seconds():
    busy = row(recovery_p99_us=7_000.0, others_cpu_pct=60.0)
    assert busy.status == "unresolved" and busy.failures == []
    assert busy.unresolved[0].startswith("recovery: machine busy: other processes used 60 %")
    assert row(recovery_p99_us=None).status == "unresolved"
    assert row(rss_peak_mib=120.0, others_cpu_pct=60.0).status == "FAIL"          # memory is exact: still judged
    assert row(alive=False).failures == ["the server died under 5x capacity"]


def test_the_suite_sizes_live_in_one_place(monkeypatch):
    monkeypatch.delenv("CONCLAB_FULL", raising=False)
    assert soak.suite() is soak.SUITE_CI
    assert soak.SoakSize.default().seconds == soak.SUITE_CI.soak_s == soak.CI_SECONDS
    assert overload.CI_SECONDS == soak.SUITE_CI.overload_s
    monkeypatch.setenv("CONCLAB_FULL", "1")
    assert soak.suite() is soak.SUITE_FULL
    assert soak.SoakSize.default().seconds == soak.SUITE_FULL.soak_s == soak.FULL_SECONDS
    assert set(soak.SUITE_CI.overload_variants) < set(soak.SUITE_FULL.overload_variants) == set(VARIANTS)


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
    assert "At a glance: soak and overload per variant" in page
    assert "No soak" not in page and "No overload" not in page
    png = tmp_path / report.CHART_DIR / f"{report.SOAK_CHART}.png"
    assert png.exists() and png.stat().st_size > 5_000
    for variant in ("epoll", "go"):
        assert f">{variant}<" in page


def test_the_soak_finding_counts_failed_and_unresolved_variants_apart():
    """An unresolved criterion is not a pass: the title says how many variants the run left undecided."""
    def rows(variant, verdicts):
        return [{"variant": variant, "criterion": c, "verdict": v} for c, v in zip(("RSS slope", "fds", "p99"), verdicts)]
    summary = pd.DataFrame(rows("epoll", ["unresolved", "pass", "pass"]) + rows("go", ["pass", "pass", "pass"])
                           + rows("threads", ["pass", "FAIL", "unresolved"]))
    finding = report.soak_finding(summary)
    assert finding.title.startswith("Soak: no criterion failed in 2 of 3 variants, 2 with a criterion left unresolved")
    assert "failed threads fds" in finding.text and "Unresolved (the run could not decide, see why): 2 criteria" in finding.text
    calm = report.soak_finding(pd.DataFrame(rows("go", ["pass", "pass", "pass"])))
    assert calm.title.startswith("Soak: no criterion failed in 1 of 1 variants (")


def test_the_digest_has_a_row_per_variant_from_both_files_and_names_an_exact_criterion_that_failed():
    frames = tables.read_reliability(str(FIXTURE))
    summary, load = frames["soak_summary"], frames["overload"]
    digest = tables.reliability_digest(summary, load).set_index("variant")
    assert list(digest.index) == list(dict.fromkeys(summary.variant))
    exact = ", ".join(tables.EXACT_CRITERIA)
    assert (digest[exact] == "pass").all()
    for r in load.itertuples():
        cell = digest.at[r.variant, f"{num(r.factor)}x: served req/s, p99 ms"]
        assert cell == f"{num(r.served_rps)} of {num(r.offered_rps)}, {num(r.p99_us / 1000)}"
    peak = load[load.variant == "go"].rss_peak_mib.max()
    assert digest.at["go", "RSS before -> peak MiB"].endswith(f"-> {num(peak)}")
    leaky = summary.copy()
    leaky.loc[(leaky.variant == "go") & (leaky.criterion == "fds"), ["verdict", "value"]] = ["FAIL", "107..140"]
    cells = tables.reliability_digest(leaky).set_index("variant")[exact]
    assert cells["go"] == "fds FAIL: 107..140" and cells["epoll"] == "pass"
    assert "2x: served req/s, p99 ms" not in tables.reliability_digest(leaky).columns     # no overload file


def test_report_says_plainly_when_a_run_has_no_reliability_files(tmp_path):
    shutil.copy(FIXTURE / "check.csv", tmp_path / "check.csv")
    page = report.reliability_section(Run(path=str(tmp_path), manifest={"run_id": "fx"}), str(tmp_path))
    assert "Fault scenarios per variant" in page
    assert "No soak: this run has no soak.csv" in page
    assert "No overload table: this run has no overload.csv" in page
    assert not os.path.exists(tmp_path / report.CHART_DIR)


# -- live ------------------------------------------------------------------------------------------
def show_unresolved(name: str, unresolved: list) -> None:
    for reason in unresolved:
        print(f"{name}: unresolved: {reason}")


@pytest.mark.slow
def test_soak_holds_steady(variant):
    """Steady load, 5 % of connections replaced a second, faults: alive, nothing lost, no CLOSE_WAIT left,
    fds back to the baseline, threads back to it (or, for a model that keeps them, no more than under load),
    and no criterion FAILed."""
    backend, options = variant
    server_cpus, loadgen_cpu = check_cli.placement()
    result = soak.soak(backend, options, soak.SoakSize.default(), server_cpus=server_cpus, loadgen_cpu=loadgen_cpu)
    show_unresolved(result.variant, result.unresolved)
    print(f"{result.variant}: floor p99 {result.floor_p99_us} us, other processes {result.others_cpu_pct} % of a CPU")
    assert result.error is None and result.samples, result.failures
    totals = result.totals
    assert totals["lost"] == 0 and totals["sent"] > 0, totals["lost_detail"]
    assert totals["replaced"] > 0 and totals["replace_failed"] == 0          # the turnover happened
    assert totals["close_wait_after"] == 0
    assert totals["fds_after"] <= totals["fds_baseline"]
    # threads: back to the baseline, or for a model that keeps what it started (pools, Go's runtime, gevent's
    # resolver) no more than under load, give or take the flat criterion's tolerance
    assert totals["threads_after"] <= max(totals["threads_baseline"], max(s["threads"] for s in result.samples)
                                          + soak.FLAT_TOLERANCE)
    assert result.passed, f"{result.variant}: " + "; ".join(result.failures)


@pytest.mark.slow
@pytest.mark.parametrize("name", soak.suite().overload_variants)
def test_overload_is_survived_and_recovered_from(name):
    """2x and 5x capacity: alive, RSS within its bound, p99 back (or unresolved, printed): no FAIL."""
    lab = VARIANTS[name]
    server_cpus, loadgen_cpu = check_cli.placement()
    sizes = soak.suite()
    rows = overload.overload(lab.backend, list(lab.options), sizes.overload_s, server_cpus=server_cpus,
                             loadgen_cpu=loadgen_cpu, capacity_s=sizes.capacity_s, max_rate=sizes.max_rate)
    assert [r.factor for r in rows] == list(overload.FACTORS)
    for r in rows:
        print(f"{name} {r.factor}x: {r.status}, normal p99 {r.normal_p99_us} us, after {r.recovery_p99_us} us, floor "
              f"{r.floor_p99_us} us, other processes {r.others_cpu_pct} % of a CPU")
        show_unresolved(f"{name} {r.factor}x", r.unresolved)
    assert all(r.alive for r in rows)
    problems = [f"{r.factor}x: {failure}" for r in rows for failure in r.failures]
    assert not problems, "; ".join(problems)


# -- docs/reliability.md quotes the committed reference run -----------------------------------------
REFERENCE = Path(__file__).resolve().parent.parent / "results" / "reference"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"


def test_the_docs_scenario_table_is_the_reference_runs_check_csv():
    check = tables.read_reliability(str(REFERENCE))["check"]
    by_scenario = tables.check_table(check).set_index("variant").T.rename_axis("scenario").reset_index()
    text = DOCS.read_text()
    assert tables.to_markdown(by_scenario) in text, "paste this table into docs/reliability.md, Results:\n" \
        + tables.to_markdown(by_scenario)
    assert f"all {check.scenario.nunique()} scenarios at full size on all {check.variant.nunique()} variants" \
        in " ".join(text.split())
    limits = sorted(set(check[check.status == "limit"].variant))
    assert limits == ["threadpool"] and not (check.status == "FAIL").any()      # "two limits of the pool"
    assert (check.status == "limit").sum() == 2


def listed(names) -> str:
    return ", ".join(names) or "none"


def test_the_docs_soak_and_overload_figures_are_the_reference_runs():
    """The digest table and every list in the prose under it are computed from the committed files."""
    frames = tables.read_reliability(str(REFERENCE))
    summary, load = frames["soak_summary"], frames["overload"]
    digest = tables.to_markdown(tables.reliability_digest(summary, load))
    text = DOCS.read_text()
    assert digest in text, "paste this table into docs/reliability.md, Soak and overload:\n" + digest
    flat = " ".join(text.split())
    variants = list(dict.fromkeys(summary.variant))
    verdict = summary.pivot_table(index="variant", columns="criterion", values="verdict", aggfunc="first")
    steady = [v for v in variants if (verdict.loc[v, [*tables.EXACT_CRITERIA, "p99"]] == "pass").all()]
    assert f"fds, threads, CLOSE_WAIT, lost replies and p99 passed in {listed(steady)}" in flat
    for state in ("FAIL", "unresolved", "pass"):
        assert f"RSS slope {state}: {listed([v for v in variants if verdict.at[v, 'RSS slope'] == state])}." in flat
    assert f"Died under overload: {listed(load[~load.alive].variant.unique())}." in flat
    over = load[load.rss_peak_mib > load.rss_before_mib + load.rss_bound_mib]
    assert f"RSS over its bound: {listed(over.variant.unique())}." in flat
    saturated = (load.loadgen_saturated.astype(str) == "True").sum()
    assert f"Where the generator saturated ({saturated} of {len(load)} rows)" in flat
    for state in ("pass", "unresolved", "FAIL"):
        rows = load[load.status == state]
        assert f"Overload {state}: {listed([f'{r.variant} {r.factor:g}x' for r in rows.itertuples()])}." in flat
