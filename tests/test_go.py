"""The Go server's own tests (servers/go/main_test.go), run with the Go toolchain.

They check what the Python suite cannot see from outside the process: no
allocation per ECHO round trip, no large buffer kept after a big frame, the
accept backoff, a recovered handler panic, the connection cap under racing
admits, and the option checks that mirror servers/config.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.live

GO_SOURCES = Path(__file__).resolve().parent.parent / "servers" / "go"
GO_TEST_TIMEOUT = 600        # seconds: a cold Go build cache compiles the standard library first


def test_go_server_unit_tests_pass():
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain on PATH (Debian: apt-get install -y golang-go): the Go server's tests need one")
    env = {**os.environ, "CGO_ENABLED": "0", "GOWORK": "off", "GOFLAGS": ""}   # as the server is built
    try:
        done = subprocess.run([go, "test", "-count=1", "./..."], cwd=GO_SOURCES, env=env,
                              capture_output=True, text=True, timeout=GO_TEST_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        output = b"".join(part if isinstance(part, bytes) else part.encode() for part in (exc.stdout, exc.stderr) if part)
        pytest.fail(f"go test took over {GO_TEST_TIMEOUT} s:\n{output.decode(errors='replace')}")
    assert done.returncode == 0, f"go test failed (status {done.returncode}):\n{done.stdout}{done.stderr}"
