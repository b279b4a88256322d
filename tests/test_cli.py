"""The command-line contract: help everywhere, one-line errors with exit 2, lean server processes."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from conclab.servers import BACKENDS

pytestmark = pytest.mark.live


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conclab.servers", *args], capture_output=True, text=True,
                          timeout=timeout)


def conclab(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    code = "import sys; from conclab.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", ["serve", "backends", "load", "run", "report", "demo", "check"])
def test_every_command_has_help(command):
    result = conclab(command, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


def test_backends_lists_all_seven():
    result = conclab("backends")
    assert result.returncode == 0
    listed = [line.split()[0] for line in result.stdout.splitlines()]
    assert listed == list(BACKENDS)


def test_unknown_backend_is_a_usage_error():
    result = run("nodejs")
    assert result.returncode == 2 and "invalid choice" in result.stderr


@pytest.mark.parametrize("option,message", [(["--max-conns", "0"], "--max-conns"),
                                            (["--idle-timeout", "-1"], "--idle-timeout"),
                                            (["--port", "70000"], "--port")])
def test_bad_values_give_one_line_and_exit_2(option, message):
    result = run("threads", *option)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run("epoll", "--port", str(taken.getsockname()[1]))
    assert result.returncode == 2
    assert "address already in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_non_loopback_bind_warns_and_fault_is_loud():
    proc = subprocess.Popen([sys.executable, "-m", "conclab.servers", "threads", "--host", "0.0.0.0", "--fault", "leak"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("listening on 0.0.0.0:")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert "reachable from other machines" in err and "FAULT 'leak'" in err


def test_a_server_process_imports_neither_the_analysis_stack_nor_gevent():
    code = ("import sys; from conclab.cli import build_parser; build_parser(tools=False); "
            "from conclab import servers; servers.load('threads'); servers.load('asyncio'); servers.load('epoll'); "
            "print(sorted(m for m in ('pandas', 'matplotlib', 'gevent', 'locust') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]"


def test_check_help_lists_every_scenario_with_its_description():
    from conclab.reliability.scenarios import SCENARIOS
    result = conclab("check", "--help")
    listed = [line.split()[0] for line in result.stdout.split("scenarios:\n", 1)[1].splitlines()
              if line.startswith("  ") and not line.startswith("   ")]
    assert listed[:len(SCENARIOS)] == list(SCENARIOS)


@pytest.mark.parametrize("option,message", [(["--procs", "0"], "--procs must be in 1..1024"),
                                            (["--switch-interval", "0"], "--switch-interval must be a positive"),
                                            (["--switch-interval", "inf"], "--switch-interval must be a positive")])
def test_bad_process_options_give_one_line_and_exit_2(option, message):
    result = run("epoll", *option)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("option,message", [(["--procs", "2"], "--procs is for Python backends; go uses GOMAXPROCS"),
                                            (["--switch-interval", "0.01"], "--switch-interval is for Python backends"),
                                            (["--python", sys.executable], "--python is for Python backends")])
def test_go_refuses_the_python_process_options_in_one_line(option, message):
    result = run("go", *option)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_python_that_is_not_an_executable_is_one_line(tmp_path):
    not_executable = tmp_path / "python"
    not_executable.write_text("")
    for path in (not_executable, tmp_path / "missing"):
        result = run("epoll", "--python", str(path))
        assert result.returncode == 2
        assert result.stderr.strip() == f"python -m conclab.servers: error: --python {path}: not an executable file"


def test_python_that_cannot_import_the_servers_is_one_line(tmp_path):
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'conclab'\" >&2\nexit 1\n")
    broken.chmod(0o755)
    result = run("epoll", "--python", str(broken))
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "cannot import conclab.servers: ModuleNotFoundError: No module named 'conclab'" in result.stderr
