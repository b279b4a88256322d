"""The switch experiment: the C kernel thread-switch baseline, its build cache, its rows, labels, finding and chart.

Unit tests feed the experiment and the analysis recorded or made-up benchmark
output; the ``live`` ones compile experiments/c/threadswitch.c with the system
C compiler and run it (10,000 round trips per mode, a fraction of a second).
Nothing here asserts a timing: only that figures exist, are positive and
count what they say they count.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from conclab.analysis import charts, claims, derive, findings, style
from conclab.experiments import switch
from conclab.experiments.harness.run import Run
from conclab.experiments.harness.tables import COLUMNS
from conclab.servers import buildcache

ROOT = Path(__file__).resolve().parent.parent
ROUND_TRIPS = 10_000

# One line threadswitch printed (futex, two CPUs), with a line of noise before it.
C_OUTPUT = ('warming up\n{"bench": "futex", "placement": "cross-cpu", "cpus": [0, 1], "iterations": 10000, '
            '"rounds": 3, "ns_per_switch": 42768.380, "ns_min": 41139.549, "ns_max": 51819.131, '
            '"ctx_voluntary": 57718, "ctx_involuntary": 1296, "ctx_per_round_trip": 1.9671, '
            '"cpu_ns": 1183552340, "cpu_ns_per_switch": 19725.872, "idle": [{"cpu": 1, "state": "haltpoll idle", '
            '"entries": 4203, "time_us": 377120}]}\n')


# -- the program's output -------------------------------------------------------------------------

def test_parse_json_takes_the_last_json_line():
    result = switch.parse_json(C_OUTPUT, "", 0)
    assert result["bench"] == "futex" and result["iterations"] == 10000 and result["idle"][0]["entries"] == 4203


@pytest.mark.parametrize("out, err, code, message", [
    ("", "threadswitch: cannot pin a thread to CPU 7: Invalid argument\n", 2,
     "threadswitch: cannot pin a thread to CPU 7: Invalid argument"),
    (C_OUTPUT, "", 1, "exit status 1"),
    ("no json here\n", "first\nlast words\n", 0, "last words"),
    ('{"bench": \n', "", 0, "unreadable benchmark output"),
])
def test_parse_json_failures_are_one_line(out, err, code, message):
    with pytest.raises(RuntimeError) as failed:
        switch.parse_json(out, err, code)
    assert str(failed.value).startswith(message) and "\n" not in str(failed.value)


def test_micro_row_counts_per_switch():
    row = switch.micro_row(switch.parse_json(C_OUTPUT, "", 0), "futex", False, [0, 1])
    switches = 2 * 10000 * 3
    assert row["ctx_per_req"] == pytest.approx((57718 + 1296) / switches)
    assert row["cpu_us_per_req"] == pytest.approx(1183552340 / switches / 1000)
    assert row["ns_per_switch"] == pytest.approx(42768.380)
    assert (row["bench"], row["pinned"], row["cpus"], row["source"]) == ("futex", False, [0, 1], "micro")
    assert set(row) <= set(COLUMNS["switch"])


def test_micro_row_leaves_uncounted_figures_empty():
    row = switch.micro_row({"iterations": 10, "rounds": 1, "ns_per_switch": 5.0, "ns_min": 4.0, "ns_max": 6.0},
                           "generator", True, [0])
    assert row["ctx_per_req"] is None and row["cpu_us_per_req"] is None


def test_idle_note_is_per_round_trip_and_skips_states_never_entered():
    note = switch.idle_note({"iterations": 100, "rounds": 2, "idle": [
        {"cpu": 1, "state": "POLL", "entries": 0}, {"cpu": 1, "state": "C1", "entries": 50}]})
    assert note == "; idle entries per round trip cpu1 C1 0.25"
    assert switch.idle_note({"iterations": 100, "rounds": 2}) == ""


# -- the experiment: which rows, on which CPUs ------------------------------------------------------

class FakeRun:
    def __init__(self, server_cpus, all_cpus):
        self.server_cpus, self.all_cpus, self.repeat = server_cpus, all_cpus, 1
        self.profile = SimpleNamespace(switch_rounds=1, switch_round_s=0.01)
        self.rows, self.skips, self.lines = [], [], []

    def write(self, table, row):
        self.rows.append(row)

    def skip(self, experiment, variant, reason, point=""):
        self.skips.append((variant.name, reason))

    def progress(self, message):
        self.lines.append(message)

    in_rounds = Run.in_rounds             # the harness's own interleaving and error handling


def fake_benchmark(calls):
    def run_json(command, cpus, env):
        calls.append((command, cpus))
        mode = command[command.index("--mode") + 1]
        return {**json.loads(C_OUTPUT.splitlines()[1]), "bench": mode}
    return run_json


@pytest.fixture
def kernel_only(monkeypatch) -> list:
    """switch.run with only the C kernel baselines, faked: the calls they made (command, cpus)."""
    calls = []
    monkeypatch.setattr(switch, "c_command", lambda run: ["threadswitch", "--rounds", "1"])
    monkeypatch.setattr(switch, "python_command", lambda run, bench: "not in this test")
    monkeypatch.setattr(switch, "go_command", lambda run: "not in this test")
    monkeypatch.setattr(switch, "per_request", lambda run: None)
    monkeypatch.setattr(switch, "run_json", fake_benchmark(calls))
    return calls


def test_run_measures_futex_and_pipe_on_one_cpu_and_across_two(kernel_only):
    calls = kernel_only
    run = FakeRun([2], [1, 2, 3])
    switch.run(run)
    rows = {r["variant"]: r for r in run.rows}
    assert set(rows) == {"futex-same-cpu", "futex-cross-cpu", "pipe-same-cpu", "pipe-cross-cpu"}
    assert rows["futex-same-cpu"]["pinned"] is True and rows["futex-same-cpu"]["cpus"] == [2]
    assert rows["pipe-cross-cpu"]["pinned"] is False and rows["pipe-cross-cpu"]["cpus"] == [2, 1]
    assert (["threadswitch", "--rounds", "1", "--mode", "pipe", "--cpus", "2,1"], [2, 1]) in calls
    assert all(r["backend"] == "micro" and r["ctx_per_req"] > 0 for r in run.rows)
    assert any("idle entries per round trip" in line for line in run.lines)


def test_microbenchmarks_are_interleaved_in_rounds(kernel_only):
    run = FakeRun([0], [0, 1])
    run.repeat = 2
    switch.run(run)
    order = [(r["variant"], r["repeat"]) for r in run.rows]
    names = [name for name, _ in order[:4]]
    assert len(set(names)) == 4 and order == [(n, 1) for n in names] + [(n, 2) for n in names]


def test_one_cpu_skips_the_cross_cpu_rows_with_a_reason(monkeypatch):
    monkeypatch.setattr(switch, "c_command", lambda run: ["threadswitch"])
    monkeypatch.setattr(switch, "python_command", lambda run, bench: "not in this test")
    monkeypatch.setattr(switch, "go_command", lambda run: "not in this test")
    monkeypatch.setattr(switch, "per_request", lambda run: None)
    monkeypatch.setattr(switch, "run_json", fake_benchmark([]))
    run = FakeRun([0], [0])
    switch.run(run)
    assert {r["variant"] for r in run.rows} == {"futex-same-cpu", "pipe-same-cpu"}
    skipped = dict(run.skips)
    assert "only one CPU" in skipped["futex-cross-cpu"] and "only one CPU" in skipped["pipe-cross-cpu"]


def test_no_c_compiler_is_a_one_line_skip(monkeypatch):
    monkeypatch.setattr(buildcache, "c_compiler", lambda: None)
    assert switch.c_command(FakeRun([0], [0, 1])) == switch.NO_C_COMPILER
    assert "\n" not in switch.NO_C_COMPILER and "C compiler" in switch.NO_C_COMPILER


def test_the_c_source_ships_in_the_wheel():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = data["conclab.experiments"]
    shipped = {p for pattern in patterns for p in (ROOT / "experiments").glob(pattern)}
    assert switch.C_SOURCE.resolve() in {p.resolve() for p in shipped}


# -- the build cache (servers/buildcache.py) --------------------------------------------------------

class FakeCompiler:
    """subprocess.run for buildcache.run_compiler: writes the program at ``-o`` (or fails with the messages)."""

    def __init__(self, stderr=None):
        self.calls, self.stderr = [], stderr

    def __call__(self, argv, **kwargs):
        self.calls.append(argv)
        if self.stderr:
            return subprocess.CompletedProcess(argv, 1, "", self.stderr)
        out = Path(argv[argv.index("-o") + 1])
        out.write_text("#!/bin/sh\n")
        out.chmod(0o755)
        return subprocess.CompletedProcess(argv, 0, "", "")


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    """A stand-in threadswitch.c, built with a fake ``cc`` into a cache under tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(buildcache, "c_compiler", lambda: "cc")
    source = tmp_path / "threadswitch.c"
    source.write_text("int main(void) { return 0; }\n")
    monkeypatch.setattr(switch, "C_SOURCE", source)
    return source


def test_the_c_benchmark_is_built_once_per_source_version(fake_source, tmp_path, monkeypatch):
    compiler = FakeCompiler()
    monkeypatch.setattr(buildcache.subprocess, "run", compiler)
    first, again = switch.build_c(), switch.build_c()
    assert first == again and len(compiler.calls) == 1 and os.access(first, os.X_OK)
    assert first.parent.parent == tmp_path / "cache" / "conclab" and first.parent.name.startswith("threadswitch-")
    assert first.name == switch.C_BINARY and compiler.calls[0][:4] == ["cc", *switch.C_FLAGS]
    fake_source.write_text("int main(void) { return 1; }\n")
    edited = switch.build_c()
    assert edited != first and len(compiler.calls) == 2
    assert not list(edited.parent.glob(f".{switch.C_BINARY}.*.tmp"))


def test_a_failed_build_skips_with_the_first_error_line(fake_source, tmp_path, monkeypatch):
    monkeypatch.setattr(buildcache.subprocess, "run", FakeCompiler(
        "x.c: In function 'main':\nx.c:1:20: error: expected ';' before '}' token\n    1 | int main\n"))
    assert switch.c_command(FakeRun([0], [0, 1])) == \
        "building the C thread-switch benchmark failed: x.c:1:20: error: expected ';' before '}' token"
    assert not list((tmp_path / "cache").rglob(f"*{switch.C_BINARY}*"))


def test_a_failed_go_build_is_its_first_line_past_the_package_heading(tmp_path, monkeypatch):
    monkeypatch.setattr(buildcache.subprocess, "run", FakeCompiler(
        "# conclab/switchbench\n./main.go:7:2: undefined: runtme\n./main.go:8:2: undefined: sycall\n"))
    with pytest.raises(buildcache.BuildError) as failed:
        buildcache.build_once(tmp_path / "x-1", "prog", lambda out: buildcache.run_compiler(
            ["go", "build", "-o", str(out), "."], "the Go switch benchmark"))
    assert str(failed.value) == "building the Go switch benchmark failed: ./main.go:7:2: undefined: runtme"


# -- labels, the derived table, the finding and the chart -------------------------------------------

@pytest.mark.parametrize("bench, pinned, ctx, label", [
    ("futex", True, None, "kernel thread switch (futex, same CPU)"),
    ("futex", False, None, "kernel thread switch (futex, across CPUs)"),
    ("pipe", True, None, "kernel thread switch (pipe, same CPU)"),
    ("pipe", False, None, "kernel thread switch (pipe, across CPUs)"),
    ("thread", True, 2.58, "Python thread hand-off (lock + GIL; ~2.6 kernel switches each), same CPU"),
    ("thread", False, 1.0004, "Python thread hand-off (lock + GIL; ~1 kernel switch each), unpinned"),
    ("thread", True, None, "Python thread hand-off (lock + GIL), same CPU"),
    ("goroutine", True, None, "goroutine switch (Go, unbuffered channel), same CPU"),
    ("goroutine", False, None, "goroutine switch (Go, unbuffered channel), unpinned"),
    ("greenlet", True, None, "greenlet switch"),
    ("asyncio", True, None, "coroutine switch (asyncio)"),
    ("process_pipe", False, None, "process switch (Python processes, pipe, unpinned)"),
])
def test_labels_say_what_each_figure_measures(bench, pinned, ctx, label):
    assert derive.switch_label(bench, pinned, ctx) == label


def switch_run(*rows, spread: float = 0.0) -> SimpleNamespace:
    """A run whose switch.csv has rows (variant, bench, pinned, ns, voluntary, involuntary, cpu_ns or None,
    ctx_per_req or None); each ns_min/ns_max is ns -/+ ``spread`` x ns."""
    frame = pd.DataFrame([{c: None for c in COLUMNS["switch"]} | {
        "run_id": "t", "experiment": "switch", "backend": "micro", "variant": v, "repeat": 1, "bench": b,
        "pinned": int(p), "iterations": 1000, "rounds": 2, "ns_per_switch": ns, "ns_min": ns * (1 - spread),
        "ns_max": ns * (1 + spread), "ctx_voluntary": vol, "ctx_involuntary": invol,
        "cpu_us_per_req": None if cpu is None else cpu / 1000, "ctx_per_req": ctx, "source": "micro"}
        for v, b, p, ns, vol, invol, cpu, ctx in rows])
    return SimpleNamespace(tables={"switch": frame})


def micro_rows(*rows) -> pd.DataFrame:
    """derive.switch_micro of switch_run(*rows)."""
    return derive.switch_micro(switch_run(*rows))


BASELINE = (("futex-same-cpu", "futex", True, 2700.0, 2500, 1500, 2690.0, 1.0),
            ("futex-cross-cpu", "futex", False, 42000.0, 3900, 100, 19000.0, 1.0),
            ("greenlet-pinned", "greenlet", True, 280.0, 0, 0, 280.0, 0.0))


def test_switch_micro_labels_groups_and_counts():
    micro = micro_rows(*BASELINE, ("thread-pinned", "thread", True, 9000.0, 6000, 4000, None, None))
    assert list(micro.columns) == derive.SWITCH_COLUMNS
    thread = micro[micro.bench == "thread"].iloc[0]
    assert thread.ctx_per_switch == pytest.approx(10000 / 4000)           # counted: (vol + invol) / switches
    assert thread.ctx_invol_per_switch == pytest.approx(4000 / 4000)
    assert thread.measures == "Python thread hand-off (lock + GIL; ~2.5 kernel switches each), same CPU"
    cross = micro[micro.variant == "futex-cross-cpu"].iloc[0]
    assert cross.measures == "kernel thread switch (futex, across CPUs)" and cross.group == derive.KERNEL_GROUP
    assert cross.cpu_ns_per_switch == pytest.approx(19000.0)
    assert micro[micro.bench == "greenlet"].iloc[0].group == derive.RUNTIME_GROUP
    assert list(micro.group) == [derive.KERNEL_GROUP] * 3 + [derive.RUNTIME_GROUP]    # kernel rows first


def test_finding_explains_across_cpus_from_the_numbers():
    f = findings.switch(micro_rows(*BASELINE))
    assert f.facts["kernel_ns"] == pytest.approx(2700.0) and f.facts["cross_x"] == pytest.approx(42000 / 2700)
    assert f.facts["gap_ns"] == pytest.approx(42000 - 19000)                 # wall - CPU: neither thread ran
    assert f.facts["same_busy"] == pytest.approx(100 * 2690 / 2700)
    assert "neither thread ran" in f.text and "not extra switches" in f.text
    assert "plausible reading, not measured" in f.text and "inter-processor interrupt" in f.text
    assert "charged to the threads" in f.text                # CPU per switch rose 2,690 -> 19,000 ns
    assert "without idling" in f.text                        # 2,690 of 2,700 ns on the CPU


def test_finding_does_not_call_a_loaded_cpu_direct_handoff():
    rows = (("futex-same-cpu", "futex", True, 7000.0, 2500, 1500, 2800.0, 1.0), *BASELINE[1:])
    f = findings.switch(micro_rows(*rows))
    assert f.facts["same_busy"] == pytest.approx(40.0)
    assert "without idling" not in f.text and "cannot tell which" in f.text


def test_finding_makes_no_cross_cpu_story_when_crossing_costs_nothing():
    rows = (BASELINE[0], ("futex-cross-cpu", "futex", False, 2800.0, 3900, 100, 5000.0, 1.0))
    f = findings.switch(micro_rows(*rows))
    assert "about the same as on one CPU" in f.text and "interrupt" not in f.text


def pinning(pinned_ns, pinned_counts, free_ns, free_counts):
    return micro_rows(*BASELINE, ("thread-pinned", "thread", True, pinned_ns, *pinned_counts, None, None),
                      ("thread-unpinned", "thread", False, free_ns, *free_counts, None, None))


def test_finding_pinned_slower_with_more_switches_says_why():
    f = findings.switch(pinning(10500.0, (6300, 4400), 7800.0, (4000, 0)))
    assert f.facts["pin_ctx"] == pytest.approx(10700 / 4000, abs=0.006) and f.facts["free_ctx"] == pytest.approx(1.0)
    assert f.facts["extra_ctx"] == pytest.approx(6700 / 4000, abs=0.006)
    assert f.facts["pin_x"] == pytest.approx(10500 / 7800)
    assert "Pinned is" in f.text and "finds the GIL taken" in f.text
    assert f.facts["thread_ns"] == pytest.approx(10500.0)


def test_finding_pinned_slower_with_as_many_switches_claims_no_cause():
    f = findings.switch(pinning(10500.0, (6000, 4000), 7800.0, (6000, 4000)))
    assert "do not explain" in f.text and "GIL taken" not in f.text


def test_finding_unpinned_slower_without_preemptions_points_at_crossing_cpus():
    f = findings.switch(pinning(7000.0, (6000, 4000), 37000.0, (4000, 0)))
    assert f.facts["free_x"] == pytest.approx(37000 / 7000) and f.facts["cross_x"] == pytest.approx(42000 / 2700)
    assert "Unpinned is" in f.text and "seldom took the waker's CPU" in f.text and "across CPUs cost" in f.text
    assert "GIL taken" not in f.text


def test_finding_unpinned_slower_with_the_same_counts_does_not_blame_crossing():
    f = findings.switch(pinning(7000.0, (6000, 4000), 10000.0, (6100, 4100)))
    assert "Unpinned is" in f.text and "do not show the hand-offs crossing CPUs" in f.text
    assert "seldom" not in f.text and "across CPUs cost" not in f.text


def test_finding_about_the_same_within_noise():
    f = findings.switch(pinning(8000.0, (6000, 4000), 8300.0, (4000, 0)))
    assert "about the same time" in f.text and "Pinned is" not in f.text and "Unpinned is" not in f.text


def test_finding_without_the_kernel_baseline_still_compares_the_python_hand_off():
    micro = micro_rows(("thread-pinned", "thread", True, 9000.0, 6000, 4000, None, None), BASELINE[2])
    f = findings.switch(micro)
    assert f.title.startswith("A Python thread hand-off costs") and "kernel_ns" not in f.facts
    assert f.facts["times"] == pytest.approx(9000 / 280)


THREAD_PINNED = ("thread-pinned", "thread", True, 9000.0, 6000, 4000, None, None)


def test_switch_claim_compares_the_kernel_switch_and_labels_the_python_hand_off():
    claim = claims.switch_claim(switch_run(*BASELINE, THREAD_PINNED))
    base, greenlet = claim.measured.split("; ")[:2]
    assert base.startswith("kernel thread switch (futex, one CPU)")
    assert greenlet.startswith("greenlet") and "cheaper" in greenlet and f"{2700 / 280:.3g}" in greenlet
    assert "for comparison: Python thread hand-off (a lock and the GIL)" in claim.measured
    assert claim.verdict == "holds"


def test_switch_claim_without_the_kernel_baseline_says_it_is_the_python_hand_off():
    claim = claims.switch_claim(switch_run(BASELINE[2], THREAD_PINNED))
    assert claim.measured.startswith("Python thread hand-off (a lock and the GIL)")
    assert "kernel" not in claim.measured and claim.verdict == "holds"


def test_switch_claim_within_noise_is_a_tie_not_cheaper():
    futex = ("futex-same-cpu", "futex", True, 300.0, 2500, 1500, 300.0, 1.0)
    claim = claims.switch_claim(switch_run(futex, BASELINE[2], spread=0.2))     # 240..360 vs 224..336 ns
    assert "a tie within noise" in claim.measured and "cheaper" not in claim.measured
    assert claim.verdict == "does not hold here"


def test_chart_groups_kernel_and_runtime_bars_under_their_labels():
    micro = pinning(10500.0, (6300, 4400), 7800.0, (4000, 0))
    with style.context():
        fig = charts.draw_switch(micro, findings.switch(micro))
    kernel, runtime = fig.axes[:2]
    assert kernel.get_title(loc="left").startswith("kernel") and runtime.get_title(loc="left").startswith("runtime")
    shown = [t.get_text().replace("\n", " ") for t in kernel.get_yticklabels()]
    assert "kernel thread switch (futex, across CPUs)" in shown
    assert "Python thread hand-off (lock + GIL; ~2.7 kernel switches each), same CPU" in shown
    assert [t.get_text() for t in runtime.get_yticklabels()] == ["greenlet switch"]


# -- the real program ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def threadswitch(tmp_path_factory):
    """The C baseline compiled into a fresh cache (so the test builds it for real)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    try:
        yield switch.build_c()
    finally:
        patch.undo()


def run_c(binary: Path, mode: str, cpus: list) -> dict:
    done = subprocess.run([str(binary), "--mode", mode, "--cpus", ",".join(map(str, cpus)), "--iterations",
                           str(ROUND_TRIPS), "--rounds", "1"], capture_output=True, text=True, timeout=120)
    return switch.parse_json(done.stdout, done.stderr, done.returncode)


def placements() -> list:
    cpus = sorted(os.sched_getaffinity(0))
    return [("same-cpu", cpus[:1])] + ([("cross-cpu", cpus[:2])] if len(cpus) > 1 else [])


@pytest.mark.live
@pytest.mark.parametrize("mode", switch.KERNEL_BENCHES)
def test_c_benchmark_reports_every_mode(threadswitch, mode):
    for placement, cpus in placements():
        result = run_c(threadswitch, mode, cpus)
        assert (result["bench"], result["placement"], result["iterations"]) == (mode, placement, ROUND_TRIPS)
        assert result["cpus"] == (cpus * 2)[:2]
        assert 0 < result["ns_min"] <= result["ns_per_switch"] <= result["ns_max"]
        assert result["cpu_ns"] > 0 and result["ctx_voluntary"] + result["ctx_involuntary"] > 0
        row = switch.micro_row(result, mode, placement == "same-cpu", cpus)
        assert row["ctx_per_req"] > 0 and row["cpu_us_per_req"] > 0


@pytest.mark.live
def test_futex_on_one_cpu_switches_at_least_once_per_round_trip(threadswitch):
    """Both threads on one CPU and no spinning: the other thread can only run after a context switch."""
    result = run_c(threadswitch, "futex", placements()[0][1])
    assert result["ctx_per_round_trip"] >= 1
    assert result["ctx_per_round_trip"] == pytest.approx(
        (result["ctx_voluntary"] + result["ctx_involuntary"]) / ROUND_TRIPS, abs=1e-3)


@pytest.mark.live
def test_c_benchmark_is_built_once_into_the_cache(threadswitch):
    stamp = threadswitch.stat().st_mtime_ns
    assert switch.build_c() == threadswitch and threadswitch.stat().st_mtime_ns == stamp
    assert threadswitch.parent.name.startswith("threadswitch-") and os.access(threadswitch, os.X_OK)


@pytest.mark.live
def test_c_benchmark_rejects_a_cpu_it_may_not_use(threadswitch):
    done = subprocess.run([str(threadswitch), "--mode", "futex", "--cpus", "4095", "--iterations", "10"],
                          capture_output=True, text=True, timeout=60)
    with pytest.raises(RuntimeError, match="cannot pin a thread to CPU 4095"):
        switch.parse_json(done.stdout, done.stderr, done.returncode)


@pytest.mark.live
def test_a_real_compile_error_is_one_line(tmp_path, monkeypatch):
    cc = buildcache.c_compiler()
    if cc is None:
        pytest.skip(switch.NO_C_COMPILER)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    source = tmp_path / "broken.c"
    source.write_text("int main(void) { return 0 }\n")
    with pytest.raises(buildcache.BuildError) as failed:
        buildcache.build_c(cc, source, what="the broken program")
    message = str(failed.value)
    assert message.startswith("building the broken program failed: ") and "error" in message and "\n" not in message


@pytest.mark.live
def test_python_benchmark_reports_cpu_time():
    done = subprocess.run([sys.executable, "-m", "conclab.experiments.switchbench", "thread", "--rounds", "1",
                           "--round-s", "0.01"], capture_output=True, text=True, timeout=120)
    result = switch.parse_json(done.stdout, done.stderr, done.returncode)
    row = switch.micro_row(result, "thread", True, [0])
    assert result["cpu_ns"] > 0 and row["cpu_us_per_req"] > 0 and row["ctx_per_req"] > 0
