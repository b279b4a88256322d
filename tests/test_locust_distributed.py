"""Locust across hosts: workers report their exact histograms to the master over Locust's message channel.

The unit tests check the report and its merge (``loadgen.locust_merge``) and
the command lines. The live test builds four hosts out of network namespaces
on one bridge (``servers.netns.Lan``: its own addresses, its own TCP stacks,
traffic over veth, not loopback): the server on one, the master on another,
a worker on each of two more, started with the commands docs/loadgen.md gives
(``conclab load --engine locust --master ...``, ``conclab load-worker --master
HOST:PORT``). It needs root; it skips, saying why, only where a namespace
cannot be made (tried, not guessed). Everything runs bounded in time, and the
fixture removes the namespaces, killing whatever still runs in them, also when
the test fails.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter

import pytest

from conclab.loadgen import LoadError, histo
from conclab.servers import netns
from conclab.loadgen.cli import add_parser, add_worker_parser, master_from
from conclab.loadgen.locust_engine import DEFAULT_MASTER_PORT, MasterSpec, worker_command
from conclab.loadgen.locust_merge import failure_kind, merge_reports, worker_report
from conclab.servers.launcher import ServerProcess

MASTER_TIMEOUT_S = 150.0         # waiting for workers, spawning, 3 s of load, the stop and the reports
WORKER_EXIT_S = 30.0
USERS, RUN_TIME_S = 4, 3


# -- the report and the merge --------------------------------------------------------------------------
def recorder_of(values) -> histo.Recorder:
    recorder = histo.Recorder()
    recorder.values.extend(values)
    return recorder


def test_merge_adds_histograms_exactly_and_sums_counters():
    first, second = [100, 120, 5_000, 90_000], [80, 130, 250_000]
    reports = [worker_report(recorder_of(first), Counter(reset=2), 1.0, 2.0),
               worker_report(recorder_of(second), Counter(reset=1, timeout=3), 0.5, 2.0)]
    merged = merge_reports(reports, expected=2)
    alone = recorder_of(first + second)
    alone.fold()
    together = histo.decode(merged["histogram"])
    assert merged["requests"] == merged["hdr_count"] == len(first + second)
    assert merged["errors"] == {"reset": 3, "timeout": 3}
    assert together.get_max_value() == alone.histogram.get_max_value()
    assert histo.summary(together) == histo.summary(alone.histogram)
    assert merged["workers_reported"] == 2 and merged["workers_missing"] == 0


def test_a_worker_that_never_reported_is_counted_missing():
    merged = merge_reports([worker_report(recorder_of([10]), Counter(), 0.1, 1.0)], expected=3)
    assert merged["workers_missing"] == 2 and merged["requests"] == 1


def test_failure_texts_map_to_the_lab_error_kinds():
    assert failure_kind(str(ConnectionRefusedError(111, "Connection refused"))) == "refused"
    assert failure_kind(str(ConnectionResetError(104, "Connection reset by peer"))) == "reset"
    assert failure_kind("ConnectionResetError('closed by the server')") == "closed"      # as Locust's CSV says it
    assert failure_kind(str(TimeoutError("timed out"))) == "timeout"
    assert failure_kind("server error: server busy") == "server_busy"
    assert failure_kind("unexpected reply op 0x02, 3 bytes") == "protocol"
    assert failure_kind("something new") == "other"


# -- the command lines ---------------------------------------------------------------------------------
def parse(*argv):
    parser = argparse.ArgumentParser(prog="conclab")
    commands = parser.add_subparsers(dest="command")
    add_parser(commands)
    add_worker_parser(commands)
    return parser.parse_args(argv)


def test_master_options_make_a_master_spec():
    args = parse("load", "--engine", "locust", "--master", "--expect-workers", "3", "--master-bind", "10.0.0.1:6000")
    assert master_from(args) == MasterSpec(expect_workers=3, bind="10.0.0.1:6000")
    assert master_from(parse("load", "--engine", "locust")) is None


@pytest.mark.parametrize("argv, message", [
    (("load", "--master"), "--master needs --engine locust"),
    (("load", "--engine", "locust", "--expect-workers", "2"), "need --master"),
    (("load", "--engine", "locust", "--master", "--expect-workers", "0"), "--expect-workers must be at least 1"),
    (("load", "--engine", "locust", "--master", "--master-bind", "nowhere"), "--master-bind 'nowhere' is not HOST:PORT"),
])
def test_master_options_that_make_no_sense_are_one_line_errors(argv, message):
    with pytest.raises(LoadError, match=message):
        master_from(parse(*argv))


def test_worker_command_points_locust_at_the_master():
    command = worker_command("10.0.0.1:6000")
    assert command[command.index("--master-host") + 1] == "10.0.0.1"
    assert command[command.index("--master-port") + 1] == "6000" and "--worker" in command
    default = worker_command("10.0.0.1", processes=-1)
    assert default[default.index("--master-port") + 1] == str(DEFAULT_MASTER_PORT)
    assert default[default.index("--processes") + 1] == "-1"
    with pytest.raises(LoadError, match="--master 'a:b' is not HOST:PORT"):
        worker_command("a:b")
    assert parse("load-worker", "--master", "10.0.0.1").run.__name__ == "cmd_load_worker"


# -- four hosts ----------------------------------------------------------------------------------------
@pytest.fixture
def lan():
    """server, master, w1, w2: four namespaces on one bridge; removed (and their processes killed) at the end."""
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with netns.Lan(["server", "master", "w1", "w2"]) as hosts:
        yield hosts


def conclab_in(host: netns.Host, *argv: str, **popen) -> subprocess.Popen:
    """``conclab ARGV`` on ``host`` (``python -m conclab`` is the ``conclab`` command)."""
    return subprocess.Popen(host.command([sys.executable, "-m", "conclab", *argv]), text=True, **popen)


def stats_from(host: netns.Host, server: ServerProcess) -> dict:
    """The server's STATS, asked from ``host`` (the test's own namespace has no route to the LAN)."""
    code = ("import json, sys; from conclab.servers.client import Client; "
            f"c = Client(({server.host!r}, {server.port})); print(json.dumps(c.stats())); c.close()")
    done = subprocess.run(host.command([sys.executable, "-c", code]), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.live
@pytest.mark.slow
def test_master_and_two_workers_on_their_own_hosts_count_exactly_what_the_server_served(lan, tmp_path):
    server_host, master_host = lan["server"], lan["master"]
    master_at = f"{master_host.address}:{DEFAULT_MASTER_PORT}"
    with ServerProcess.command(server_host.command(
            [sys.executable, "-m", "conclab.servers", "epoll", "--host", server_host.address, "--port", "0"]),
            name="epoll") as server:
        logs = {name: open(tmp_path / f"{name}.err", "w+") for name in ("master", "w1", "w2")}
        master = conclab_in(master_host, "load", "--engine", "locust", "--master", "--expect-workers", "2",
                            "--master-bind", master_at, "--target", server.target, "--users", str(USERS),
                            "--run-time", str(RUN_TIME_S), "--json", stdout=subprocess.PIPE, stderr=logs["master"])
        workers = [conclab_in(lan[name], "load-worker", "--master", master_at, stdout=subprocess.DEVNULL,
                              stderr=logs[name]) for name in ("w1", "w2")]
        try:
            out, _ = master.communicate(timeout=MASTER_TIMEOUT_S)
            exits = [worker.wait(timeout=WORKER_EXIT_S) for worker in workers]      # the master's quit ends them
        finally:
            for proc in (master, *workers):
                proc.kill()
                proc.wait()
        for log in logs.values():
            log.seek(0)
        assert master.returncode == 0, logs["master"].read()
        assert exits == [0, 0], [logs[name].read() for name in ("w1", "w2")]
        result = json.loads(out.strip().splitlines()[-1])
        stats = stats_from(master_host, server)
        status, final = server.stop()

    parts = result["locust"]["workers"]
    merged = histo.decode(result["histogram"])
    per_worker = [histo.decode(h) for h in result["histograms_per_process"]]
    assert result["errors"] == {} and result["locust"]["failures"] == 0 and result["locust"]["workers_missing"] == 0
    assert len(parts) == 2 and all(part["requests"] > 0 for part in parts)
    assert result["requests"] == sum(part["requests"] for part in parts)
    # requests_total counts the STATS request that read it (docs/protocol.md): the one STATS above
    assert result["requests"] == stats["requests_total"] - 1
    assert status == 0 and final["requests_total"] == stats["requests_total"]      # nothing came after
    assert merged.get_total_count() == sum(h.get_total_count() for h in per_worker) == result["requests"]
    assert merged.get_max_value() == max(h.get_max_value() for h in per_worker) == result["latency_us"]["max"]


@pytest.mark.live
def test_reports_of_users_still_in_a_slow_request_at_the_stop_are_waited_for():
    """Every user is inside a 0.7 s request when the run time ends; Locust's own headless quit would give
    the workers 0.5 s to report. The master waits for them: nothing is missing, the counts match."""
    from conclab.loadgen import LoadParams, run_load
    with ServerProcess("epoll") as server:
        result = run_load(LoadParams(target=server.target, engine="locust", users=2, processes=2, run_time=2,
                                     op="work", work="700000,0"))
        served = server.stats()["requests_total"] - 1                      # minus that STATS itself
    assert result["locust"]["workers_missing"] == 0 and len(result["locust"]["workers"]) == 2
    assert result["errors"] == {} and result["requests"] == served > 0
