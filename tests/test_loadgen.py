"""The load generator against real servers over loopback: every mode, several backends.

Runs are short (about a second) and bounded; nothing here asserts a speed.
The backends: one thread-based (threads), two event-loop ones (asyncio,
epoll), and go when a toolchain is present.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import random
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conclab.loadgen import LoadError, LoadParams, engine, histo, run_load
from conclab.loadgen.cli import add_parser
from conclab.loadgen.report import CSV_COLUMNS, cpu_check
from conclab.servers import unavailable_reason
from conclab.servers.launcher import ServerProcess, free_port, wait_until

REPO = Path(__file__).resolve().parent.parent
BACKENDS_UNDER_TEST = ("threads", "asyncio", "epoll", "go")
DESIGN_KEYS = {"params", "requests", "errors", "duration_s", "throughput_rps", "latency_us", "histogram",
               "loadgen_cpu_percent", "loadgen_saturated", "machine"}
LATENCY_KEYS = {"p50", "p90", "p99", "p999", "p9999", "max"}
STALL_US = 50_000            # the injected server stall: one WORK waits this long


def why_not(backend: str) -> str | None:
    """None if the backend can run here."""
    return unavailable_reason(backend)


@pytest.fixture(scope="module", params=BACKENDS_UNDER_TEST)
def server(request):
    reason = why_not(request.param)
    if reason:
        pytest.skip(f"{request.param}: {reason}")
    with ServerProcess(request.param) as srv:
        yield srv


@pytest.fixture(scope="module")
def threads_server():
    with ServerProcess("threads") as srv:
        yield srv


def run(srv: ServerProcess, **options) -> dict:
    return run_load(LoadParams(target=srv.target, **options))


def check_shape(result: dict) -> None:
    assert DESIGN_KEYS <= result.keys()
    assert LATENCY_KEYS <= result["latency_us"].keys()
    assert histo.decode(result["histogram"]).get_total_count() == result["requests"]
    assert result["throughput_rps"] == pytest.approx(result["requests"] / result["duration_s"], rel=0.01)
    json.dumps(result)


# -- each mode against each backend ---------------------------------------------------------------
@pytest.mark.live
def test_closed_loop(server):
    result = run(server, mode="closed", conns=8, duration=0.8, warmup=0.2)
    check_shape(result)
    assert result["requests"] > 0 and result["errors"] == {}
    assert result["duration_s"] == pytest.approx(0.8, abs=0.15)          # the warm-up is not in it
    assert 0 < result["latency_us"]["p50"] <= result["latency_us"]["p99"] <= result["latency_us"]["max"]
    assert result["connections"]["opened"] == 8
    assert result["connections"]["served"] == 8 and result["unanswered"] == 0      # a server that serves everyone
    assert 0 <= result["max_unanswered_wait_us"] <= result["latency_us"]["max"] + 1_000_000


@pytest.mark.live
def test_open_loop(server):
    result = run(server, mode="open", rate=400, conns=4, duration=1.0)
    check_shape(result)
    assert result["errors"] == {}
    ol = result["open_loop"]
    assert ol["offered"] == pytest.approx(400, abs=8)
    assert ol["sent"] + ol["unsent"] == ol["offered"]
    assert result["requests"] == ol["sent"] - ol["unanswered"] <= ol["offered"]
    assert {"late", "unsent", "not_on_schedule", "uncorrected_latency_us"} <= ol.keys()
    assert result["unanswered"] == ol["unanswered"] == 0 and result["connections"]["served"] == 4


@pytest.mark.live
def test_hold_reports_server_busy(server):
    with ServerProcess(server.backend, ["--max-conns", "20"]) as capped:
        result = run_load(LoadParams(target=capped.target, mode="hold", conns=40, connect_rate=400, duration=0.5))
    check_shape(result)
    hold = result["hold"]
    assert hold["connected"] + hold["failed"] == 40
    assert 10 <= hold["connected"] <= 20
    assert hold["failure_reasons"].get("server_busy", 0) >= 10      # a few may see the reset instead
    assert set(hold["failure_reasons"]) <= {"server_busy", "reset", "closed"}
    assert hold["connect_us"]["count"] == 40
    assert hold["held_at_end"] == hold["connected"]


@pytest.fixture(scope="module")
def starving_pool():
    """The connection-dispatch thread pool with 2 workers: it serves 2 connections, the others wait forever."""
    with ServerProcess("threadpool", ["--workers", "2"]) as srv:
        yield srv


@pytest.mark.live
@pytest.mark.parametrize("mode, procs", [("closed", 1), ("open", 1), ("closed", 2)])
def test_unserved_connections_and_unanswered_requests_are_counted(starving_pool, mode, procs, monkeypatch):
    monkeypatch.setattr(engine, "OPEN_DRAIN_S", 0.2)           # the open loop's drain (this process only)
    shape = {"rate": 300} if mode == "open" else {}
    result = run(starving_pool, mode=mode, conns=6, procs=procs, duration=0.6, warmup=0.1, **shape)
    c = result["connections"]
    assert c["served"] <= c["opened"] == c["requested"] == 6
    assert c["served"] == 2 and result["requests"] > 0           # two workers, each owning one connection
    assert result["unanswered"] == 4                             # each waiting connection's one request
    assert result["max_unanswered_wait_us"] >= 500_000           # waited (at least) the whole window
    assert result["errors"] == {}                                # nothing failed: it was just never answered
    if mode == "open":
        assert result["open_loop"]["unanswered"] == 4
    if procs == 2:                                               # summed exactly over the processes
        assert result["loadgen_procs"] == 2


# -- measurement properties -----------------------------------------------------------------------
def test_histogram_merge_is_exact():
    rng = random.Random(7)
    values = [int(rng.lognormvariate(6, 1.5)) + 1 for _ in range(20_000)]
    parts, whole = [histo.Recorder() for _ in range(3)], histo.Recorder()
    for i, value in enumerate(values):
        parts[i % 3].values.append(value)
        whole.values.append(value)
    merged = histo.merge([p.encode() for p in parts])
    whole.fold()
    assert merged.get_total_count() == len(values)
    assert list(merged.counts) == list(whole.histogram.counts)
    assert histo.summary(merged) == histo.summary(whole.histogram)


@pytest.mark.live
def test_processes_merge_exactly(threads_server):
    result = run(threads_server, mode="closed", conns=6, procs=2, duration=0.8)
    check_shape(result)
    per_process = [histo.decode(h) for h in result["histograms_per_process"]]
    assert len(per_process) == 2 == result["loadgen_procs"]
    assert sum(h.get_total_count() for h in per_process) == result["requests"] > 0
    merged = histo.merge(result["histograms_per_process"])
    assert list(merged.counts) == list(histo.decode(result["histogram"]).counts)
    assert len(result["loadgen_cpu_percent_per_process"]) == 2


@pytest.mark.live
def test_open_loop_counts_the_stall_closed_loop_hides_it(threads_server):
    """Each WORK waits 50 ms; the open loop schedules one every 25 ms on the one connection."""
    shape = dict(op="work", work=f"{STALL_US},0", conns=1, duration=1.0)
    closed = run(threads_server, mode="closed", **shape)
    opened = run(threads_server, mode="open", rate=40, **shape)
    assert closed["latency_us"]["p99"] < 2 * STALL_US                  # every request "took" 50 ms
    assert opened["latency_us"]["p99"] > 4 * STALL_US                  # requests queued behind the stall
    assert opened["latency_us"]["p99"] > 3 * closed["latency_us"]["p99"]
    assert opened["open_loop"]["not_on_schedule"] > 0
    assert opened["open_loop"]["uncorrected_latency_us"]["p99"] < 2 * STALL_US


@pytest.mark.live
def test_request_shapes(threads_server):
    piped = run(threads_server, conns=2, pipeline=8, duration=0.4, size=16)
    ping = run(threads_server, conns=2, op="ping", size=8, duration=0.4)
    big = run(threads_server, conns=2, size=200_000, pipeline=2, duration=0.4)
    for result in (piped, ping, big):
        assert result["requests"] > 0 and result["errors"] == {}


@pytest.mark.live
def test_raw_protocol():
    with ServerProcess("threads", ["--protocol", "raw"]) as raw:
        result = run(raw, protocol="raw", size=100, conns=3, pipeline=2, duration=0.5)
    assert result["requests"] > 0 and result["errors"] == {}


@pytest.mark.live
def test_cpus_pin_and_restore(threads_server):
    before = os.sched_getaffinity(0)
    result = run(threads_server, conns=2, duration=0.3, cpus=str(min(before)))
    assert result["requests"] > 0
    assert os.sched_getaffinity(0) == before


@pytest.mark.live
def test_hold_keepalive_probe_and_processes(threads_server):
    result = run(threads_server, mode="hold", conns=30, connect_rate=300, duration=0.8, keepalive=0.2,
                 probe_conns=2, procs=2)
    hold = result["hold"]
    assert hold["connected"] == 30 and hold["failed"] == 0 and hold["processes"] == 2
    assert hold["keepalive"]["sent"] > 0
    assert hold["keepalive"]["answered"] >= hold["keepalive"]["sent"] - 30
    assert hold["probe"]["requests"] == result["requests"] > 0
    assert result["latency_source"] == "probe"
    assert len(result["loadgen_cpu_percent_per_process"]) == 3


def test_plan_splits_over_processes_and_source_addresses(monkeypatch):
    from conclab.loadgen import plan as planning
    monkeypatch.setattr(planning, "fd_budget", lambda: 4_000)
    monkeypatch.setattr(planning, "ephemeral_ports", lambda: 11_000)       # 10,000 usable per source address
    specs = planning.plan(LoadParams(mode="hold", conns=25_000), 25_000)
    assert [s.conns for s in specs] == [3_572] * 3 + [3_571] * 4          # 7 processes of <= 4,000
    assert specs[0].sources == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert planning.plan(LoadParams(conns=50, procs=2), 50)[1].sources is None
    with pytest.raises(LoadError, match="--source-addrs"):
        planning.plan(LoadParams(target="10.0.0.1:7878", conns=25_000), 25_000)   # planned only, never connected


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_worker_sets_every_attribute_in_init(mode, monkeypatch):
    """A run adds no attribute to a Worker: each has its value from __init__ on (a silent peer here)."""
    monkeypatch.setattr(engine, "OPEN_DRAIN_S", 0.05)
    near, far = socket.socketpair()
    try:
        near.setblocking(False)
        worker = engine.Worker(LoadParams(mode=mode, duration=0.2), [near], rate=100 if mode == "open" else None)
        before = set(vars(worker))
        result = worker.run()
        assert set(vars(worker)) == before
        assert result["duration_s"] == pytest.approx(0.2, abs=0.1)
        assert result["connections"]["served"] == 0 and result["unanswered"] == 1     # the peer never answers
        assert result["max_unanswered_wait_us"] >= 150_000
    finally:
        far.close()


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_a_worker_without_connections_ends_and_reports_nothing_served(mode):
    """One of several processes may open no connection (all its connects failed): it ends, it does not crash."""
    worker = engine.Worker(LoadParams(mode=mode, duration=0.2), [], rate=100 if mode == "open" else None)
    result = worker.run()
    assert result["requests"] == 0 and result["connections"]["served"] == 0


def test_open_loop_counts_sends_and_late_ones_from_their_lateness():
    """Each send records its lateness; sent and late (> OPEN_LATE_US, to the ns) are read back from that record."""
    near, far = socket.socketpair()
    try:
        near.setblocking(False)
        worker = engine.Worker(LoadParams(mode="open", pipeline=8, duration=10.0), [near], rate=1000)
        worker.stop_ns = 10_000_000                           # a 10 ms window from 0: 10 requests offered
        worker._schedule(0)                                   # one connection: request k due at k ms
        late_ns, c = engine.OPEN_LATE_US * 1000, worker.order[0]
        worker._send_due(c, late_ns)                          # request 0 exactly at the limit, 1 just due: on time
        worker._send_due(c, 2_000_000 + late_ns + 1)          # request 2 one ns over the limit: late; 3 on time
        worker._send_due(c, 6_000_000)                        # requests 4 (2 ms: late), 5 (at the limit), 6
        assert len(c.sent) == 7 and len(far.recv(4096)) == 7 * len(worker.request)      # one send per call
        assert worker._open_counts() == {"offered": 10, "sent": 7, "late": 2, "unsent": 0, "unanswered": 0}
        lateness = histo.decode(worker.lateness.encode())
        assert (lateness.get_min_value(), lateness.get_max_value()) == (0, 2000)
    finally:
        far.close()
        near.close()


def test_a_batch_of_sends_records_each_ones_own_lateness():
    """One wake-up sends every due slot; each send's lateness is the clock read at that send, not at the wake-up."""
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        for near, _ in pairs:
            near.setblocking(False)
        worker = engine.Worker(LoadParams(mode="open", pipeline=1, duration=10.0), [p[0] for p in pairs], rate=1000)
        worker.stop_ns = 10_000_000
        worker._schedule(0)                                    # requests 0, 1, 2 due at 0, 1, 2 ms, one per connection
        readings = iter([3_000_000, 4_500_000, 6_000_000])     # the clock after each send: the sends took 1.5 ms each
        last = worker._send_slots(2_000_000, lambda: next(readings))
        assert last == 6_000_000 and worker.slot == 7          # slots 3..6 fell due meanwhile: each waits for a reply
        assert [len(far.recv(4096)) for _, far in pairs] == [len(worker.request)] * 3
        assert list(worker.lateness.values) == [2000, 2000, 2500]    # sent at 2, 3 and 4.5 ms
    finally:
        for near, far in pairs:
            near.close()
            far.close()


def test_no_request_goes_out_after_the_schedule_ends():
    """A connection that sent its last slot from a reply (ahead of the loop's slot counter) has its next
    slot past the end: when the loop catches up after the end, that slot is not sent."""
    near, far = socket.socketpair()
    try:
        near.setblocking(False)
        worker = engine.Worker(LoadParams(mode="open", pipeline=1, duration=10.0), [near], rate=1000)
        worker.stop_ns = 10_000_000                           # slots at 0, 1, ..., 9 ms
        worker._schedule(0)
        c = worker.order[0]
        for _ in range(10):                                   # each reply lets the next due request out at once
            worker._send_due(c, 9_500_000)
            c.sent.clear()
            c.actual.clear()
        assert c.next_at == 10_000_000 and worker.slot == 0  # the loop's counter has not moved yet
        worker._send_slots(10_500_000)
        worker._send_slots(12_000_000)
        assert worker._open_counts()["sent"] == worker._open_counts()["offered"] == 10
        assert len(far.recv(4096)) == 10 * len(worker.request)
    finally:
        far.close()
        near.close()


def kernel_stamps_arrivals(near, far) -> bool:
    """Whether a read's stamp is its data's arrival yet: the kernel enables receive stamps a moment after the
    first socket asks (until then it stamps a read when it is read)."""
    far.sendall(b"?")
    select.select([near], [], [], 5)
    time.sleep(0.003)                                                   # the byte waits 3 ms to be read
    _, ancillary, _, _ = near.recvmsg(16, engine.ANCILLARY_SIZE)
    return bool(ancillary) and engine.arrival(ancillary, engine.clock_offset()) < time.perf_counter_ns() - 2_000_000


def test_open_loop_times_a_reply_by_when_it_came_not_when_it_was_read():
    """The loop does not wake for replies: one that waits in its socket keeps the kernel's arrival time."""
    listener = socket.create_server(("127.0.0.1", 0))
    near = socket.create_connection(listener.getsockname())
    far, _ = listener.accept()
    try:
        near.setblocking(False)
        worker = engine.Worker(LoadParams(mode="open", pipeline=1, duration=10.0), [near], rate=10)
        start = time.perf_counter_ns()
        worker.warm_ns, worker.stop_ns = start, start + 10 * engine.NS
        worker._schedule(start)
        engine.stamp_replies(worker.order)
        assert wait_until(lambda: kernel_stamps_arrivals(near, far), 5, 0)   # the kernel turns stamping on lazily
        c = worker.order[0]
        worker._send_due(c, start)
        far.sendall(far.recv(4096))                                     # the echo
        answered = time.perf_counter_ns()
        assert select.select([near], [], [], 5)[0]                      # the reply is here
        time.sleep(0.05)                                                # ... and waits 50 ms for the loop
        worker._readable(c)
        assert worker.latency.values and worker.latency.values[0] <= (answered - start) // 1000 + 1000
    finally:
        for sock in (near, far, listener):
            sock.close()


def test_a_reply_wakes_the_open_loop_only_when_a_due_request_waits_for_it():
    """Asleep, the loop ignores replies (they keep their stamps) unless a due request waits on a full pipeline,
    and even then not before the cycle ends."""
    near, far = socket.socketpair()
    try:
        near.setblocking(False)
        worker = engine.Worker(LoadParams(mode="open", pipeline=1, duration=10.0), [near], rate=1000)
        worker.stop_ns = 10 * engine.NS
        worker._schedule(0)                                   # one connection: request k due at k ms
        c = worker.order[0]
        worker._send_due(c, 0)
        far.sendall(far.recv(4096))                           # answered, but not read yet
        started = time.perf_counter()
        worker._sleep(engine.NS // 20, 0)                     # nothing waits: a timer, the reply does not end it
        assert time.perf_counter() - started >= 0.05 and not worker.waiting
        worker._send_slots(1_000_000)                         # request 1 is due, request 0 still in flight
        assert worker.waiting == {c}
        started = time.perf_counter()
        worker._sleep(10 * engine.NS, 1_000_000, 1_000_000 + engine.NS // 20)   # but not before the cycle's end
        assert 0.05 <= time.perf_counter() - started < 5
        started = time.perf_counter()
        worker._sleep(10 * engine.NS, 1_000_000)              # now the reply there ends the wait at once
        assert time.perf_counter() - started < 5
    finally:
        far.close()
        near.close()


def test_the_open_loops_cycle_grows_with_its_cpu_share_and_comes_back_bounded():
    """Above OPEN_CPU_HIGH the shortest cycle grows (fewer wake-ups for more requests), below OPEN_CPU_LOW it
    shrinks, never outside OPEN_QUANTUM_NS .. OPEN_QUANTUM_MAX_NS."""
    low, high, busy, idle = engine.OPEN_QUANTUM_NS, engine.OPEN_QUANTUM_MAX_NS, engine.OPEN_CPU_HIGH + 0.05, 0.1
    assert engine.next_quantum(low, busy) > low and engine.next_quantum(low, idle) == low
    quantum = low
    for _ in range(50):
        quantum = engine.next_quantum(quantum, busy)
    assert quantum == high
    steady = (engine.OPEN_CPU_HIGH + engine.OPEN_CPU_LOW) / 2
    assert engine.next_quantum(3 * low, steady) == 3 * low
    quantum = high
    for _ in range(50):
        quantum = engine.next_quantum(quantum, idle)
    assert quantum == low


def test_an_open_loop_sleep_ends_on_its_time_not_before():
    """A sleep asks to end ``early`` (how late sleeps end, learnt) and finishes on the clock: it never returns
    before its time when that is the next slot's, and it learns how late this machine's sleeps end."""
    worker = engine.Worker(LoadParams(mode="open", duration=1.0), [], rate=100)
    assert worker.slot_at == engine.NEVER                      # no slot before the time asked for
    with engine.timer_slack(engine.OPEN_TIMER_SLACK_NS):
        for wait in (5_000, 200_000, 1_000_000, 3_000_000):
            t = time.perf_counter_ns()
            woke = worker._sleep(t + wait, t)
            assert woke >= t + wait and woke == pytest.approx(time.perf_counter_ns(), abs=50_000_000)
    assert 0 <= worker.early <= engine.OPEN_EARLY_MAX_NS
    worker.close()


@pytest.mark.live
def test_the_open_loop_sends_its_schedule_and_times_every_send(server):
    """rate x duration requests are offered (+-1), each sent or counted unsent, every send's lateness recorded,
    and an answered request's latency counts from its scheduled time (never below the uncorrected one)."""
    rate, duration = 3_000, 1.0
    result = run(server, mode="open", rate=rate, conns=10, duration=duration, warmup=0.2)
    ol = result["open_loop"]
    assert abs(ol["offered"] - rate * duration) <= 1
    assert ol["sent"] + ol["unsent"] == ol["offered"] and ol["sent"] > 0
    assert ol["send_lateness_us"]["count"] == ol["sent"]
    assert result["requests"] == ol["sent"] - ol["unanswered"]
    corrected, uncorrected = result["latency_us"], ol["uncorrected_latency_us"]
    assert corrected["count"] == uncorrected["count"] == result["requests"]
    assert all(corrected[k] >= uncorrected[k] for k in ("p50", "p99", "max"))


def test_the_clock_offset_is_not_read_across_a_preemption():
    """A realtime reading split from its perf_counter pair (the thread was preempted) is read again."""
    mono = iter([0, 10_000, 20_000, 20_500]).__next__          # first pair 10 µs apart, second 0.5 µs
    real = iter([5_000_000, 1_020_250]).__next__
    assert engine.clock_offset(mono, real) == 1_000_000


def test_timer_slack_is_given_back():
    before = engine._libc.prctl(engine.PR_GET_TIMERSLACK, 0, 0, 0, 0)
    with engine.timer_slack(engine.OPEN_TIMER_SLACK_NS):
        assert engine._libc.prctl(engine.PR_GET_TIMERSLACK, 0, 0, 0, 0) == engine.OPEN_TIMER_SLACK_NS
    assert engine._libc.prctl(engine.PR_GET_TIMERSLACK, 0, 0, 0, 0) == before


def test_self_check_flags_a_saturated_load_generator():
    busy = cpu_check([{"cpu_s": 0.95, "cpu_wall_s": 1.0}], cpus_usable=1)
    idle = cpu_check([{"cpu_s": 0.30, "cpu_wall_s": 1.0}, {"cpu_s": 0.35, "cpu_wall_s": 1.0}], cpus_usable=2)
    lopsided = cpu_check([{"cpu_s": 0.99, "cpu_wall_s": 1.0}, {"cpu_s": 0.1, "cpu_wall_s": 1.0}], cpus_usable=2)
    assert busy["loadgen_saturated"] and not idle["loadgen_saturated"] and lopsided["loadgen_saturated"]
    assert idle["loadgen_cpu_percent"] == pytest.approx(32.5)


# -- the command line -----------------------------------------------------------------------------
def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conclab.loadgen", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--target", "127.0.0.1:{port}"], "cannot connect to 127.0.0.1:"),
    (["--cpus", "999"], "--cpus"),
    (["--op", "work", "--work", "5ms"], "--work"),
    (["--mode", "open"], "--rate"),
    (["--target", "nohost"], "--target"),
])
@pytest.mark.live
def test_cli_errors_are_one_line_exit_2(args, message):
    result = cli(*[a.format(port=free_port()) for a in args], "--duration", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


@pytest.mark.live
def test_cli_json_out_and_csv(threads_server, tmp_path):
    out, table = tmp_path / "run.json", tmp_path / "runs.csv"
    for _ in range(2):
        result = cli("--target", threads_server.target, "--conns", "2", "--duration", "0.4", "--json",
                     "--out", str(out), "--csv", str(table))
        assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert DESIGN_KEYS <= printed.keys() and json.loads(out.read_text())["requests"] == printed["requests"]
    assert printed["params"]["csv"] == str(table) and printed["params"]["conns"] == 2
    rows = table.read_text().splitlines()
    assert rows[0].split(",") == list(CSV_COLUMNS) and len(rows) == 3
    assert "\r" not in result.stderr and "req/s" not in result.stderr      # not a tty: no progress bar


def test_add_parser_wires_the_load_subcommand():
    parser = argparse.ArgumentParser(prog="conclab")
    load = add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["load", "--mode", "open", "--rate", "100", "--conns", "3"])
    assert callable(args.run) and args.mode == "open" and args.rate == 100 and args.conns == 3
    assert "127.0.0.1:7878" in load.format_help()


# -- locust -------------------------------------------------------------------------------------
@pytest.mark.live
@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is not installed")
def test_locust_engine_headless_two_processes(threads_server):
    result = run(threads_server, engine="locust", users=4, processes=2, run_time=2)
    check_shape(result)
    assert result["requests"] > 0 and result["errors"] == {}
    assert result["locust"]["failures"] == 0
    assert result["locust"]["hdr_requests"] == result["locust"]["requests_total"]
    assert len(result["histograms_per_process"]) == 2


# -- the modules ----------------------------------------------------------------------------------
def loadgen_imports() -> dict[str, set[str]]:
    """Module -> the loadgen modules it imports (anywhere in it, lazy imports included)."""
    folder = REPO / "loadgen"
    names = {p.stem for p in folder.glob("*.py")}
    graph = {}
    for path in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    found.add(node.module.split(".")[0])
                elif node.level == 1:
                    found.update(alias.name for alias in node.names)
                elif node.module and node.module.startswith("conclab.loadgen."):
                    found.add(node.module.split(".")[2])
        graph[path.stem] = found & names - {path.stem}
    return graph


def test_loadgen_imports_go_one_way():
    """runner -> hold / locust_engine -> plan, engine, ...: no module imports one that imports it back."""
    graph = loadgen_imports()
    assert "runner" not in graph["hold"] | graph["locust_engine"] | graph["plan"] | graph["engine"]
    for module in graph:                                 # and no circle anywhere: nothing leads back to itself
        seen, todo = set(), list(graph[module])
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(graph[name])
        assert module not in seen, f"{module} imports itself back through {sorted(seen)}"


@pytest.mark.parametrize("seed", range(3))
def test_a_fold_records_every_value_where_hdrh_would(seed):
    """The fold (all of a tick's values at once, numpy) puts each value in the bucket record_value would, spread
    out or not (a lagging generator's latencies), and clamps what is out of range."""
    from hdrh.histogram import HdrHistogram
    rng = random.Random(seed)
    values = [rng.randint(1, 5_000_000) for _ in range(20_000)] + [rng.randint(0, 2047) for _ in range(5_000)]
    values += [rng.randint(1, histo.HIGHEST_US) for _ in range(100)] + [histo.HIGHEST_US, 2 ** 40, -1]
    rng.shuffle(values)
    recorder = histo.Recorder()
    recorder.values.extend(values[:9_000])
    assert recorder.fold() == 9_000 and len(recorder.values) == 0
    recorder.values.extend(values[9_000:])
    recorder.fold()
    direct = HdrHistogram(histo.LOWEST_US, histo.HIGHEST_US, histo.SIGNIFICANT_FIGURES)
    for value in values:
        direct.record_value(min(max(value, 0), histo.HIGHEST_US))
    assert list(recorder.histogram.counts) == list(direct.counts)
    assert recorder.histogram.get_total_count() == direct.get_total_count() == len(values)
    assert recorder.histogram.get_min_value() == direct.get_min_value() == 0
    assert recorder.histogram.get_max_value() == direct.get_max_value()
    assert recorder.clamped == 1                                       # 2**40 µs (one hour is the top)
    assert histo.decode(recorder.encode()).get_total_count() == len(values)


def test_slots_between_counts_the_schedule_inside_a_window():
    assert engine.slots_between(0, 10, 0, 100) == 10                  # 0, 10, ..., 90
    assert engine.slots_between(5, 10, 20, 60) == 4                   # 25, 35, 45, 55
    assert engine.slots_between(5, 10, 0, 5) == 0 and engine.slots_between(5, 10, 0, 6) == 1
    assert engine.slots_between(100, 10, 0, 50) == 0                  # the schedule starts after the window


def test_a_request_scheduled_in_the_warm_up_is_not_served_in_the_window():
    """served <= offered: a reply in the window to a request scheduled before it is not counted."""
    near, far = socket.socketpair()
    try:
        near.setblocking(False)
        worker = engine.Worker(LoadParams(mode="open", pipeline=8, duration=10.0), [near], rate=1000)
        worker.warm_ns, worker.stop_ns = 3_000_000, 10_000_000        # warm-up 0..3 ms, window 3..10 ms
        worker._schedule(0)
        c = worker.order[0]
        worker._send_due(c, 5_000_000)                                # requests 0..5: 0, 1, 2 of the warm-up
        assert len(c.sent) == 6 and worker._open_counts()["sent"] == 3
        worker._begin_measuring(5_200_000)                            # the window's first tick forgets nothing of it
        assert worker._open_counts()["sent"] == 3
        worker._data(c, worker.reply * 6, 5_500_000)                  # all six answered in the window
        assert worker.latency.count == 3 and worker._open_counts()["offered"] == 7
    finally:
        far.close()


@pytest.mark.parametrize("seed", range(5))
def test_sent_and_unsent_add_up_to_the_offered_window_exactly(seed):
    """Whatever times the loop wakes at, every request scheduled in the window is sent or unsent, once."""
    rng = random.Random(seed)
    pairs = [socket.socketpair() for _ in range(5)]
    try:
        for near, _ in pairs:
            near.setblocking(False)
        worker = engine.Worker(LoadParams(mode="open", pipeline=1000, duration=1.0), [p[0] for p in pairs],
                               rate=rng.uniform(3_000, 30_000))
        worker.warm_ns, worker.stop_ns = 1_000_000 + rng.randrange(1000), 21_000_000 + rng.randrange(1000)
        worker._schedule(rng.randrange(1000))
        t = 0
        while t < 15_000_000:                                   # the loop stops waking before the window ends
            t += rng.randrange(1, 400_000)
            worker._send_slots(t)
        worker.counts["unsent"] = sum(worker._unsent(c) for c in worker.order)
        counts = worker._open_counts()
        assert counts["unsent"] > 0 and counts["sent"] > 0
        assert counts["sent"] + counts["unsent"] == counts["offered"]
    finally:
        for near, far in pairs:
            near.close()
            far.close()


@pytest.mark.parametrize("rate", [58_580, 29_710, 65_089, 1_000])
@pytest.mark.parametrize("first", [12_000_000_000_000, 17_345_678_901_234])    # perf_counter_ns: hours of uptime
def test_every_connections_share_of_the_window_adds_up_when_a_slot_lands_on_its_edge(rate, first):
    """A whole number of requests in the warm-up puts a slot exactly on the window's start (and end), where
    float rounding decides the side (58,580 and 29,710 req/s were off by one before): each connection's count
    and the process's must agree, slot for slot, with the times the loop computes."""
    step, n = engine.NS / rate, 50
    warm, stop = first + int(0.2 * engine.NS), first + int(3.2 * engine.NS)
    whole = engine.slots_between(first, step, warm, stop)
    assert whole == sum(1 for k in range(int(3.3 * rate)) if warm <= int(first + k * step) < stop)
    assert sum(engine.slots_between(first, step, warm, stop, n, r) for r in range(n)) == whole
