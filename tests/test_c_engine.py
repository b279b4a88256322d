"""``conclab load --engine c``: the compiled closed and open loop (loadgen/cengine.py, loadgen/c/).

Unit tests check the options the engine refuses (one line, exit 2), the histogram
conversion, the build cache and the harness's choice of engine, without starting
a process. Live tests build the two C programs with cc and run them for about a
second against real servers: the result has the keys the harness needs, the
requests counted are exactly the server's, the open loop keeps its schedule and
shows a stalled server in the latency of every request scheduled meanwhile.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

from conclab.experiments.harness import cli as harness_cli
from conclab.experiments.harness import loadproc
from conclab.experiments.harness.tables import COLUMNS
from conclab.loadgen import cengine, histo
from conclab.loadgen import cli as load_cli
from conclab.loadgen.params import LoadError, LoadParams
from conclab.servers import VARIANTS, buildcache
from conclab.servers.launcher import ServerProcess, wait_until

CLOSED_VARIANTS = ("epoll", "go")
RUN_TIMEOUT_S = 30


# -- unit: what the engine refuses ----------------------------------------------------------------------

@pytest.mark.parametrize("extra, option", [
    (["--procs", "2"], "--procs"),
    (["--mode", "hold"], "--mode hold"),
    (["--protocol", "raw"], "--protocol raw"),
    (["--source-addrs", "127.0.0.2"], "--source-addrs"),
    (["--connect-timeout", "1"], "--connect-timeout"),
    (["--mode", "hold", "--keepalive", "1"], "--mode hold"),
    (["--op", "work", "--size", "40000"], "--size above 32768 with --op work"),
])
def test_what_the_c_engine_cannot_do_is_a_one_line_usage_error(capsys, extra, option):
    code = load_cli.main(["--engine", "c", "--target", "127.0.0.1:9", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == load_cli.EXIT_USAGE
    assert err == [f"conclab load: error: --engine c: {option} is not supported"]


def test_the_c_engine_takes_every_option_the_harness_passes():
    args = loadproc.argv("127.0.0.1:9", "closed", 50, 2.0, size=64, op="work", work=(100, 5),
                         pipeline=2, warmup=0.5, connect_rate=500.0, cpus=[0], engine="c")
    parsed = load_cli.build_parser().parse_args(args[3:])
    assert parsed.engine == "c"
    load_cli.params_from(parsed).validate()             # raises LoadError if the engine refused one


def test_the_command_carries_the_exact_request_and_reply_bytes():
    params = LoadParams(target="127.0.0.1:9", engine="c", op="work", work="1000,50", size=3, mode="open", rate=10)
    args = cengine.command(params, cengine.SOURCES["open"])
    request, reply = params.request_and_reply()
    assert args[args.index("--request") + 1] == request.hex() and args[args.index("--reply") + 1] == reply.hex()
    assert args[args.index("--rate") + 1] == "10" and "--announce" not in args
    echo = cengine.command(params.replace(op="echo", work="0,0", size=1_048_575), cengine.SOURCES["open"])
    assert echo[echo.index("--size") + 1] == "1048575" and "--request" not in echo     # no megabytes of argv


def test_histogram_of_keeps_counts_and_buckets():
    pairs = [[0, 1], [7, 3], [2047, 2], [2048, 5], [123_456, 1], [cengine.histo.HIGHEST_US + 5, 2]]
    histogram, clamped = cengine.histogram_of(pairs)
    assert histogram.get_total_count() == 14 and clamped == 2
    summary = histo.summary(histogram)
    assert summary["p50"] == histogram.get_highest_equivalent_value(2048)      # the 7th of 14 values
    assert summary["max"] == histogram.get_highest_equivalent_value(histo.HIGHEST_US)
    assert histo.decode(histo.encode(histogram)).get_total_count() == 14


# -- unit: the build cache and the harness's engine ------------------------------------------------------

def test_build_once_compiles_once_and_leaves_no_half_binary(tmp_path):
    calls = []

    def compile_to(partial):
        calls.append(partial)
        partial.write_text("#!/bin/sh\n")
        partial.chmod(0o755)

    first = buildcache.build_once(tmp_path / "x-1", "prog", compile_to)
    again = buildcache.build_once(tmp_path / "x-1", "prog", compile_to)
    assert first == again and len(calls) == 1 and not calls[0].exists()

    def broken(partial):
        partial.write_text("half")
        raise RuntimeError("cc: error: broken")
    with pytest.raises(RuntimeError, match="broken"):
        buildcache.build_once(tmp_path / "y-1", "prog", broken)
    assert [p.name for p in (tmp_path / "y-1").iterdir()] == [".lock"]


def test_the_cache_key_follows_the_source(tmp_path):
    source = tmp_path / "loop.c"
    source.write_text("int main(void) { return 0; }\n")
    before = buildcache.cache_dir("loop", [source])
    source.write_text("int main(void) { return 1; }\n")
    assert buildcache.cache_dir("loop", [source]) != before


def fake_cc(calls: list):
    """subprocess.run for buildcache.run_compiler: records the argv and writes a program at ``-o``."""
    def run(argv, **kwargs):
        calls.append(argv)
        out = Path(argv[argv.index("-o") + 1])
        out.write_text("#!/bin/sh\n")
        out.chmod(0o755)
        return subprocess.CompletedProcess(argv, 0, "", "")
    return run


def test_editing_the_shared_header_rebuilds_the_loop(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(buildcache, "c_compiler", lambda: "cc")
    monkeypatch.setattr(buildcache.subprocess, "run", fake_cc(calls))
    (tmp_path / "wire.h").write_text("#define KINDS 14\n")
    source = tmp_path / "loop.c"
    source.write_text('#include <stdio.h>\n#include "wire.h"\nint main(void) { return KINDS; }\n')
    first, again = cengine.build(source=source), cengine.build(source=source)
    assert first == again and len(calls) == 1 and first.name == "loop"
    (tmp_path / "wire.h").write_text("#define KINDS 15\n")
    edited = cengine.build(source=source)
    assert edited != first and edited.parent.name.startswith("loop-") and len(calls) == 2
    assert calls[0][:3] == ["cc", "-O2", "-Wall"] and calls[0][-1] == str(source)


def test_both_loops_are_keyed_by_their_source_and_the_header_they_share():
    header = cengine.SOURCE_DIR / "wire.h"
    for source in cengine.SOURCES.values():
        assert buildcache.c_inputs(source) == [source, header]


def test_a_failed_build_is_one_line_naming_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(buildcache, "c_compiler", lambda: "cc")
    monkeypatch.setattr(buildcache.subprocess, "run", lambda argv, **kw: subprocess.CompletedProcess(
        argv, 1, "", "In file included from loop.c:2:\nwire.h:3:1: error: unknown type name 'x'\n"))
    source = tmp_path / "loop.c"
    source.write_text("x\n")
    with pytest.raises(LoadError) as failed:
        cengine.build(source=source)
    assert str(failed.value) == "building loop.c failed: wire.h:3:1: error: unknown type name 'x'"


def test_the_shared_header_ships_in_the_wheel():
    root = cengine.SOURCE_DIR.parent.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p.resolve() for pattern in patterns["conclab.loadgen"] for p in (root / "loadgen").glob(pattern)}
    assert {path.resolve() for source in cengine.SOURCES.values() for path in buildcache.c_inputs(source)} <= shipped


def test_points_the_c_engine_cannot_run_use_python():
    assert loadproc.engine_for("c", "closed") == "c"
    assert loadproc.engine_for("c", "open") == "c"
    assert loadproc.engine_for("c", "hold") == loadproc.engine_for("c", "closed", procs=2) == "python"
    assert loadproc.engine_for("python", "closed") == loadproc.engine_for(None, "closed") == "python"
    assert "--engine" not in loadproc.argv("127.0.0.1:9", "hold", 10, 1.0, engine="c")
    assert loadproc.flatten({"params": {"engine": "c"}})["loadgen_engine"] == "c"
    assert loadproc.flatten({"params": {"engine": "native"}})["loadgen_engine"] == "python"
    assert "loadgen_engine" in COLUMNS["throughput"] and "loadgen_engine" in COLUMNS["latency"]


def test_without_a_compiler_the_harness_warns_once_and_uses_python(monkeypatch, capsys):
    monkeypatch.delenv(loadproc.LOADGEN_ENV, raising=False)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert harness_cli.choose_engine(None) == "python"
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(harness_cli.UsageError, match="--loadgen-engine c: no C compiler"):
        harness_cli.choose_engine("c")
    assert harness_cli.choose_engine("python") == "python"


# -- live: the build ------------------------------------------------------------------------------------

@pytest.mark.live
def test_both_loops_build_into_a_fresh_cache_without_a_warning(tmp_path, monkeypatch):
    cc = buildcache.c_compiler()
    assert cc, "the compiled engine's tests need a C compiler (cc or gcc)"
    cache = tmp_path / "cache"                                      # not there yet: the build creates it
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    for loop, source in cengine.SOURCES.items():
        binary = cengine.build(loop)
        assert binary.parent.parent == cache / "conclab" and binary.name == source.stem
        shown = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                               check=False)
        assert shown.returncode == 0 and shown.stdout.startswith(f"usage: {source.stem} --target HOST:PORT")
        warned = subprocess.run([cc, *buildcache.C_FLAGS, "-c", "-o", os.devnull, str(source)],
                                capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
        assert (warned.returncode, warned.stderr) == (0, "")


# -- live: against real servers --------------------------------------------------------------------------

def available_server(backend: str) -> ServerProcess:
    reason = VARIANTS[backend].unavailable()
    if reason:
        pytest.skip(f"{backend}: {reason}")
    return ServerProcess(backend)


def load(*args: str, stderr=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "conclab.loadgen", "--engine", "c", "--json", "--quiet", *args],
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def result_of(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.live
@pytest.mark.parametrize("backend", CLOSED_VARIANTS)
def test_closed_loop_counts_exactly_what_the_server_answered(backend):
    with available_server(backend) as server:
        before = server.stats()["requests_total"]
        result = result_of(load("--target", server.target, "--conns", "5", "--pipeline", "2",
                                "--warmup", "0.2", "--duration", "0.5"))
        served = server.stats()["requests_total"] - before - 1         # minus the STATS that read it
    engine = result["c_engine"]
    assert result["errors"] == {} and result["requests"] > 0
    assert served == engine["replies_total"] == engine["sent_total"]   # the drain brought every reply back
    assert result["requests"] < engine["replies_total"]                 # the warm-up's are not counted
    assert histo.decode(result["histogram"]).get_total_count() == result["requests"] == result["latency_us"]["count"]
    assert result["connections"] == {"requested": 5, "opened": 5, "failed": 0, "served": 5, "lost": 0,
                                     "lost_in_flight": 0}
    assert all(key in result for key in loadproc.REQUIRED_KEYS)
    row = loadproc.flatten(result)
    assert set(row) <= set(COLUMNS["throughput"]) and row["loadgen_engine"] == "c"
    # valid unless the engine judged itself saturated (every other reason is ruled out above): whether it is
    # depends on the machine, so the test checks the judgement is carried, not its outcome
    assert 0 < row["loadgen_cpu_percent"] <= 100 and row["valid"] is not bool(result["loadgen_saturated"])
    assert row["p50_us"] <= row["p99_us"] <= row["max_us"]


@pytest.mark.live
def test_work_requests_are_sent_and_checked():
    with available_server("epoll") as server:
        result = result_of(load("--target", server.target, "--conns", "2", "--op", "work", "--work", "2000,0",
                                "--size", "8", "--warmup", "0", "--duration", "0.4"))
    assert result["errors"] == {} and result["requests"] > 0
    assert result["latency_us"]["p50"] >= 2000                         # the server waited 2 ms for each


@pytest.mark.live
def test_open_loop_keeps_its_schedule_and_shows_a_stall_in_latency():
    rate, duration, stall_s = 1000, 1.5, 0.4
    with available_server("epoll") as server, tempfile.TemporaryFile("w+") as err:
        proc = load("--target", server.target, "--mode", "open", "--rate", str(rate), "--conns", "4",
                    "--warmup", "0.2", "--duration", str(duration), stderr=err)
        window = []

        def announced() -> bool:
            err.seek(0)
            window[:] = [float(x) for line in err for x in line.split()[3:5] if line.startswith("conclab load: window")]
            return bool(window)
        assert wait_until(announced, timeout=RUN_TIMEOUT_S)
        time.sleep(max(0.0, window[0] + 0.4 - time.monotonic()))       # a while into the measured window
        os.kill(server.pid, signal.SIGSTOP)
        try:
            time.sleep(stall_s)                                        # the stall itself
        finally:
            os.kill(server.pid, signal.SIGCONT)
        result = result_of(proc)
    o = result["open_loop"]
    assert abs(o["offered"] - rate * duration) <= 1 and abs(o["sent"] - o["offered"]) <= 1
    assert o["unsent"] <= 1 and o["unanswered"] == 0 and result["requests"] == o["sent"]
    # Every request scheduled during the stall waited for it, from its schedule: ~stall_s x rate of them
    # were slow, up to the stall's length (a client measuring from its own sends would show a handful).
    latency = histo.decode(result["histogram"])
    slow = latency.get_total_count() - count_at_or_below(latency, 50_000)
    assert slow >= 0.5 * (stall_s - 0.05) * rate
    assert result["latency_us"]["max"] >= 0.8 * stall_s * 1e6
    assert o["uncorrected_latency_us"]["p90"] < result["latency_us"]["p90"]
    # Those requests waited for their connection's reply (one in flight each): held, the server's lateness;
    # the others are the loop's own sends, each counted once.
    assert o["held"] >= 0.5 * (stall_s - 0.05) * rate
    assert o["held"] + o["own_send_lateness_us"]["count"] == o["sent"]
    # Between slots it polls; what found nothing is waiting, not load: the self-check leaves it out.
    engine = result["c_engine"]
    assert 0 < engine["wait_s"] <= engine["cpu_s"]
    assert result["loadgen_cpu_percent"] == pytest.approx(
        100 * (engine["cpu_s"] - engine["wait_s"]) / result["duration_s"], abs=0.1)


def count_at_or_below(histogram, value_us: int) -> int:
    return sum(histogram.get_count_at_index(i) for i in range(histogram.get_counts_array_index(value_us) + 1))


@pytest.mark.live
@pytest.mark.parametrize("mode", ["closed", "open"])
def test_rate_limited_requests_are_counted_and_the_connections_kept(mode):
    """A server rejecting over its rate (ERROR 'rate limited', connection kept): errors by kind, as the Python
    engine counts them; every connection stays open and served."""
    with ServerProcess("epoll", ["--rate-limit", "200", "--rate-limit-mode", "reject"]) as server:
        before = server.stats()["requests_total"]
        rate = ["--rate", "2000"] if mode == "open" else []
        result = result_of(load("--target", server.target, "--mode", mode, *rate, "--conns", "2",
                                "--warmup", "0", "--duration", "0.5"))
        served = server.stats()["requests_total"] - before - 1
    assert set(result["errors"]) == {"rate_limited"} and result["errors"]["rate_limited"] > 0
    assert result["connections"]["lost"] == 0 and result["connections"]["served"] == 2
    assert result["requests"] > 0 and result["unanswered"] == 0
    if mode == "closed":                                              # the server counts what it served
        engine = result["c_engine"]
        assert served == engine["replies_total"] == engine["sent_total"] - result["errors"]["rate_limited"]


@pytest.mark.live
def test_the_first_interrupt_ends_the_window_early_with_a_result():
    with available_server("epoll") as server, tempfile.TemporaryFile("w+") as err:
        proc = load("--target", server.target, "--conns", "2", "--warmup", "0", "--duration", "20", stderr=err)

        def announced() -> bool:
            err.seek(0)
            return "conclab load: window" in err.read()
        assert wait_until(announced, timeout=RUN_TIMEOUT_S)
        assert wait_until(lambda: server.stats()["requests_total"] > 100, timeout=RUN_TIMEOUT_S)
        proc.send_signal(signal.SIGINT)
        result = result_of(proc)
    assert 0 < result["duration_s"] < 20 and result["requests"] > 0 and result["errors"] == {}
