"""The independent C open-loop client (loadgen/c/openloop.c) and its comparison driver (benchmarks/openloop_c/).

The live tests build ``openloop.c`` with ``cc`` and run it for about a second
at a low rate against a live epoll server; the unit tests check the driver's
table and ratios with made-up numbers and start no process.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from conclab.servers.launcher import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "benchmarks" / "openloop_c" / "compare.py"


def load_driver():
    spec = importlib.util.spec_from_file_location("openloop_compare", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = load_driver()


# -- unit: the table and the ratios ------------------------------------------------------------------

def run(rate, client, rnd, p50, p99, unc=None):
    return {"rate": rate, "client": client, "round": rnd, "p50": p50, "p99": p99, "uncorrected_p50": unc}


SYNTHETIC = [
    # rate 1000: Python 10-20 % above C, within 1.25x
    run(1000, "python", 1, 110, 440, 90), run(1000, "c", 1, 100, 400, 80),
    run(1000, "python", 2, 120, 480, 95), run(1000, "c", 2, 100, 400, 85),
    run(1000, "python", 3, 115, 460, 92), run(1000, "c", 3, 100, 400, 80),
    # rate 500 (listed second, sorted first): Python p50 twice C's
    run(500, "c", 1, 50, 300), run(500, "python", 1, 100, 330),
    run(500, "c", 2, 60, 200), run(500, "python", 2, 120, 260),
]


def test_summarize_rows_medians_and_spread():
    rows = compare.summarize(SYNTHETIC)
    assert [(r["rate"], r["client"]) for r in rows] == [
        (500, "python"), (500, "c"), (500, "python/c"), (1000, "python"), (1000, "c"), (1000, "python/c")]
    py1000 = rows[3]
    assert py1000["rounds"] == 3
    assert py1000["p50"] == {"median": 115, "min": 110, "max": 120}
    assert py1000["p99"] == {"median": 460, "min": 440, "max": 480}
    assert py1000["uncorrected_p50"]["median"] == 92
    assert rows[1]["p50"] == {"median": 55, "min": 50, "max": 60}        # even count: mean of the middle two
    assert rows[1]["uncorrected_p50"] is None                              # not given: left out, not zero


def test_summarize_ratios_and_agreement():
    rows = compare.summarize(SYNTHETIC)
    r500, r1000 = rows[2], rows[5]
    assert r1000["p50_ratio"] == pytest.approx(115 / 100)
    assert r1000["p99_ratio"] == pytest.approx(460 / 400)
    assert r1000["uncorrected_p50_ratio"] == pytest.approx(92 / 80)
    assert r1000["p50_paired"] == pytest.approx(1.15)                      # median of 1.10, 1.20, 1.15
    assert r1000["agree"] is True
    assert r500["p50_ratio"] == pytest.approx(110 / 55)
    assert r500["p99_ratio"] == pytest.approx(295 / 250)
    assert r500["p50_paired"] == pytest.approx(2.0)                        # 100/50 and 120/60
    assert r500["p99_paired"] == pytest.approx((330 / 300 + 260 / 200) / 2)
    assert r500["uncorrected_p50_ratio"] is None
    assert r500["agree"] is False                                          # p50 twice: outside 1.25x


def test_agreement_is_symmetric_and_bounded():
    def agree(py, c):
        return compare.summarize([run(1, "python", 1, py, py), run(1, "c", 1, c, c)])[-1]["agree"]
    assert agree(100, 100)
    assert agree(125, 100) and agree(100, 125)                             # the bound itself agrees
    assert not agree(126, 100) and not agree(100, 126)                     # either direction fails


def test_one_client_only_has_no_ratio_row():
    rows = compare.summarize([run(1000, "c", 1, 100, 400)])
    assert [r["client"] for r in rows] == ["c"]


def test_ratio_of_zero_is_none_not_a_crash():
    rows = compare.summarize([run(1, "python", 1, 5, 10), run(1, "c", 1, 0, 0)])
    assert rows[-1]["p50_ratio"] is None and rows[-1]["agree"] is False
    assert "n/a" in compare.format_table(rows)


def test_format_table_markdown():
    rows = compare.summarize(SYNTHETIC)
    text = compare.format_table(rows, {500: 0.25, 1000: 0.5})
    lines = text.splitlines()
    assert lines[0].startswith("| rate (req/s) | client | p50")
    assert len(lines) == 2 + len(rows)
    assert all(line.count("|") == 7 for line in lines)                     # six columns on every line
    assert "| 1,000 (50%) | python | 115 (110-120) | 460 (440-480) | 92 | n/a |" in lines
    assert "| 1,000 (50%) | Python / C | **1.15x** (paired 1.15x) | **1.15x** (paired 1.15x) | 1.15x | |" in lines
    assert "| 500 (25%) | Python / C | **2.00x** (paired 2.00x)" in text


def test_others_percent_subtracts_our_own_cpu():
    # 2 CPUs, 10 s: 2000 jiffies in all, 1200 busy (60 %); we used 8 CPU-seconds of 20 (40 %): others 20 %
    assert compare.others_percent((0, 0), (1200, 2000), ours_cpu_s=8.0, wall_s=10.0, ncpu=2) == 20.0
    assert compare.others_percent((500, 1000), (700, 2000), ours_cpu_s=4.0, wall_s=10.0, ncpu=2) == 0.0   # never < 0
    assert compare.others_percent((0, 0), (0, 0), ours_cpu_s=1.0, wall_s=1.0, ncpu=2) == 0.0               # no time


def test_quiet_rounds_drop_the_whole_round():
    def busy(rate, client, rnd, others):
        return dict(run(rate, client, rnd, 10, 20), others_busy_percent=others)
    runs = [busy(1, "python", 1, 5.0), busy(1, "c", 1, 40.0),           # round 1: C's run was noisy
            busy(1, "python", 2, 10.0), busy(1, "c", 2, 10.0),
            busy(2, "python", 1, 0.0), busy(2, "c", 1, 0.0)]
    kept = compare.quiet_rounds(runs, 25.0)
    assert [(r["rate"], r["round"], r["client"]) for r in kept] == [
        (1, 2, "python"), (1, 2, "c"), (2, 1, "python"), (2, 1, "c")]
    rows = compare.summarize(kept)
    assert rows[0]["others_busy_percent"] == {"median": 10.0, "min": 10.0, "max": 10.0}
    assert "| 1 | python | 10 (10-10) | 20 (20-20) | n/a | 10 |" in compare.format_table(rows)


def test_pinned_prefixes_taskset():
    assert compare.pinned(["x", "y"], None) == ["x", "y"]
    argv = compare.pinned(["x"], 1)
    assert argv[0].endswith("taskset") and argv[1:] == ["-c", "1", "x"]


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        compare.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--backend", "--fractions", "--rounds", "--duration", "--conns", "--c-spin-us", "--quiet-below"):
        assert option in out


# -- live: the C client against a real server ---------------------------------------------------------

@pytest.fixture(scope="module")
def binary():
    """The C client, compiled with cc (a process: only live tests use it)."""
    try:
        return compare.build()
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def server():
    with ServerProcess("epoll") as server:
        yield server


class TestLive:
    pytestmark = pytest.mark.live

    def client(self, binary, *argv):
        done = subprocess.run([str(binary), *map(str, argv)], capture_output=True, text=True, timeout=60)
        return done

    def test_low_rate_everything_answered(self, binary, server):
        args = argparse.Namespace(conns=4, duration=1.0, warmup=0.2, pipeline=1, c_spin_us=0)
        r = compare.run_c(binary, server.target, 200, args, None)
        assert r["count"] > 0
        assert r["sent"] > 0 and r["answered"] == r["sent"] == r["count"]
        assert r["unanswered"] == 0 and r["unsent"] == 0 and r["errors"] == 0
        assert 0 < r["p50"] <= r["p90"] <= r["p99"] <= r["p999"] <= r["max"]
        assert r["uncorrected_p50"] <= r["p50"]               # from the actual send: never more than from schedule

    def test_schedule_count_and_warmup_excluded(self, binary, server):
        done = self.client(binary, "--target", server.target, "--rate", 100, "--conns", 2,
                           "--duration", 1, "--warmup", 0.5, "--pipeline", 0)
        assert done.returncode == 0, done.stderr
        r = json.loads(done.stdout)
        assert r["scheduled"] == 100                          # rate x duration; the warm-up's 50 are not counted
        assert r["sent"] == r["answered"] == r["count"] == 100
        assert r["pipeline"] == 0 and r["size"] == 64

    def test_refused_target_fails_cleanly(self, binary):
        from conclab.servers.launcher import free_port
        done = self.client(binary, "--target", f"127.0.0.1:{free_port()}", "--rate", 10, "--conns", 1,
                           "--duration", 1)
        assert done.returncode == 2
        assert "connect" in done.stderr and done.stdout == ""

    def test_bad_arguments(self, binary):
        done = self.client(binary, "--rate", 10)
        assert done.returncode == 2 and "usage" in done.stderr

    def test_slices_add_up_and_turnover_replaces_idle_connections_losing_nothing(self, binary, server):
        """--slice-s: a line per whole slice before the result; --replace: that many connections a slice are
        closed and reopened (the server accepts each), and nothing scheduled is lost or left unsent."""
        accepted_before = server.stats()["connections_total"]
        done = self.client(binary, "--target", server.target, "--rate", 400, "--conns", 10, "--duration", 2,
                           "--pipeline", 4, "--slice-s", 0.5, "--replace", 2)
        assert done.returncode == 0, done.stderr
        *lines, final = map(json.loads, done.stdout.splitlines())
        assert [line["slice"] for line in lines] == list(range(len(lines))) and 3 <= len(lines) <= 4
        for line in lines:
            assert line["replies"] == sum(count for _, count in line["histogram"]) > 0
            assert 0 <= line["late"] <= line["sent"] and line["wall_s"] > 0
        assert sum(line["sent"] for line in lines) <= final["sent"] == final["scheduled"]
        assert sum(line["replies"] for line in lines) <= final["answered"] == final["sent"]
        assert final["unsent"] == final["unanswered"] == final["errors"] == 0
        assert final["replaced"] == lines[-1]["replaced"] == 2 * len(lines) and final["replace_failed"] == 0
        assert server.stats()["connections_total"] - accepted_before == 10 + final["replaced"] + 1   # + this STATS

    def test_replace_needs_slices(self, binary, server):
        done = self.client(binary, "--target", server.target, "--rate", 10, "--conns", 1, "--duration", 1,
                           "--replace", 1)
        assert done.returncode == 2 and "--replace with --slice-s" in done.stderr
