"""The experiments harness: a tiny real run, its files and columns, skips, fits, the loadgen adapter, clean stops."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import psutil
import pytest


from conclab import servers as variants
from conclab.experiments import memory, registry, switch
from conclab.experiments.harness import cli, loadproc, schedule, summary
from conclab.experiments.harness.run import describe
from conclab.servers import processes
from conclab.experiments.harness.fit import least_squares
from conclab.servers.launcher import ServerProcess, ServerStartError
from conclab.servers.protocol import ECHO
from conclab.experiments.harness.tables import COLUMNS, ColumnError, TableWriter

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "experiments.md"
BACKENDS = "threads,asyncio,uvloop"        # uvloop is made "unavailable" to check that skips are recorded
SKIP_REASON = "pretend-missing: this test says uvloop cannot run here"
RUN_ID = "test-run"

# A stand-in load generator: the CLI and JSON of docs/protocol.md section 5 and nothing more. Only these
# tests use it, to show the adapter depends on that contract alone; the harness run uses the real one.
FAKE_LOADGEN = r'''
import argparse, json, socket, struct, sys, time
p = argparse.ArgumentParser()
for name in ("--target", "--mode", "--op", "--work", "--cpus"):
    p.add_argument(name)
for name in ("--conns", "--size", "--pipeline", "--procs"):
    p.add_argument(name, type=int, default=0)
for name in ("--duration", "--rate", "--warmup", "--connect-rate"):
    p.add_argument(name, type=float, default=0.0)
p.add_argument("--json", action="store_true")
a = p.parse_args()
host, port = a.target.rsplit(":", 1)
socks = [socket.create_connection((host, int(port)), timeout=5) for _ in range(a.conns)]
frame = struct.pack(">IB", 1 + a.size, 1) + b"x" * a.size
done, t0 = 0, time.monotonic()
while time.monotonic() - t0 < a.duration:
    for s in socks:
        s.sendall(frame)
        got = 0
        while got < len(frame):
            got += len(s.recv(len(frame) - got))
        done += 1
elapsed = time.monotonic() - t0
print("a line that is not JSON")
print(json.dumps({"params": vars(a), "requests": done, "errors": {}, "duration_s": elapsed,
                  "throughput_rps": done / elapsed, "latency_us": {"p50": 50, "p90": 60, "p99": 70, "p999": 80,
                  "p9999": 90, "max": 100}, "loadgen_cpu_percent": 10.0, "loadgen_saturated": False}))
'''


def pretend_uvloop_missing(backend: str):
    return SKIP_REASON if backend == "uvloop" else None


def experiment_children() -> list:
    """Servers, load generators or benchmarks still running under this test process."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if re.search(r"servers|loadgen|switchbench", cmdline):
            found.append(cmdline)
    return found


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``conclab run all --profile tiny`` for two backends (plus one made unavailable), with the real load generator."""
    results = tmp_path_factory.mktemp("results")
    patch = pytest.MonkeyPatch()
    patch.setattr(variants, "unavailable_reason", pretend_uvloop_missing)
    patch.setattr(switch, "go_command", lambda run: "no Go in this test (kept fast)")
    started = time.monotonic()
    try:
        code = cli.main(["all", "--profile", "tiny", "--backends", BACKENDS, "--results", str(results),
                         "--run-id", RUN_ID])
    finally:
        patch.undo()
    return code, results / RUN_ID, time.monotonic() - started


def read(run_dir: Path, table: str) -> pd.DataFrame:
    return pd.read_csv(run_dir / f"{table}.csv")


# -- the tiny run ---------------------------------------------------------------------------------

def test_tiny_run_writes_every_table_with_documented_columns(tiny_run):
    code, run_dir, _ = tiny_run
    assert code == 0
    separate = {t.name for e in registry.EXPERIMENTS if not e.in_all for t in e.tables}   # only when named
    for table in (t for t in COLUMNS if t not in separate):
        frame = read(run_dir, table)
        assert list(frame.columns) == list(COLUMNS[table]), table
        assert (frame.run_id == RUN_ID).all(), table
    for experiment in registry.names(in_all=True):
        frame = read(run_dir, experiment)
        assert set(frame.variant) >= {"threads", "asyncio"} or experiment == "switch", experiment
        assert "uvloop" not in set(frame.variant), experiment


def test_tiny_run_measured_sensible_values(tiny_run):
    _, run_dir, _ = tiny_run
    mem = read(run_dir, "memory")
    assert sorted(mem.n_target.unique()) == [0, 30]
    assert (mem[mem.n_target == 30].n_conns == 30).all()
    assert (mem.rss_kib > 1000).all() and (mem.vms_kib >= mem.rss_kib).all()
    threads = mem[mem.variant == "threads"].set_index("n_target").threads
    assert threads[30] - threads[0] == 30                      # a thread per connection
    assert (read(run_dir, "throughput").throughput_rps > 0).all()
    assert (read(run_dir, "throughput").server_cpu_percent >= 0).all()
    for table in ("throughput", "latency", "io_bound", "cpu_bound"):          # 4-8 conns: threads, asyncio serve all
        rows = read(run_dir, table)
        assert (rows.conns_served <= rows.conns).all() and (rows.conns_served == rows.conns).all(), table
        assert (rows.unanswered == 0).all() and (rows.max_unanswered_wait_us >= 0).all(), table
        explained = rows.invalid_reason.fillna("").str.contains(f"{loadproc.SATURATED}|{loadproc.TOO_SHORT}")
        assert (rows.valid == ((rows.loadgen_saturated == 0) & ~explained)).all(), table   # else valid
        assert (rows.server_conns_active == rows.conns).all(), table           # every connection accepted first
        # CPU is read in 10 ms clock ticks: a server that mostly waits (io_bound) may spend less than one tick
        # in a tiny point, so only the busy tables must show some
        assert (rows.server_cpu_percent > 0).all() or table == "io_bound", table
        assert (rows.server_cpu_percent >= 0).all(), table
    lat = read(run_dir, "latency")                             # the open loop's accounting of the window
    assert (lat.requests <= lat.sent).all() and (lat.sent <= lat.offered).all()
    assert (lat.sent + lat.unsent == lat.offered).all()
    io = read(run_dir, "io_bound")
    assert (io.little_ceiling_rps == 8 / 0.01).all()           # 8 conns, 10 ms each
    fits = read(run_dir, "memory_fit")
    assert set(fits.metric) == set(memory.FIT_METRICS)
    c10k = read(run_dir, "c10k")
    assert (c10k.held == 40).all() and (c10k.requests > 0).all()
    micro = read(run_dir, "switch")
    assert (micro[micro.backend == "micro"].ns_per_switch > 0).all()
    assert set(micro[micro.bench == "server_per_request"].variant) == {"threads", "asyncio"}
    assert len(read(run_dir, "samples")) > 10


def test_tiny_run_records_skips_with_reasons(tiny_run):
    _, run_dir, _ = tiny_run
    skipped = read(run_dir, "skipped")
    uv = skipped[skipped.variant == "uvloop"]
    assert sorted(uv.experiment) == sorted(registry.names(in_all=True))
    assert (uv.reason == SKIP_REASON).all()
    go = skipped[skipped.variant.str.startswith("goroutine")]
    assert len(go) == 2 and go.reason.str.contains("no Go").all()


def test_tiny_run_manifest_is_complete(tiny_run):
    _, run_dir, _ = tiny_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["run_id"] == RUN_ID
    assert manifest["start"] <= manifest["end"]
    host = manifest["host"]
    for key in ("hostname", "kernel", "cpu_model", "cpu_count", "python", "packages", "rlimit_nofile"):
        assert host[key], key
    assert host["packages"]["psutil"] and host["python"]["version"].startswith("3.")
    assert re.fullmatch(r"[0-9a-f]{40}", manifest["git"]["commit"] or "")
    assert manifest["affinity"]["server_cpus"] and manifest["affinity"]["loadgen_cpus"]
    assert manifest["parameters"]["backends"] == BACKENDS.split(",")
    assert manifest["profile"]["name"] == "tiny"
    assert {s["variant"] for s in manifest["skipped"]} >= {"uvloop"}
    assert manifest["tables"]["throughput"]["columns"] == list(COLUMNS["throughput"])


def test_tiny_run_summaries_and_targets(tiny_run):
    _, run_dir, _ = tiny_run
    summ = read(run_dir, "summary")
    rss = summ[(summ.metric == "rss_kib_per_conn")]
    assert set(rss.variant) == {"threads", "asyncio"}
    targets = read(run_dir, "targets")
    ratios = targets[targets.target == "throughput_ratio_to_go"]
    assert set(ratios.variant) == {"threads", "asyncio"}
    assert ratios.value.isna().all() and ratios.detail.str.contains("no ratio").all()  # go was not run
    assert set(targets.target) >= {"rss_kib_per_idle_conn", "uss_kib_per_idle_conn"}


def test_tiny_run_leaves_no_process(tiny_run):
    assert processes.live_count() == 0
    assert experiment_children() == []


# -- fits -----------------------------------------------------------------------------------------

def test_least_squares_recovers_kib_per_connection():
    conns = [0, 1000, 2500, 5000, 10_000]
    line = least_squares(conns, [30_000 + 4.5 * n for n in conns])
    assert line.slope == pytest.approx(4.5) and line.intercept == pytest.approx(30_000) and line.r2 == pytest.approx(1)
    noisy = [30_000 + 4.5 * n + e for n, e in zip(conns, (40, -25, 10, -30, 5))]
    numpy = pytest.importorskip("numpy")
    slope, intercept = numpy.polyfit(conns, noisy, 1)
    fitted = least_squares(conns, noisy)
    assert fitted.slope == pytest.approx(slope) and fitted.intercept == pytest.approx(intercept)
    assert 0.99 < fitted.r2 < 1


def test_least_squares_needs_two_distinct_points():
    assert least_squares([5], [1.0]) is None
    assert least_squares([5, 5, 5], [1.0, 2.0, 3.0]) is None
    assert least_squares([0, 10, None], [1.0, "", 3.0]) is None        # empty cells are ignored


def test_memory_fit_rows_on_synthetic_samples():
    rows = [{"n_conns": n, "rss_kib": 25_000 + 20 * n, "uss_kib": 15_000 + 12 * n, "vms_kib": 31_000 + 8192 * n,
             "threads": 1 + n, "fds": 4 + n} for n in (0, 100, 1000, 3000)]
    fits = {row["metric"]: row for row in memory.fit_rows(rows)}
    assert fits["rss_kib"]["per_conn"] == pytest.approx(20) and fits["rss_kib"]["unit"] == "KiB/conn"
    assert fits["uss_kib"]["per_conn"] == pytest.approx(12)
    assert fits["vms_kib"]["per_conn"] == pytest.approx(8192)                # 8 MiB of virtual stack per thread
    assert fits["threads"]["per_conn"] == pytest.approx(1) and fits["threads"]["unit"] == "threads/conn"
    assert fits["rss_kib"]["intercept"] == pytest.approx(25_000) and fits["rss_kib"]["n_points"] == 4


def test_knee_is_the_highest_rate_served_without_latency_blowing_up():
    rows = [{"offered_rps": 3000, "throughput_rps": 2100, "errors": 0, "p99_us": 900_000},   # falls behind
            {"offered_rps": 1000, "throughput_rps": 999, "errors": 0, "p99_us": 200},
            {"offered_rps": 2000, "throughput_rps": 1960, "errors": 0, "p99_us": 1500}]
    assert summary.served_well(rows) == 2000 and summary.knee(rows)["knee"] == 2000
    rows[2]["p99_us"] = 250_000                                           # keeps up, but p99 x1250: past the knee
    assert summary.served_well(rows) == 1000 and summary.knee(rows)["knee"] == 1000


def test_summaries_and_knees_leave_invalid_points_out():
    def row(variant, conns, rps, valid, **extra):
        return {"backend": variant, "variant": variant, "repeat": 1, "conns": conns, "throughput_rps": rps,
                "valid": int(valid), "invalid_reason": "" if valid else "served 6 of 50 connections", **extra}
    throughput = [row("go", 50, 40_000.0, True), row("threadpool", 50, 90_000.0, False),
                  row("epoll", 50, 30_000.0, True), row("epoll", 50, 99_000.0, False)]     # one bad repeat of two
    rows = summary.summarize({"throughput": throughput})
    got = {(r["variant"], r["metric"]): r for r in rows}
    assert ("threadpool", "throughput_rps") not in got and got[("threadpool", "valid")]["max"] == 0
    assert got[("epoll", "throughput_rps")]["median"] == 30_000.0 and got[("epoll", "valid")]["median"] == 0.5
    ratios = {t["variant"]: t for t in summary.targets(rows, 50, [])}
    assert ratios["epoll"]["value"] == pytest.approx(0.75)
    assert ratios["threadpool"]["value"] is None and "invalid" in ratios["threadpool"]["detail"]
    latency = [{"offered_rps": 1000, "throughput_rps": 999, "errors": 0, "p99_us": 200, "valid": 1},
               {"offered_rps": 2000, "throughput_rps": 1990, "errors": 0, "p99_us": 300, "valid": 1},
               {"offered_rps": 3000, "throughput_rps": 2990, "errors": 0, "p99_us": 5_000_000, "valid": 1},
               {"offered_rps": 4000, "throughput_rps": 3990, "errors": 0, "p99_us": 400, "valid": 0}]
    assert summary.knee(latency)["knee"] == 2000 and summary.knee(latency)["top_rps"] == 3000
    assert summary.knee([dict(r, valid=0) for r in latency])["where"] == summary.NO_VALID
    old = [{k: v for k, v in r.items() if k != "valid"} for r in latency]               # an older run's rows
    assert summary.is_valid(old[3]) and not summary.is_valid(dict(old[3], loadgen_saturated=1))


# -- the load generator adapter ------------------------------------------------------------------

def test_adapter_builds_the_contract_command_line(monkeypatch):
    monkeypatch.delenv(loadproc.LOADGEN_ENV, raising=False)
    args = loadproc.argv("127.0.0.1:9", "open", 50, 2.0, size=64, rate=1500.0, op="work", work=(10_000, 0),
                     cpus=[1], warmup=0.25)
    assert args[:3] == [sys.executable, "-m", "conclab.loadgen"]
    text = " ".join(args)
    for part in ("--target 127.0.0.1:9", "--mode open", "--conns 50", "--duration 2", "--size 64", "--rate 1500",
                 "--op work", "--work 10000,0", "--cpus 1", "--warmup 0.25"):
        assert part in text
    assert args[-1] == "--json"


def test_adapter_parses_and_flattens():
    result = {"requests": 10, "errors": {"timeout": 2, "reset": 1}, "duration_s": 1.0, "throughput_rps": 10.0,
              "latency_us": {"p50": 1, "p90": 2, "p99": 3, "p999": 4, "p9999": 5, "max": 6}}
    text = "warming up\n" + json.dumps(result, indent=2) + "\n"
    assert loadproc.parse(text) == result
    assert loadproc.parse("junk\n" + json.dumps(result) + "\nmore junk") == result
    assert loadproc.parse("no json at all") is None
    row = loadproc.flatten(result)
    assert row["errors"] == 3 and row["p99_us"] == 3 and row["max_us"] == 6
    assert loadproc.connect_errors({"hold": {"failed": 7}}, 100) == 7
    assert loadproc.connect_errors({"connections": {"opened": 90}}, 100) == 10
    assert loadproc.connect_errors({}, 100) is None


def test_flatten_marks_unserved_and_unanswered_points_invalid():
    healthy = {"requests": 900, "errors": {}, "duration_s": 1.0, "throughput_rps": 900.0, "loadgen_saturated": False,
               "latency_us": {"p50": 1, "p90": 2, "p99": 3, "p999": 4, "p9999": 5, "max": 6},
               "connections": {"requested": 50, "opened": 50, "failed": 0, "served": 50, "lost": 0},
               "unanswered": 0, "max_unanswered_wait_us": 180}
    row = loadproc.flatten(healthy)
    assert row["valid"] is True and row["invalid_reason"] is None
    assert (row["conns_served"], row["unanswered"], row["max_unanswered_wait_us"]) == (50, 0, 180)
    pool = {**healthy, "connections": {**healthy["connections"], "served": 6}, "unanswered": 44,
            "max_unanswered_wait_us": 1_200_000}
    row = loadproc.flatten(pool)
    assert row["valid"] is False and row["conns_served"] == 6 and row["unanswered"] == 44
    assert row["invalid_reason"] == "served 6 of 50 connections; 44 requests unanswered"
    late = loadproc.flatten({**healthy, "unanswered": 3})          # every connection served, 3 never answered
    assert late["valid"] is False and late["invalid_reason"] == "3 requests unanswered"
    saturated = loadproc.flatten({**healthy, "loadgen_saturated": True})
    assert saturated["valid"] is False and saturated["invalid_reason"] == "load generator saturated"
    assert set(row) <= set(COLUMNS["throughput"])
    line = describe({**row, "throughput_rps": 35_000, "p50_us": 100, "p99_us": 900})
    assert "served 6 of 50 connections" in line and "INVALID" in line


@pytest.mark.live
def test_adapter_runs_any_generator_with_the_contract(tmp_path, monkeypatch):
    fake = tmp_path / "fake_loadgen.py"
    fake.write_text(FAKE_LOADGEN)
    monkeypatch.setenv(loadproc.LOADGEN_ENV, f"{sys.executable} {fake}")
    server = ServerProcess("threads", log_stem=str(tmp_path / "server"))
    try:
        result = loadproc.run_loadgen(server.target, "closed", 2, 0.3, size=16, op="echo")
    finally:
        server.stop()
    assert result["requests"] > 0 and result["params"]["conns"] == 2
    assert loadproc.flatten(result)["p50_us"] == 50


@pytest.mark.live
def test_missing_load_generator_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(loadproc.LOADGEN_ENV, f"{sys.executable} -c \"raise SystemExit('no generator here')\"")
    code = cli.main(["throughput", "--profile", "tiny", "--backends", "threads", "--results", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no generator here" in err
    assert list(tmp_path.iterdir()) == []


# -- command line and errors ------------------------------------------------------------------------

def test_all_stands_for_its_experiments_beside_named_ones():
    in_all = registry.names(in_all=True)
    assert cli.parse_experiments("all") == in_all
    with_convoy = cli.parse_experiments("convoy,all")
    assert set(with_convoy) == {*in_all, "convoy"} and with_convoy == registry.plan(with_convoy)
    with pytest.raises(cli.UsageError, match="unknown experiment 'nonsense'"):
        cli.parse_experiments("all,nonsense")


def test_add_parser_plugs_run_into_conclab():
    import argparse
    parser = argparse.ArgumentParser(prog="conclab")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["run", "memory,c10k", "--backends", "go", "--repeat", "3", "--server-cpus", "0"])
    assert args.run is cli.cmd_run and args.experiment == "memory,c10k" and args.repeat == 3
    assert args.profile == "quick" and args.results == "results"


@pytest.mark.parametrize("argv, message", [
    (["nonsense"], "unknown experiment"),
    (["memory", "--backends", "threads,cobol"], "unknown backend 'cobol'"),
    (["memory", "--server-cpus", "9999"], "not available"),
    (["memory", "--repeat", "0"], "--repeat"),
])
def test_bad_arguments_are_one_line_errors(argv, message, tmp_path, capsys):
    assert cli.main([*argv, "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.live
def test_server_that_cannot_start_says_why(tmp_path):
    with pytest.raises(ServerStartError, match="max-conns"):
        ServerProcess("threads", ["--max-conns", "0"], log_stem=str(tmp_path / "bad"))
    assert processes.live_count() == 0
    assert "max-conns" in (tmp_path / "bad.err").read_text()          # the harness keeps what it said


@pytest.mark.live
def test_launcher_keeps_no_logs_of_its_own_and_stops_with_the_final_line(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))         # where its private log directory goes
    with ServerProcess("threads", ["--max-conns", "5"]) as server:
        assert server.alive() and server.target == "%s:%d" % server.address
        assert server.stats()["connections_total"] == 1 and server.try_stats()["connections_total"] == 2
        assert len(list(tmp_path.iterdir())) == 1
        status, final = server.stop()
        assert status == 0 and final == server.final and final["requests_total"] == 2
        assert server.stopped_in is not None and server.try_stats() is None
    assert list(tmp_path.iterdir()) == [] and processes.live_count() == 0
    with pytest.raises(ServerStartError, match="max-conns"):
        ServerProcess("threads", ["--max-conns", "0"])
    assert list(tmp_path.iterdir()) == [] and processes.live_count() == 0


@pytest.mark.live
def test_launcher_runs_any_command_that_prints_the_ready_line():
    argv = [sys.executable, str(ROOT / "benchmarks" / "minimal" / "threads_echo.py"), "--port", "0"]
    with ServerProcess.command(argv, name="minimal") as server, server.connect() as client:
        assert client.request(ECHO, b"hi") == (ECHO, b"hi")
        assert server.backend == "minimal" and server.cpu_seconds() >= 0
    assert not server.alive() and processes.live_count() == 0


def test_table_writer_rejects_undocumented_columns(tmp_path):
    writer = TableWriter(str(tmp_path / "t.csv"), ("a", "b"))
    writer.write({"a": 1.23456789, "b": None})
    with pytest.raises(ColumnError):
        writer.write({"a": 1, "c": 2})
    writer.close()
    assert (tmp_path / "t.csv").read_text().splitlines() == ["a,b", "1.23457,"]


def test_docs_list_exactly_the_columns():
    """docs/experiments.md has a table per CSV whose first column lists COLUMNS[table], in order."""
    text = DOCS.read_text()
    for table, columns in COLUMNS.items():
        section = re.search(rf"^### {table}\.csv\n(.*?)(?=^### |^## |\Z)", text, re.DOTALL | re.MULTILINE)
        assert section, f"docs/experiments.md has no section for {table}.csv"
        documented = re.findall(r"^\| `([a-z0-9_]+)` \|", section.group(1), re.MULTILINE)
        assert documented == list(columns), table


# -- interruption -----------------------------------------------------------------------------------

@pytest.mark.live
@pytest.mark.parametrize("started", ["plainly", "with SIGINT ignored"])
def test_interrupt_stops_everything_and_keeps_results(tmp_path, started):
    """SIGINT to the harness mid-run: exit 130, manifest 'interrupted', no server or generator left; also when
    it was started with SIGINT ignored (what a script's background job inherits)."""
    marker = uuid.uuid4().hex
    env = {**os.environ, "CONCLAB_TEST_MARKER": marker}
    argv = [sys.executable, "-m", "conclab.experiments.harness", "throughput,c10k", "--profile", "tiny",
            "--backends", "threads", "--results", str(tmp_path), "--run-id", "cut"]
    if started != "plainly":
        argv = ["bash", "-c", 'trap "" INT; exec "$@"', "bash", *argv]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = None
        for line in proc.stderr:
            if "[throughput]" in line:
                seen = line
                break
        assert seen, "the run ended before its first point"
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert len(read(tmp_path / "cut", "throughput")) >= 1
    time.sleep(0.2)
    leftovers = []
    for other in psutil.process_iter(["pid"]):
        try:
            if other.environ().get("CONCLAB_TEST_MARKER") == marker:
                leftovers.append(" ".join(other.cmdline()))
        except psutil.Error:
            continue
    assert leftovers == []


# -- rounds, spreads, the measured window and the validity gates -----------------------------------------

class _Case:
    def __init__(self, name):
        self.name, self.backend = name, name


def _rounds_run(repeat: int):
    """Just what Run.in_rounds uses: the repeat count, progress lines and skips (recorded here)."""
    from types import SimpleNamespace
    skips = []
    return SimpleNamespace(repeat=repeat, progress=lambda message: None,
                           skip=lambda experiment, case, reason, point="": skips.append((case.name, point, reason))), \
        skips


def test_rounds_interleave_variants_and_a_failure_skips_only_that_one():
    from conclab.experiments.harness.run import Run
    run, skips = _rounds_run(3)
    order = []

    def body(case, repeat):
        order.append((case.name, repeat))
        if case.name == "B" and repeat == 2:
            raise RuntimeError("pretend the point failed")
        if case.name == "C" and repeat == 1:
            raise ServerStartError("pretend it cannot start")
    Run.in_rounds(run, "throughput", [_Case("A"), _Case("B"), _Case("C")], body)
    assert order == [("A", 1), ("B", 1), ("C", 1), ("A", 2), ("B", 2), ("A", 3), ("B", 3)]
    assert [(name, point) for name, point, _ in skips] == [("C", ""), ("B", "repeat=2")]
    assert "did not start" in skips[0][2] and "pretend the point failed" in skips[1][2]


def test_stats_spread_interval_and_comparison():
    from conclab.experiments.harness import stats
    one = stats.spread([5.0])
    assert (one["median"], one["ci_lo"], one["ci_hi"], one["ci_flag"]) == (5.0, 5.0, 5.0, stats.CI_MIN_MAX)
    two = stats.spread([1.0, "", None, 3.0])
    assert (two["n"], two["ci_lo"], two["ci_hi"], two["ci_flag"]) == (2, 1.0, 3.0, stats.CI_MIN_MAX)
    values = [10.0, 11.0, 9.5, 10.5, 30.0, 10.2, 9.8, 10.1, 9.9, 10.3]
    first, again = stats.spread(values), stats.spread(list(reversed(values)))
    assert first == again and first["ci_flag"] == stats.CI_BOOTSTRAP          # fixed seed: the same interval
    assert first["min"] <= first["ci_lo"] <= first["median"] <= first["ci_hi"] <= first["max"]
    assert first["ci_hi"] < 30.0                                               # one outlier does not make the interval
    assert stats.compare({"ci_lo": 1, "ci_hi": 2}, {"ci_lo": 3, "ci_hi": 4}) == stats.LOWER
    assert stats.compare({"ci_lo": 3, "ci_hi": 4}, {"ci_lo": 1, "ci_hi": 2}) == stats.HIGHER
    assert stats.compare({"ci_lo": 1, "ci_hi": 3}, {"ci_lo": 2, "ci_hi": 4}) == stats.TIE
    assert stats.compare(stats.spread([100, 110, 120]), 99) == stats.HIGHER   # a number is a point interval
    assert stats.compare(None, 1) == stats.TIE                                 # nothing is ranked on a missing value
    assert summary.summarize({"throughput": [{"backend": "go", "variant": "go", "repeat": r, "conns": 50,
                                              "throughput_rps": v, "valid": 1} for r, v in ((1, 10.0), (2, 30.0),
                                                                                            (3, 20.0))]})[1] \
        == {"experiment": "throughput", "backend": "go", "variant": "go", "point": "conns=50", "x": 50,
            "metric": "throughput_rps", **stats.spread([10.0, 30.0, 20.0])}


def test_server_cpu_is_over_the_measured_window():
    from conclab.experiments.harness.run import Window, server_deltas

    def counters(t, cpu, ctx):
        return {"t": t, "cpu_user_s": cpu * 0.75, "cpu_sys_s": cpu * 0.25, "ctx_voluntary": ctx, "ctx_involuntary": 0}
    # around the whole run (10 s, start-up and warm-up included) 2.1 s of CPU; in its 3 s window 1.8 s
    before, after = counters(100.0, 5.0, 1000), counters(110.0, 7.1, 4000)
    window = Window(counters(104.0, 5.2, 1200), counters(107.0, 7.0, 3900), active=50)
    row = server_deltas(before, after, 31_000, 30_000, {}, window=window, throughput=10_000.0)
    assert row["server_cpu_percent"] == pytest.approx(60.0)                    # 1.8 s / 3 s, not 2.1 s / 10 s
    assert row["cpu_us_per_req"] == pytest.approx(60.0)                        # 1.8 s / the window's 30,000 requests
    assert row["ctx_per_req"] == pytest.approx(2700 / 30_000)
    old = server_deltas(before, after, 31_000, 30_000, {}, window=Window(), throughput=10_000.0)
    assert old["cpu_us_per_req"] == pytest.approx(2.1e6 / 31_000)              # no window: the whole run, per request
    assert old["server_cpu_percent"] == pytest.approx(2.1e6 / 31_000 * 10_000 / 1e4)   # scaled by the window's rate


def test_the_generator_announces_its_window_in_the_form_the_harness_reads(capsys):
    from conclab.loadgen.params import LoadParams
    from conclab.loadgen.runner import announce_window
    announce_window(LoadParams(duration=3.0, warmup=0.5), 10_000_000_000)
    assert capsys.readouterr().err == ""                                       # not asked: nothing said
    announce_window(LoadParams(duration=3.0, warmup=0.5, announce=True), 10_000_000_000)
    match = loadproc.WINDOW_RE.search(capsys.readouterr().err.encode())
    assert match and (float(match[1]), float(match[2])) == (pytest.approx(10.5), pytest.approx(13.5))


def test_a_point_too_short_for_its_latency_or_not_fully_accepted_is_invalid():
    from conclab.experiments.harness.run import accepted_check
    base = {"requests": 900, "errors": {}, "duration_s": 3.0, "throughput_rps": 300.0, "loadgen_saturated": False,
            "latency_us": {"p50": 1, "p90": 2, "p99": 3, "p999": 4, "p9999": 5, "max": 6, "mean": 100_000},
            "connections": {"requested": 30, "opened": 30, "served": 30}, "unanswered": 0}
    assert loadproc.flatten(base)["valid"] is True                             # 3 s >= 20 x 100 ms
    slow = loadproc.flatten({**base, "latency_us": {**base["latency_us"], "mean": 200_000}})
    assert slow["valid"] is False and slow["invalid_reason"].startswith(loadproc.TOO_SHORT)
    row = loadproc.flatten(base)
    accepted_check(row, 30, 30)
    assert row["valid"] is True and row["server_conns_active"] == 30
    accepted_check(row, 27, 30)
    assert row["valid"] is False and row["invalid_reason"] == "server had accepted only 27 of 30 connections"
    unknown = loadproc.flatten(base)
    accepted_check(unknown, None, 30)                                          # STATS unanswered: not judged
    assert unknown["valid"] is True and unknown["server_conns_active"] is None


def test_an_open_loop_behind_its_schedule_is_invalid_judged_on_its_own_lateness_where_it_says():
    base = {"requests": 9_000, "errors": {}, "duration_s": 3.0, "throughput_rps": 3_000.0, "loadgen_saturated": False,
            "latency_us": {"p50": 1, "p90": 2, "p99": 3, "p999": 4, "p9999": 5, "max": 6, "mean": 100},
            "connections": {"requested": 30, "opened": 30, "served": 30}, "unanswered": 0}
    on_time = {"offered": 9_000, "sent": 9_000, "late": 90, "unsent": 0}          # 1 %: kept up
    assert loadproc.flatten({**base, "open_loop": on_time})["valid"] is True
    python = loadproc.flatten({**base, "open_loop": {**on_time, "late": 91}})      # cannot tell whose lateness
    assert python["valid"] is False and python["invalid_reason"].startswith(schedule.BEHIND)
    assert "cannot tell" in python["invalid_reason"]
    # The compiled engine: 3,000 sends waited for a reply (the server was behind), 10 of its own were late.
    held = {**on_time, "late": 3_010, "held": 3_000, "own_late": 10}
    row = loadproc.flatten({**base, "open_loop": held})
    assert row["valid"] is True and (row["held"], row["own_late"]) == (3_000, 10)
    own = loadproc.flatten({**base, "open_loop": {**held, "own_late": 50, "unsent": 41}})
    assert own["valid"] is False and "its own)" in own["invalid_reason"]
    assert schedule.behind_schedule(0, 0, 0) is None and schedule.behind_schedule(None, 5, 0) is None


def test_the_analysis_judges_an_older_run_behind_its_schedule_too():
    from conclab.analysis import derive
    rows = pd.DataFrame({"valid": [1, 1, 1, 0], "invalid_reason": [None, None, None, "served 6 of 50 connections"],
                         "offered": [1000, 1000, 1000, 1000], "late": [5, 500, 500, 500], "unsent": [0, 0, 0, 0],
                         "own_late": [None, None, 3, None]})
    ok, why = derive.validity(rows)
    assert ok.tolist() == [True, False, True, False]
    assert why[1].startswith(schedule.BEHIND) and why[3].startswith("served 6 of 50 connections; " + schedule.BEHIND)
    assert derive.validity(pd.DataFrame({"valid": [1]}))[0].tolist() == [True]        # not an open loop: not judged


def test_the_connections_check_counts_only_the_generators_connections():
    from conclab.experiments.harness.run import ConnectionsCheck

    class Server:
        metrics_port = None                       # one process: read over STATS

        def __init__(self, answers):
            self.answers = list(answers)

        def try_stats(self, timeout):
            return self.answers.pop(0) if self.answers else {"connections_active": 0, "connections_total": 0}
    far = time.monotonic() + 60
    # 50 active of which 1 is the check's own STATS connection and 1 a closed one not yet reaped: 48 are the generator's
    server = Server([{"connections_active": 50, "connections_total": 10 + 48 + 1}])
    check = ConnectionsCheck(server, 50, window_start=time.monotonic() - 1, total_before=10).begin()
    assert check.result() == 48
    ramping = Server([{"connections_active": 21, "connections_total": 31}, {"connections_active": 51,
                                                                            "connections_total": 62}])
    assert ConnectionsCheck(ramping, 50, window_start=far, total_before=10).begin().result() == 50
    silent = Server([None])
    assert ConnectionsCheck(silent, 50, window_start=time.monotonic() - 1).begin().result() is None


def test_a_server_of_several_processes_is_read_through_its_parents_summed_metrics():
    import urllib.error
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest
    from conclab.experiments.harness.run import ConnectionsCheck, CounterReader
    from conclab.servers.metrics import StatsCollector
    from conclab.servers.prefork import WorkerView

    def worker(active, total, requests):
        counters = {"connections_active": active, "connections_total": total, "requests_total": requests,
                    "open_fds": active + 5}
        return SimpleNamespace(counters=lambda: counters)
    registry = CollectorRegistry()                # the parent's /metrics page, summing two workers' answers
    registry.register(StatsCollector(WorkerView("epoll", [worker(20, 25, 700), worker(30, 35, 500)]), port=1))
    page = generate_latest(registry).decode()

    class Server:
        metrics_port = 9                          # started with --metrics-port (several processes)

        def metrics(self, timeout):
            return page

        def try_stats(self, timeout):
            raise AssertionError("STATS reaches one worker of several")
    counters = CounterReader(Server()).read(1.0)
    assert (counters["connections_active"], counters["connections_total"], counters["requests_total"]) == (50, 60, 1200)
    # a scrape is no connection of the served port's: all 50 are the generator's, and all 50 arrived since 10
    far = time.monotonic() + 60
    assert ConnectionsCheck(Server(), 50, window_start=far, total_before=10).begin().result() == 50
    assert ConnectionsCheck(Server(), 50, window_start=time.monotonic() - 1, total_before=15).begin().result() == 45

    class Unreachable(Server):
        def metrics(self, timeout):
            raise urllib.error.URLError("timed out")
    assert CounterReader(Unreachable()).read(1.0) is None
    assert ConnectionsCheck(Unreachable(), 50, window_start=time.monotonic() - 1).begin().result() is None


def test_the_standard_profile_is_the_reference_and_the_default_repeat_is_its_rounds():
    from conclab.experiments.harness.profiles import PROFILES
    standard = PROFILES["standard"]
    assert standard.rounds >= 3 and standard.point_s >= 3
    assert len(standard.latency_fractions) >= 6 and 0.1 in standard.latency_fractions
    assert {0, 1000, 2500, 5000, 10_000} <= set(standard.memory_conns) and len(standard.memory_conns) >= 5
    assert standard.reference_conns in standard.throughput_conns and standard.c10k_conns >= 10_000
    assert PROFILES["quick"].rounds == 1 and PROFILES["tiny"].rounds == 1
    import argparse
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.rounds(parser.parse_args(["all", "--profile", "standard"]), standard) == standard.rounds
    assert cli.rounds(parser.parse_args(["all", "--profile", "standard", "--repeat", "5"]), standard) == 5


@pytest.mark.live
def test_rounds_interleave_in_a_real_run(throughput_rounds):
    code, run_dir = throughput_rounds
    assert code == 0
    rows = read(run_dir, "throughput")
    assert list(zip(rows.variant, rows.repeat)) == [("threads", 1), ("asyncio", 1), ("threads", 2), ("asyncio", 2)]
    assert (rows.server_conns_active == rows.conns).all() and (rows.valid == 1).all()
    assert (rows.server_cpu_percent > 0).all()
    summ = read(run_dir, "summary")
    tput = summ[summ.metric == "throughput_rps"]
    assert (tput.n == 2).all() and (tput.ci_flag == "min-max").all()
    assert ((tput.ci_lo == tput["min"]) & (tput.ci_hi == tput["max"])).all()
