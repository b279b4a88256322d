"""Calibration: the verdict from synthetic measurements, calibration.csv, the report's trust section and banners.

The harness side (experiments/harness/calibrate.py) is tested on made-up
measurements: the verdict against each limit, the /proc/stat arithmetic, the
CSV rows. The report side (analysis/trust.py) is tested on copies of
tests/fixtures/run-tiny (no calibration in its manifest, as committed), with
and without a synthetic calibration written into the copy's manifest. Two
live tests run the real measurements and check their shape, never their
timings.
"""
from __future__ import annotations

import copy
import html
import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from conclab.analysis import report, trust
from conclab.analysis.results import load_run
from conclab.experiments.harness import calibrate
from conclab.experiments.harness.tables import COLUMNS, TableWriter

FIXTURE = Path(__file__).parent / "fixtures" / "run-tiny"
SMOKE_TEXT = "for checking the lab, not for conclusions"


def quiet_cal() -> dict:
    """A calibration every measure of which is well within its limit (4 CPUs: load limit 2)."""
    def timer(p99):
        return {"p50_us": 55.0, "p99_us": p99, "max_us": 180.0, "n": 500}

    def floor(p99):
        return {"backend": "go", "p50_us": 70.0, "p99_us": p99, "max_us": 900.0, "throughput_rps": 1000.0,
                "requests": 2000, "errors": 0, "valid": True, "invalid_reason": None}
    return {
        "settings": asdict(calibrate.SETTINGS["quick"]), "limits": dict(calibrate.LIMITS),
        "cpus": [0, 1], "server_cpus": [0], "loadgen_cpus": [1], "cpu_count": 4, "timer_slack_ns": 50000,
        "start": {"loadavg": [0.3, 0.2, 0.1], "timer": {"0": timer(80.0), "1": timer(90.0)}, "floor": floor(150.0)},
        "end": {"loadavg": [1.5, 0.9, 0.4], "own_load": 1.2, "timer": {"0": timer(85.0), "1": timer(95.0)},
                "floor": floor(160.0)},
        "run": {"wall_s": 120.0, "busy_pct": 60.0, "steal_pct": 0.1, "own_cpu_pct": 118.0, "others_cpu_pct": 3.0,
                "per_cpu": {"0": {"busy_pct": 70.0, "steal_pct": 0.1}, "1": {"busy_pct": 50.0, "steal_pct": 0.1}},
                "machine": {"busy_pct": 31.0, "steal_pct": 0.1}},
    }


def changed(path: str, value) -> dict:
    """quiet_cal() with one value replaced: path like "start.timer.1.p99_us"."""
    cal = quiet_cal()
    *keys, last = path.split(".")
    node = cal
    for k in keys:
        node = node[k]
    node[last] = value
    return cal


# -- the verdict ----------------------------------------------------------------------------------------

def test_a_quiet_machine_is_quiet():
    assert calibrate.verdict(quiet_cal()) == ("quiet", [])


def test_a_measure_at_its_limit_is_still_quiet():
    cal = changed("start.timer.0.p99_us", calibrate.TIMER_P99_LIMIT_US)
    cal["run"]["steal_pct"] = calibrate.STEAL_LIMIT_PCT
    assert calibrate.verdict(cal) == ("quiet", [])


@pytest.mark.parametrize("path, value, words", [
    ("start.timer.1.p99_us", 350.0, "timer p99 overshoot 350 µs on CPU 1 at start (limit 200 µs)"),
    ("end.timer.0.p99_us", 2500.0, "timer p99 overshoot 2,500 µs on CPU 0 at end"),
    ("run.steal_pct", 3.5, "steal 3.5 % of the run's CPUs' time (limit 2 %)"),
    ("run.others_cpu_pct", 25.0, "other processes used 25 % of a CPU on the run's CPUs (limit 10 %)"),
    ("start.loadavg", [2.5, 1.0, 1.0], "load average 2.5 at start on 4 CPUs (limit 2)"),
    ("start.floor.p99_us", 1500.0, "latency floor p99 1,500 µs at start (limit 1,000 µs)"),
    ("end.floor.p99_us", 4200.0, "latency floor p99 4,200 µs at end"),
])
def test_each_limit_makes_the_run_noisy_with_its_reason(path, value, words):
    verdict, reasons = calibrate.verdict(changed(path, value))
    assert verdict == "noisy"
    assert len(reasons) == 1 and words in reasons[0]


def test_the_load_average_at_the_end_is_the_runs_own_and_not_judged():
    """The end's load average counts the run's own woken threads (thousands at once): recorded, not judged;
    other processes during the run are judged by their CPU time instead."""
    cal = changed("end.loadavg", [14.0, 17.0, 17.0])
    cal["end"]["own_load"] = 0.9
    assert calibrate.verdict(cal)[0] == "quiet"
    cal["run"] = {**(cal.get("run") or {}), "others_cpu_pct": 40.0}
    assert calibrate.verdict(cal) == ("noisy", ["other processes used 40 % of a CPU on the run's CPUs (limit 10 %)"])


def test_every_breach_is_listed():
    cal = changed("run.steal_pct", 9.0)
    cal["start"]["timer"]["0"]["p99_us"] = 900.0
    cal["end"]["floor"]["p99_us"] = 5000.0
    verdict, reasons = calibrate.verdict(cal)
    assert verdict == "noisy" and len(reasons) == 3


def test_a_run_judged_by_other_limits_keeps_them():
    cal = changed("start.timer.0.p99_us", 300.0)
    cal["limits"]["timer_p99_us"] = 500.0
    assert calibrate.verdict(cal) == ("quiet", [])


def test_what_was_not_measured_judges_nothing_and_is_listed():
    cal = quiet_cal()
    cal["start"]["floor"] = {"error": "ServerStartError: go exited with status 1"}
    cal["end"] = {"loadavg": [0.5, 0.5, 0.5], "skipped": "timer and floor not measured: the run's status is interrupted"}
    del cal["run"]
    calibrate.judge(cal)
    assert cal["verdict"] == "quiet"
    assert any("latency floor at start" in m and "ServerStartError" in m for m in cal["not_measured"])
    assert any(m.startswith("end: timer and floor not measured") for m in cal["not_measured"])
    assert any("CPU use during the run" in m for m in cal["not_measured"])
    assert cal["floor"]["latency_p99_us"] is None and cal["floor"]["timer_p99_us"] == 90.0


def test_the_floor_is_the_worse_phase_and_the_worst_timer():
    cal = calibrate.judge(changed("end.timer.1.p99_us", 130.0))
    assert cal["floor"] == {"backend": "go", "latency_p50_us": 70.0, "latency_p99_us": 160.0,
                            "latency_max_us": 900.0, "timer_p99_us": 130.0}


# -- the measures' arithmetic ----------------------------------------------------------------------------

def test_overshoot_percentiles_are_nearest_rank_in_us():
    late_ns = [1000 * i for i in range(100, 0, -1)]                 # 1 ... 100 µs, unsorted
    assert calibrate.overshoot_summary(late_ns) == {"p50_us": 50.0, "p99_us": 99.0, "max_us": 100.0, "n": 100}
    assert calibrate.overshoot_summary([]) == {"p50_us": None, "p99_us": None, "max_us": None, "n": 0}


STAT_BEFORE = """cpu  100 0 100 1000 0 0 0 0 0 0
cpu0 50 0 50 500 0 0 0 0 0 0
cpu1 50 0 50 500 0 0 0 0 0 0
intr 12345 0 0
ctxt 999
"""
# cpu0: +100 user +50 system +40 idle +10 softirq (200 jiffies, 80 % busy); cpu1: +20 user +170 idle +10 steal
STAT_AFTER = """cpu  220 0 150 1210 0 0 10 10 0 0
cpu0 150 0 100 540 0 0 10 0 0 0
cpu1 70 0 50 670 0 0 0 10 0 0
intr 22345 0 0
"""


def test_proc_stat_deltas_give_busy_steal_and_other_processes():
    before = calibrate.Snapshot(t=10.0, stat=calibrate.parse_proc_stat(STAT_BEFORE), own_cpu_s=1.0)
    after = calibrate.Snapshot(t=12.0, stat=calibrate.parse_proc_stat(STAT_AFTER), own_cpu_s=1.5)
    u = calibrate.usage(before, after, [0, 1], hz=100)
    assert u["per_cpu"]["0"] == {"busy_pct": pytest.approx(80.0), "steal_pct": 0.0}
    assert u["per_cpu"]["1"] == {"busy_pct": pytest.approx(15.0), "steal_pct": pytest.approx(5.0)}
    assert u["busy_pct"] == pytest.approx(47.5) and u["steal_pct"] == pytest.approx(2.5)
    assert u["own_cpu_pct"] == pytest.approx(25.0)                   # 0.5 s of 2 s
    # process time on CPUs 0,1: 100 + 50 + 20 jiffies = 1.7 s, of which the run's own 0.5 s: 1.2 s in 2 s
    assert u["others_cpu_pct"] == pytest.approx(60.0)
    only0 = calibrate.usage(before, after, [0], hz=100)
    assert only0["others_cpu_pct"] == pytest.approx(50.0)            # 1.5 s on CPU 0 less 0.5 s own


def test_other_processes_never_go_below_zero():
    before = calibrate.Snapshot(t=0.0, stat=calibrate.parse_proc_stat(STAT_BEFORE), own_cpu_s=0.0)
    after = calibrate.Snapshot(t=2.0, stat=calibrate.parse_proc_stat(STAT_AFTER), own_cpu_s=9.0)
    assert calibrate.usage(before, after, [0, 1], hz=100)["others_cpu_pct"] == 0.0


def test_unreadable_proc_stat_leaves_cpu_use_unmeasured():
    before = calibrate.Snapshot(t=0.0, stat={}, own_cpu_s=0.0)
    u = calibrate.usage(before, calibrate.Snapshot(t=1.0, stat={}, own_cpu_s=0.5), [0], hz=100)
    assert u["busy_pct"] is None and u["others_cpu_pct"] is None and u["own_cpu_pct"] == pytest.approx(50.0)


def test_each_profile_has_short_settings_and_tiny_is_the_shortest():
    tiny = calibrate.settings_for("tiny")
    assert tiny.floor_s <= 1.0 and tiny.timer_samples < calibrate.settings_for("quick").timer_samples
    assert calibrate.settings_for("a-profile-added-later") == calibrate.DEFAULT_SETTINGS


# -- calibration.csv --------------------------------------------------------------------------------------

def test_rows_are_one_per_measure_with_phase_cpu_metric_value_unit(tmp_path):
    cal = calibrate.judge(quiet_cal())
    start, end, during = (calibrate.rows(cal, phase) for phase in ("start", "end", "run"))
    assert {r["phase"] for r in start} == {"start"} and {r["phase"] for r in during} == {"run"}
    by = {(r["cpu"], r["metric"]): r for r in start}
    assert by[("1", "timer_overshoot_p99")]["value"] == 90.0 and by[("1", "timer_overshoot_p99")]["unit"] == "us"
    assert by[("0", "floor_p99")]["value"] == 150.0                  # the floor's server CPUs
    assert by[("", "loadavg_1m")] == {"phase": "start", "cpu": "", "metric": "loadavg_1m", "value": 0.3,
                                      "unit": "load"}
    assert len(start) == 3 + 2 * 3 + 5                               # load averages, 2 CPUs x 3 timer stats, floor
    assert {(r["cpu"], r["metric"]) for r in end} >= {("", "own_load"), ("0", "timer_overshoot_max")}
    run_by = {(r["cpu"], r["metric"]): r["value"] for r in during}
    assert run_by[("0,1", "others_cpu_pct")] == 3.0 and run_by[("1", "busy_pct")] == 50.0
    assert run_by[("", "busy_pct")] == 31.0                          # the whole machine
    writer = TableWriter(str(tmp_path / "calibration.csv"), COLUMNS["calibration"])
    for row in start + end + during:
        writer.write({"run_id": "r", **row})
    writer.close()
    frame = pd.read_csv(tmp_path / "calibration.csv", dtype={"cpu": str})
    assert list(frame.columns) == list(COLUMNS["calibration"]) and len(frame) == len(start + end + during)


def test_a_missing_measure_writes_no_row():
    cal = quiet_cal()
    cal["start"]["floor"] = {"error": "no server"}
    assert not [r for r in calibrate.rows(cal, "start") if r["metric"].startswith("floor_")]


# -- the report -----------------------------------------------------------------------------------------

def copy_run(tmp_path: Path, name: str, cal: dict | None = None, profile: str | None = None) -> Path:
    """The fixture run in tmp_path/name, its manifest given ``cal`` (judged; None: a run made before the
    harness calibrated, no calibration at all) and ``profile`` if given."""
    target = tmp_path / name
    shutil.copytree(FIXTURE, target)
    path = target / "manifest.json"
    manifest = json.loads(path.read_text())
    if cal is not None:
        manifest["calibration"] = calibrate.judge(copy.deepcopy(cal))
    else:
        manifest.pop("calibration", None)
        table = target / "calibration.csv"
        table.write_text(table.read_text().splitlines(keepends=True)[0])
    if profile is not None:
        manifest["profile"]["name"] = manifest["parameters"]["profile"] = profile
    path.write_text(json.dumps(manifest))
    return target


def noisy_cal() -> dict:
    cal = changed("start.timer.0.p99_us", 2564.0)
    cal["start"]["timer"]["0"]["max_us"] = 2984.0
    cal["run"]["others_cpu_pct"] = 84.7
    return cal


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """The fixture's page as committed (no calibration), and with a noisy calibration.

    Both are rendered without their charts: the banners and the trust section do not use them (no chart
    reads the calibration), and the whole report, charts and all, is written in tests/test_report.py.
    """
    tmp = tmp_path_factory.mktemp("trust")
    plain = load_run(str(copy_run(tmp, "plain")))
    noisy = load_run(str(copy_run(tmp, "noisy", noisy_cal())))
    return {"plain": report.render(plain, [], plain.path), "noisy": report.render(noisy, [], noisy.path)}


def text_of(page: str) -> str:
    raw = re.sub(r"<style>.*?</style>", "", page, flags=re.DOTALL)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", raw)))


def trust_section(page: str) -> str:
    """The HTML of "How far to trust this run", from its <h2> to the next; it comes before the Summary."""
    start = page.index(f'<h2 id="{trust.SECTION_ID}">')
    assert start < page.index("<h2>Summary</h2>"), "the trust section is not ahead of the findings"
    return page[start:page.index("<h2", start + 1)]


@pytest.mark.slow
def test_a_run_without_calibration_says_so_first(pages):
    page = pages["plain"]
    section = trust_section(page)
    assert section.startswith(f'<h2 id="{trust.SECTION_ID}">{trust.TITLE}</h2>')
    assert "This run has no calibration" in text_of(section)
    assert page.index('class="banner banner-uncalibrated"') < page.index("<h1>")
    assert "Uncalibrated" in text_of(page[:page.index("<h1>")])
    assert "banner-noisy" not in page


@pytest.mark.slow
def test_the_fixture_is_a_smoke_run_and_says_so_at_the_top(pages):
    for page in pages.values():                                      # the fixture's profile is tiny
        top = text_of(page[:page.index("<h1>")])
        assert "A smoke run (profile tiny)" in top and SMOKE_TEXT in top


@pytest.mark.slow
def test_a_noisy_run_has_a_banner_and_a_section_with_its_figures_and_reasons(pages):
    page = pages["noisy"]
    assert page.index('class="banner banner-noisy"') < page.index("<h1>")
    assert "banner-uncalibrated" not in page
    section = text_of(trust_section(page))
    assert "Verdict: noisy. 2 measures past their limits" in section
    assert "timer p99 overshoot 2,564 µs on CPU 0 at start (limit 200 µs)" in section
    assert "other processes used 84.7 % of a CPU" in section
    assert "55 / 2,564 / 2,984" in section                             # CPU 0 at start: p50 / p99 / max
    assert "70 / 160 / 900" in section                                # the floor at end
    assert ("Differences below the floor are not findings" in section and "p50 70 µs and p99 160 µs" in section
            and "smaller than 2,564 µs" in section)                  # the larger of floor p99 and timer p99


def test_a_quiet_full_run_gets_no_banner_and_a_quiet_verdict(tmp_path):
    run = load_run(str(copy_run(tmp_path, "quiet", quiet_cal(), profile="full")))
    assert trust.banners(run) == ""
    section = text_of(trust.section(run))
    assert "Verdict: quiet" in section and "Not measured" not in section
    assert "smaller than 160 µs" in section


@pytest.mark.parametrize("profile, smoke", [("tiny", True), ("quick", True), ("standard", False), ("full", False)])
def test_only_quick_and_tiny_are_smoke_runs(profile, smoke):
    manifest = {"profile": {"name": profile}, "calibration": calibrate.judge(quiet_cal())}
    kinds = [kind for kind, _ in trust.banner_texts(manifest)]
    assert kinds == (["smoke"] if smoke else [])


# -- the floor for the findings ---------------------------------------------------------------------------

def test_below_floor_uses_the_larger_p99_and_needs_a_calibration():
    cal = calibrate.judge(changed("end.floor.p99_us", 500.0))        # timer p99 at most 95 µs
    run = SimpleNamespace(manifest={"calibration": cal})
    assert trust.floor_us(run) == 500.0
    assert trust.below_floor(run, 499.0) and trust.below_floor(run, -499.0)
    assert not trust.below_floor(run, 500.0) and not trust.below_floor(run, 10_000.0)
    assert not trust.below_floor(run, -10_000.0)                             # either sign: a difference's size
    assert not trust.below_floor(run, None)
    assert not trust.below_floor(SimpleNamespace(manifest={}), 1.0)          # uncalibrated: cannot say
    timer_worse = calibrate.judge(changed("start.timer.1.p99_us", 800.0))
    assert trust.below_floor({"calibration": timer_worse}, 700.0)


def test_the_latency_spread_below_the_floor_is_not_a_finding(tmp_path):
    wide = changed("start.floor.p99_us", 60_000_000.0)               # a floor no spread of the fixture reaches
    f_noise, _ = report._spectrum(load_run(str(copy_run(tmp_path, "wide", wide))))
    f_plain, _ = report._spectrum(load_run(str(copy_run(tmp_path, "narrow", quiet_cal()))))
    f_none, _ = report._spectrum(load_run(str(copy_run(tmp_path, "none"))))
    assert "below this run's latency floor: not a finding" in f_noise.text
    assert f_noise.title.endswith("within the floor")
    spread = f_noise.facts["hi_ms"] - f_noise.facts["lo_ms"]
    assert f_noise.facts["spread_ms"] == pytest.approx(spread)
    assert spread * 1000 >= 160                                       # the fixture's spread is above quiet_cal's floor
    for finding in (f_plain, f_none):
        assert "latency floor" not in finding.text and not finding.title.endswith("within the floor")


# -- the real measurements (shape only, never timings) -------------------------------------------------------

@pytest.mark.live
def test_timer_children_measure_every_cpu_asked_for():
    import os
    cpus = sorted(os.sched_getaffinity(0))[:2]
    result = calibrate.timer_jitter(cpus, samples=20)
    assert set(result) == {str(c) for c in cpus}
    for stats in result.values():
        assert stats["n"] == 20 and 0 <= stats["p50_us"] <= stats["p99_us"] <= stats["max_us"]


@pytest.mark.live
@pytest.mark.slow
def test_a_tiny_run_is_calibrated_at_start_and_end(throughput_rounds):
    code, run_dir = throughput_rounds
    assert code == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    cal = manifest["calibration"]
    assert cal["verdict"] in ("quiet", "noisy") and (cal["verdict"] == "noisy") == bool(cal["reasons"])
    for phase in ("start", "end"):
        assert set(cal[phase]["timer"]) == {str(c) for c in cal["cpus"]}
        assert cal[phase]["floor"]["backend"] in calibrate.FLOOR_BACKENDS and cal[phase]["floor"]["requests"] > 0
    assert cal["run"]["own_cpu_pct"] > 0 and cal["floor"]["latency_p99_us"] > 0
    rows = pd.read_csv(run_dir / "calibration.csv", dtype={"cpu": str})
    assert set(rows.phase) == {"start", "end", "run"} and (rows.run_id == run_dir.name).all()


def test_an_interrupt_while_measuring_the_end_keeps_the_files_and_is_reported(monkeypatch):
    """A Ctrl-C in the run's last seconds (the end calibration, in the harness's clean-up) is not swallowed:
    what was measured is kept and end() says so, so the run ends interrupted (exit 130), not complete."""
    cal = quiet_cal()
    del cal["end"]
    written = []
    run = SimpleNamespace(calibration=cal, profile=SimpleNamespace(name="quick"), manifest={},
                          write=lambda table, row: written.append(row), save_manifest=lambda: None,
                          progress=lambda text: None)

    def ctrl_c(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibrate, "_measure", ctrl_c)
    monkeypatch.setattr(calibrate.processes, "stop_all", lambda: None)
    assert calibrate.end(run, "complete") is True
    assert cal["end"]["skipped"] == "interrupted while measuring (KeyboardInterrupt)"
    assert run.manifest["calibration"] is cal and cal["verdict"]
    monkeypatch.setattr(calibrate, "_measure", lambda *args: None)
    assert calibrate.end(run, "complete") is False
