"""Hosts made of network namespaces (servers/netns.py) and ``conclab run --server-host``.

Live tests need root and skip, saying why, only where a namespace cannot be
made (``netns.unavailable_reason`` tries). Each one removes what it made, also
when it fails.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from conclab.experiments.harness import cli
from conclab.servers import netns
from conclab.servers.launcher import wait_until


@pytest.fixture
def namespaces_work():
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)


def ours() -> list[str]:
    return [name for name in netns.namespaces() if name.startswith(netns.PREFIX)]


@pytest.mark.live
def test_a_lan_is_removed_with_what_runs_in_it_even_when_the_block_fails(namespaces_work):
    before = set(ours())
    with pytest.raises(RuntimeError, match="the test's own failure"):
        with netns.Lan(["a", "b"]) as lan:
            sleeper = subprocess.Popen(lan["b"].command(["sleep", "600"]))
            assert wait_until(lambda: str(sleeper.pid) in netns.ip("netns", "pids", lan["b"].namespace).split())
            raise RuntimeError("the test's own failure")
    assert sleeper.wait(timeout=10) != 0                                       # killed, not left running
    assert set(ours()) == before


def test_server_host_names_are_checked_before_anything_starts(capsys):
    assert cli.main(["throughput", "--profile", "tiny", "--server-host", "no/such name"]) == cli.EXIT_USAGE
    assert "--server-host 'no/such name': use letters, digits and _ only" in capsys.readouterr().err


@pytest.mark.live
@pytest.mark.slow
def test_run_with_server_host_serves_across_the_veth_and_removes_the_host(namespaces_work, tmp_path):
    before = set(ours())
    code = cli.main(["throughput", "--profile", "tiny", "--backends", "epoll", "--server-host", "srv",
                     "--results", str(tmp_path), "--run-id", "across"])
    assert code == cli.EXIT_OK
    manifest = json.loads((tmp_path / "across" / "manifest.json").read_text())
    host = manifest["server_host"]
    assert host["namespace"].endswith("-srv") and host["address"] != host["loadgen_address"]
    with open(tmp_path / "across" / "throughput.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # a point may be flagged (a tiny point's generator often saturates): what matters here is the path
    assert rows and all(int(row["errors"]) == 0 for row in rows)
    # the server counted, across the veth, the requests the generator counted (plus what the harness asked)
    assert all(int(row["server_requests"]) >= int(row["requests"]) > 0 for row in rows)
    outs = [path.read_text() for path in (tmp_path / "across" / "raw" / "logs").glob("throughput-*.out")]
    assert outs and all(f"listening on {host['address']}:" in text for text in outs)       # it ran over there
    assert set(ours()) == before


@pytest.mark.live
def test_load_worker_has_help():
    code = "import sys; from conclab.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, "load-worker", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "--master HOST[:PORT]" in result.stdout
