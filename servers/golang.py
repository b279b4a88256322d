"""The Go backend: a goroutine per connection, the reference the Python models are measured against.

The server is its own program, ``servers/go/main.go`` (standard library only).
On first use it is compiled with the local Go toolchain into a cache outside
the source tree, ``$XDG_CACHE_HOME/conclab/go-<hash>/conclab-go`` (default
``~/.cache``), where ``<hash>`` is the SHA-256 of the Go sources: editing them
rebuilds, an unchanged tree reuses the binary (``buildcache``: a file lock for
concurrent first uses, a temporary file renamed into place).

``exec_server(config)`` then replaces this Python process with the binary
(``os.execve``), passing ``config.argv()``: the Go program takes the same
``--name value`` options and prints the same ``listening on HOST:PORT`` line
and final JSON line, so scripts cannot tell it was ever Python. ``build()``
returns the binary's path for benchmarks and tests that start it themselves.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import buildcache
from .base import StartupError
from .config import ServerConfig

SOURCE_DIR = Path(__file__).with_name("go")
BINARY_NAME = "conclab-go"
BUILD_TIMEOUT = 600        # seconds; a cold Go build cache takes ~10-30 s


def source_files() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.go")) + sorted(SOURCE_DIR.glob("*.lua")) + [SOURCE_DIR / "go.mod"]


def source_hash() -> str:
    """SHA-256 over the Go sources (names and contents), hex."""
    return buildcache.source_hash(source_files())


def cache_dir() -> Path:
    return buildcache.cache_dir("go", source_files())


def build() -> Path:
    """The compiled server, built now if these sources have not been built yet.

    Raises StartupError (one line, the first compiler message) if the Go
    toolchain is missing or the build fails; the full log is kept next to
    where the binary would be.
    """
    directory = cache_dir()
    binary = directory / BINARY_NAME
    if os.access(binary, os.X_OK):
        return binary
    go = shutil.which("go")
    if go is None:
        raise StartupError("no Go toolchain on PATH: install one (Debian: apt-get install -y golang-go) and retry")
    return buildcache.build_once(directory, BINARY_NAME, lambda partial: _compile(go, partial))


def _compile(go: str, partial: Path) -> None:
    env = {**os.environ, "CGO_ENABLED": "0", "GOWORK": "off"}   # pure Go (no C compiler), no outer go.work
    try:
        done = subprocess.run([go, "build", "-trimpath", "-o", str(partial), "."], cwd=SOURCE_DIR, env=env,
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise StartupError(f"building the go backend took over {BUILD_TIMEOUT} s") from None
    if done.returncode != 0:
        log = partial.with_name("build.log")
        log.write_text(done.stdout + done.stderr)
        first = next((line for line in done.stderr.splitlines() if line and not line.startswith("#")),
                     f"go build exited with status {done.returncode}")
        raise StartupError(f"building the go backend failed: {first} (full log: {log})")


def exec_server(config: ServerConfig) -> int:
    """Build if needed, then become the Go server (never returns on success)."""
    binary = build()
    env = dict(os.environ, CONCLAB_WARNED="1")    # the CLI has printed the fault/host warnings already
    if config.gomaxprocs is not None:
        env["GOMAXPROCS"] = str(config.gomaxprocs)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(binary, [str(binary), *config.argv()], env)
    return 1                                      # not reached
