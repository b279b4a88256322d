"""The GIL experiments (convoy, cores): their cases, the paired ratios and findings, a tiny real run."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pandas as pd
import pytest
from conclab.analysis import findings, gil, report
from conclab.analysis.results import load_run
from conclab.experiments import convoy, cores, registry
from conclab.experiments.harness.profiles import PROFILES, TINY
from conclab.experiments.harness.run import ConnectionsCheck, CounterReader, with_metrics_port
from conclab.experiments.harness.sampler import Probe
from conclab.experiments.harness.tables import COLUMNS
from conclab.servers import processes
from conclab.servers.launcher import STATS_TIMEOUT_S, ServerProcess, wait_until
from conclab.servers.protocol import ECHO

from conclab import servers as variants

NAMES = ("convoy", "cores")
BACKENDS = "epoll,go"
RUN_ID = "gil-tiny"
OFFLOADED_EPOLL = "epoll cpus=2 --cpu-offload process"
OFFLOADED_EPOLL_ONE_CPU = "epoll --cpu-offload process"


def fake_run(names, cpus=(0, 1), server_cpus=(0,), loadgen_cpus=(1,)):
    """What convoy.cases reads of a Run: the variants, the CPUs, and skip()."""
    skipped = []
    run = SimpleNamespace(variants=[variants.VARIANTS[n] for n in names], all_cpus=list(cpus),
                          server_cpus=list(server_cpus), loadgen_cpus=list(loadgen_cpus), skipped=skipped)
    run.skip = lambda experiment, case, reason, point="": skipped.append((case.name, reason))
    return run


# -- the cases --------------------------------------------------------------------------------------

@pytest.mark.unit
def test_convoy_cases_are_the_models_switch_intervals_gomaxprocs_and_two_processes():
    labels = [s.label for s in convoy.SETTINGS]
    assert labels[:3] == ["threads si=0.5ms", "threads si=5ms", "threads si=50ms"]
    assert {"go GOMAXPROCS=1", "go GOMAXPROCS=2", "asyncio", "uvloop", "gevent", "epoll"} <= set(labels)
    assert {f"{m} procs=2" for m in convoy.PYTHON_MODELS} <= set(labels)
    assert len(set(labels)) == len(labels)
    offload = convoy.Setting("asyncio", options=("--cpu-offload", "process"))     # a later option: one line
    assert offload.server_options() == ("--cpu-offload", "process") and offload.n_cpus == 1


@pytest.mark.unit
def test_convoy_offload_cases_are_the_event_loops_on_one_cpu_then_two_after_the_rest():
    offloaded = [s for s in convoy.SETTINGS if "--cpu-offload" in s.options]
    assert [s.variant for s in offloaded] == ["asyncio", "uvloop", "gevent", "epoll"] * 2
    assert [s.n_cpus for s in offloaded] == [1] * 4 + [2] * 4
    assert all(s.server_options() == ("--cpu-offload", "process") and s.procs == 1 for s in offloaded)
    assert [s.label for s in offloaded][3::4] == ["epoll --cpu-offload process", "epoll cpus=2 --cpu-offload process"]
    assert list(convoy.SETTINGS[-len(offloaded):]) == offloaded     # after each model's one-process case
    assert convoy.Setting("threads", switch_interval=0.05, procs=2).server_options() == (
        "--switch-interval", "0.05", "--procs", "2")


@pytest.mark.unit
def test_convoy_cases_follow_the_selected_variants_and_skip_what_the_machine_cannot_run():
    run = fake_run(["epoll", "go"])
    cases = convoy.cases(run, convoy.SETTINGS)
    assert [c.name for c in cases] == ["epoll", "go GOMAXPROCS=1", "go GOMAXPROCS=2", "epoll procs=2",
                                       OFFLOADED_EPOLL_ONE_CPU, OFFLOADED_EPOLL]
    two = {c.name: c for c in cases}
    assert two["epoll procs=2"].cpus == (0, 1) and two["epoll"].cpus == (0,)
    assert two["epoll procs=2"].variant.options[-2:] == ("--procs", "2")
    assert two["epoll procs=2"].variant.name == "epoll"                  # the rows keep the variant's name
    assert two[OFFLOADED_EPOLL].cpus == (0, 1) and two[OFFLOADED_EPOLL].variant.name == "epoll"
    assert two[OFFLOADED_EPOLL].variant.options[-2:] == ("--cpu-offload", "process")
    assert two[OFFLOADED_EPOLL_ONE_CPU].cpus == (0,)                   # the loop's CPU only: not the generators'
    one_cpu = fake_run(["epoll"], cpus=(0,), loadgen_cpus=(0,))
    assert [c.name for c in convoy.cases(one_cpu, convoy.SETTINGS)] == ["epoll", OFFLOADED_EPOLL_ONE_CPU]
    assert one_cpu.skipped == [("epoll procs=2", "needs 2 CPUs, the machine has 1"),
                               (OFFLOADED_EPOLL, "needs 2 CPUs, the machine has 1")]


@pytest.mark.unit
def test_cores_cases_cross_cpus_with_processes_and_tie_go_to_its_cpus():
    cases = convoy.cases(fake_run(["threads", "go"]), cores.settings(fake_run(["threads", "go"])))
    assert [(c.name, len(c.cpus)) for c in cases] == [
        ("threads cpus=1", 1), ("threads procs=2 cpus=1", 1), ("threads cpus=2", 2), ("threads procs=2 cpus=2", 2),
        ("go GOMAXPROCS=1", 1), ("go GOMAXPROCS=2", 2)]
    assert convoy.cpu_columns(fake_run([]), [0, 1]) == {"server_cpus": [0, 1], "n_server_cpus": 2,
                                                        "shares_loadgen_cpu": True}


@pytest.mark.unit
def test_a_server_of_several_processes_gets_a_metrics_port_to_be_read_through():
    served = with_metrics_port(["--switch-interval", "0.005", "--procs", "2"])
    assert served[:4] == ["--switch-interval", "0.005", "--procs", "2"] and served[4] == "--metrics-port"
    assert 0 < int(served[5]) < 65536 and len(served) == 6
    assert with_metrics_port(["--procs=3"])[1] == "--metrics-port"
    for options in ([], ["--procs", "1"], ["--gomaxprocs", "2"], ["--procs", "2", "--metrics-port", "9100"]):
        assert with_metrics_port(options) == options


@pytest.mark.unit
def test_registry_profiles_and_tables_know_them():
    for name in NAMES:
        entry = registry.get(name)
        assert not entry.in_all and entry.load().NAME == name and entry.tables[0].name == name
        assert name in COLUMNS and name in gil.TABLES
    for profile in PROFILES.values():
        assert profile.convoy_cpu_conns > 0 and profile.convoy_rate > 0 and profile.cores_conns > 0


# -- the paired ratios and the findings, from tables with known answers ------------------------------

def convoy_rows(case, variant, base_p99, with_p99, rounds=3, valid_with=True, **settings):
    rows = []
    for repeat in range(1, rounds + 1):
        for cpu_conns, p99 in ((0, base_p99 * repeat), (2, with_p99 * repeat)):
            ok = valid_with or cpu_conns == 0
            rows.append({"variant": variant, "case": case, "repeat": repeat, "cpu_conns": cpu_conns,
                         "p99_us": p99, "p50_us": p99 / 4, "valid": int(ok), "loadgen_saturated": 0,
                         "invalid_reason": None if ok else "12 requests unanswered", "conns": 8, "rate": 400,
                         "cpu_us": 2000, "n_server_cpus": settings.get("n_server_cpus", 1),
                         "shares_loadgen_cpu": int(settings.get("n_server_cpus", 1) == 2),
                         "switch_interval": settings.get("switch_interval"), "procs": settings.get("procs", 1),
                         "gomaxprocs": settings.get("gomaxprocs"), "work_rps": 400.0 if cpu_conns else None})
    return rows


def convoy_frame(rows) -> pd.DataFrame:
    t = pd.DataFrame(rows)
    return gil.convoy(SimpleNamespace(tables={"convoy": t}))


@pytest.mark.unit
def test_convoy_ratio_is_paired_per_round_and_invalid_cases_are_left_out():
    c = convoy_frame([*convoy_rows("threads si=5ms", "threads", 1000, 20_000, switch_interval=0.005),
                      *convoy_rows("threads procs=2", "threads", 1000, 1500, procs=2, n_server_cpus=2),
                      *convoy_rows("epoll", "epoll", 500, 9000, valid_with=False)]).set_index("case")
    assert c.loc["threads si=5ms", "ratio_p99"] == pytest.approx(20.0)        # every round 20x its own baseline
    assert c.loc["threads si=5ms", "ratio_p99_n"] == 3
    assert c.loc["threads procs=2", "ratio_p99"] == pytest.approx(1.5)
    assert not c.loc["epoll", "valid"] and "unanswered" in c.loc["epoll", "invalid_reason"]
    f = findings.convoy(c.reset_index())
    assert f.facts["w_case"] == "threads si=5ms" and f.facts["w"] == pytest.approx(20.0)
    assert f.facts["lo_case"] == "threads procs=2"
    assert f.facts["threads.procs.verdict"] == "lower than on one process"
    assert "epoll" in f.facts["invalid.cases"] and "ran on the load generators' CPU" in f.text


@pytest.mark.unit
def test_convoy_offload_rows_get_their_own_ratio_and_leave_the_one_process_case_alone():
    c = convoy_frame([*convoy_rows("epoll", "epoll", 500, 10_000),
                      *convoy_rows("epoll procs=2", "epoll", 500, 2_000, procs=2, n_server_cpus=2),
                      *convoy_rows(OFFLOADED_EPOLL, "epoll", 500, 750, n_server_cpus=2)])
    by_case = c.set_index("case")
    assert by_case.loc[OFFLOADED_EPOLL, "ratio_p99"] == pytest.approx(1.5)
    assert by_case.loc[OFFLOADED_EPOLL, "n_server_cpus"] == 2 and by_case.loc[OFFLOADED_EPOLL, "procs"] == 1
    f = findings.convoy(c)
    assert f.facts["lo_case"] == OFFLOADED_EPOLL and f.facts["w_case"] == "epoll"
    assert f.facts["epoll.procs.one"] == pytest.approx(20.0)      # procs=2 is still set against plain epoll


@pytest.mark.unit
def test_convoy_finding_moves_with_the_data():
    c = convoy_frame([*convoy_rows("threads si=5ms", "threads", 1000, 1100, switch_interval=0.005),
                      *convoy_rows("threads procs=2", "threads", 1000, 30_000, procs=2)])
    f = findings.convoy(c)
    assert f.facts["w_case"] == "threads procs=2" and f.facts["threads.procs.verdict"] == "higher than on one process"


def cores_rows(variant, rps, rounds=3):
    """rps: {(cpus, parallelism): throughput}; round r scales every case by (1 + r / 100)."""
    rows = []
    for (cpus, par), value in rps.items():
        go = variant == "go"
        case = f"{variant} GOMAXPROCS={par}" if go else f"{variant} procs={par} cpus={cpus}"
        for repeat in range(1, rounds + 1):
            for load in ("cpu", "echo"):
                rows.append({"variant": variant, "case": case, "load": load, "repeat": repeat,
                             "throughput_rps": value * (1 + repeat / 100), "n_server_cpus": cpus,
                             "procs": None if go else par, "gomaxprocs": par if go else None, "valid": 1,
                             "loadgen_saturated": 0, "invalid_reason": None, "shares_loadgen_cpu": int(cpus == 2),
                             "server_rss_kib": 20_000 * (1 + 2 * (par - 1)), "server_procs": 1 + 2 * (par - 1),
                             "p99_us": 1000.0})
    return rows


@pytest.mark.unit
def test_cores_scaling_ratio_and_the_gil_finding():
    raw = pd.DataFrame([*cores_rows("threads", {(1, 1): 5000, (1, 2): 4900, (2, 1): 5000, (2, 2): 9000}),
                        *cores_rows("go", {(1, 1): 5000, (2, 2): 9800})])
    frame = gil.cores_frame(SimpleNamespace(tables={"cores": raw}))
    scaling = gil.cores_scaling(frame, raw).set_index(["variant", "load", "scaling"])
    assert scaling.loc[("threads", "cpu", "2 CPUs, 2 processes"), "ratio"] == pytest.approx(1.8)
    assert scaling.loc[("threads", "cpu", "2 CPUs, 1 process"), "ratio"] == pytest.approx(1.0)
    assert scaling.loc[("threads", "cpu", "2 CPUs, 1 process"), "verdict"] == "tie"
    assert scaling.loc[("go", "cpu", "2 CPUs, 2 processes"), "verdict"] == "higher"
    f = findings.cores(frame, scaling.reset_index())
    assert f.facts["top_v"] == "go" and f.facts["top"] == pytest.approx(1.96)
    assert f.facts["gil"] == pytest.approx(1.0) and "no gain from the second CPU" in f.text
    assert f.facts["rss.m0_two"] == pytest.approx(60_000 / 1024) and f.facts["rss.m0_n"] == 3
    assert "shared one with the load generator" in f.text


# -- the sampler counts every process of a --procs server --------------------------------------------

@pytest.mark.live
def test_probe_sums_the_parent_and_its_worker_processes():
    server = ServerProcess("epoll", ["--procs", "2"])
    try:
        assert wait_until(lambda: len(server.worker_pids()) == 2, 10.0, 0.02)
        probe = Probe(server.pid, server.port, track_ctx=True)
        sample = probe.read(uss=False)
        parent_only = server.process.memory_info().rss // 1024
        assert len(probe.family()) == 3
        assert sample["rss_kib"] > 2 * parent_only * 0.5 and sample["rss_kib"] > parent_only
        assert sample["threads"] >= 3 and probe.counters()["ctx_voluntary"] > 0
    finally:
        server.stop()
    assert processes.live_count() == 0


@pytest.mark.live
def test_the_harness_counts_the_connections_and_requests_of_every_worker():
    conns = 20                        # all on one worker (what one worker's STATS could see): p = 2 ** -19
    server = ServerProcess("epoll", with_metrics_port(["--procs", "2"]))
    clients = []
    try:
        before = CounterReader(server).read(STATS_TIMEOUT_S)
        clients = [server.connect() for _ in range(conns)]
        for client in clients:
            assert client.request(ECHO, b"c") == (ECHO, b"c")            # accepted and served by its worker
        check = ConnectionsCheck(server, conns, time.monotonic() + 30, before["connections_total"]).begin()
        assert check.result() == conns
        after = CounterReader(server).read(STATS_TIMEOUT_S)
        assert after["requests_total"] - before["requests_total"] == conns
        assert server.stats()["connections_active"] - 1 < conns         # STATS: the one worker it landed on
    finally:
        for client in clients:
            client.close()
        server.stop()
    assert processes.live_count() == 0


# -- a tiny real run ------------------------------------------------------------------------------

@pytest.mark.live
def test_tiny_convoy_measures_each_case_without_and_with_the_cpu_work(tiny):
    code, run_dir, _ = tiny
    assert code == 0
    c = pd.read_csv(run_dir / "convoy.csv")
    assert list(c.columns) == list(COLUMNS["convoy"])
    assert set(c.case) == {"epoll", "go GOMAXPROCS=1", "go GOMAXPROCS=2", "epoll procs=2", OFFLOADED_EPOLL_ONE_CPU,
                           OFFLOADED_EPOLL}
    for case, rows in c.groupby("case"):
        assert sorted(rows.cpu_conns) == [0, TINY.convoy_cpu_conns], case
    loaded, alone = c[c.cpu_conns > 0], c[c.cpu_conns == 0]
    assert (loaded.work_requests > 0).all() and alone.work_requests.isna().all()   # the CPU work ran beside
    assert (c.shares_loadgen_cpu == (c.n_server_cpus == 2)).all()
    assert (c[c.case == "go GOMAXPROCS=2"].gomaxprocs == 2).all() and (c[c.procs == 2].server_options
                                                                        == "--procs 2").all()
    assert (c.server_conns_active == c.conns).all()                  # --procs 2 too: every worker's, summed
    assert (c.server_requests >= c.requests).all()                   # every request the generator counted
    for case, n_cpus in ((OFFLOADED_EPOLL_ONE_CPU, 1), (OFFLOADED_EPOLL, 2)):
        offloaded = c[c.case == case]
        assert (offloaded.server_options == "--cpu-offload process").all() and (offloaded.n_server_cpus == n_cpus).all()


@pytest.mark.live
def test_tiny_cores_counts_every_process_of_the_server(tiny):
    _, run_dir, _ = tiny
    k = pd.read_csv(run_dir / "cores.csv")
    assert list(k.columns) == list(COLUMNS["cores"])
    assert set(k.load) == set(cores.LOADS) and k.groupby("case").size().eq(len(cores.LOADS)).all()
    assert (k[k.procs == 2].server_procs == 3).all() and (k[k.procs == 1].server_procs == 1).all()
    assert (k.server_conns_active == k.conns).all() and (k.server_requests >= k.requests).all()
    epoll = k[k.variant == "epoll"].groupby("procs").server_rss_kib.median()
    assert epoll[2] > 2 * epoll[1]                 # three processes' RSS, not the parent's alone
    assert (k.rss_kib_per_proc * k.server_procs - k.server_rss_kib).abs().max() < 1


@pytest.mark.live
def test_tiny_report_has_their_sections_charts_and_findings(tiny):
    _, run_dir, elapsed = tiny
    path, results = report.write(load_run(str(run_dir)))
    with open(path, encoding="utf-8") as f:
        page = f.read()
    for name in NAMES:
        assert f'id="{name}"' in page
        drawn = [r for r in results if r.name == name]
        assert drawn and drawn[0].files, name
    assert "2-CPU scaling" in page and "p99 with / without" in page
    assert processes.live_count() == 0
    assert elapsed < 240


@pytest.mark.unit
def test_a_selected_variant_without_a_convoy_case_is_skipped_with_its_reason():
    run = fake_run(["threadpool"])
    run.in_rounds = lambda experiment, cases, body: run.skipped.append(("rounds", [c.name for c in cases]))
    convoy.run(run)
    assert run.skipped[0] == ("threadpool", convoy.NO_CASE["threadpool"]) and run.skipped[1] == ("rounds", [])


@pytest.mark.unit
def test_offloading_on_the_loops_cpu_is_judged_on_the_p99_beside_the_cpu_work():
    """The one-CPU offload case against the loop computing the work: the ECHO p99 beside it (absolute, its
    spread over the rounds whose pair is valid), lower, tie or higher as the intervals say."""
    c = convoy_frame([*convoy_rows("epoll", "epoll", 400, 5_000),
                      *convoy_rows(OFFLOADED_EPOLL_ONE_CPU, "epoll", 1_000, 2_300),
                      *convoy_rows(OFFLOADED_EPOLL, "epoll", 200, 2_400, n_server_cpus=2)])
    by_case = c.set_index("case")
    assert by_case.loc[OFFLOADED_EPOLL_ONE_CPU, "p99_beside"] == pytest.approx(4_600)          # rounds 2.3, 4.6, 6.9 ms
    assert (by_case.loc["epoll", "p99_beside_min"], by_case.loc["epoll", "p99_beside_max"]) == (5_000, 15_000)
    f = findings.convoy(c)
    assert f.facts["epoll.offload.blocked"] == pytest.approx(10.0) and f.facts["epoll.offload.off"] == pytest.approx(4.6)
    assert f.facts["epoll.offload.verdict"] == "tie within noise"         # 2.3–6.9 ms overlaps 5–15 ms
    assert "with it in a process pool on the same CPU" in f.text and f.text.count("in a process pool") == 1
    three = findings.convoy(convoy_frame([
        *[{**r, "p99_us": 9_000 + r["repeat"]} if r["cpu_conns"] else r for r in convoy_rows("epoll", "epoll", 400, 1)],
        *[{**r, "p99_us": 2_000 + r["repeat"]} if r["cpu_conns"] else r
          for r in convoy_rows(OFFLOADED_EPOLL_ONE_CPU, "epoll", 1_000, 1)]]))
    assert three.facts["epoll.offload.verdict"] == "lower than with the loop computing it"
