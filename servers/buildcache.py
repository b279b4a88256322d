"""Compiled helpers built once per source version: a cache directory keyed by the sources' hash.

The go backend (``servers/golang.py``), the load generator's compiled engine
(``loadgen/cengine.py``) and the switch experiment's C and Go microbenchmarks
(``experiments/switch.py``) are programs built from source on first use. All
go into ``$XDG_CACHE_HOME/conclab/<name>-<hash>/`` (default ``~/.cache``),
where ``<hash>`` is the SHA-256 of the source files (names and contents):
editing a source rebuilds, an unchanged source reuses the binary. Concurrent
first uses take a file lock, so one builds and the others wait; the build
writes a temporary file that is renamed into place, so a killed build never
leaves half a binary. When the cache cannot be created the build goes to a
fresh temporary directory instead.

A C program is one source file compiled with the system compiler
(``build_c``); the headers it includes with quotes (``#include "wire.h"``, next
to it) are hashed with it (``c_inputs``), so editing a header rebuilds every
program that includes it. A failed build is a ``BuildError`` of one line, the
compiler's first error (``run_compiler``); each caller says it in its own words
when there is no compiler at all.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

BUILD_TIMEOUT_S = 600.0          # a cold Go build takes tens of seconds; a C program well under one
C_FLAGS = ("-O2", "-Wall")
QUOTED_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.MULTILINE)


class BuildError(RuntimeError):
    """A build that failed or ran too long, in one line: ``building <what> failed: <first error>``."""


def source_hash(paths: Iterable[Path]) -> str:
    """SHA-256 over the files (names and contents, in the order given), hex."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_dir(name: str, paths: Iterable[Path]) -> Path:
    """``$XDG_CACHE_HOME/conclab/<name>-<first 16 hex digits of the sources' hash>``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "conclab" / f"{name}-{source_hash(paths)[:16]}"


def build_once(directory: Path, binary_name: str, compile_to: Callable[[Path], None]) -> Path:
    """``directory/binary_name``, built now by ``compile_to(partial_path)`` unless it exists already.

    ``compile_to`` writes the executable at the path it is given or raises (its
    exception goes to the caller, and the partial file is removed).
    """
    binary = directory / binary_name
    if os.access(binary, os.X_OK):
        return binary
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        directory = Path(tempfile.mkdtemp(prefix=f"conclab-{binary_name}-"))
        binary = directory / binary_name
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # one builds, concurrent first uses wait for it
        if os.access(binary, os.X_OK):
            return binary
        partial = directory / f".{binary_name}.{os.getpid()}.tmp"
        try:
            compile_to(partial)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, binary)               # atomic: no one ever runs half a binary
    return binary


def c_compiler() -> str | None:
    """$CC if it names a program on PATH, else cc, else gcc; None when there is none."""
    for candidate in (os.environ.get("CC"), "cc", "gcc"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    return None


def c_inputs(source: Path) -> list[Path]:
    """``source`` and the headers it includes with quotes that lie next to it (and theirs, in turn), in the
    order first included: what a C program's build hashes. A quoted name not found there is a system header."""
    inputs, pending = [], [source]
    while pending:
        path = pending.pop(0)
        if path in inputs:
            continue
        inputs.append(path)
        for name in QUOTED_INCLUDE.findall(path.read_text(errors="replace")):
            if (path.parent / name).is_file():
                pending.append(path.parent / name)
    return inputs


def build_c(cc: str, source: Path, flags: Iterable[str] = C_FLAGS, binary_name: str | None = None,
            what: str | None = None) -> Path:
    """``source`` compiled (``cc flags -o BINARY source``) once per version of it and its headers, into
    ``cache_dir(<source's stem>, c_inputs(source))/<binary_name, default the source's stem>``.

    Raises BuildError naming ``what`` (default the source's file name) when the compiler fails.
    """
    argv = [cc, *flags]
    return build_once(cache_dir(source.stem, c_inputs(source)), binary_name or source.stem,
                      lambda partial: run_compiler([*argv, "-o", str(partial), str(source)], what or source.name))


def run_compiler(argv: list[str], what: str, cwd: Path | None = None, env: dict | None = None,
                 timeout: float = BUILD_TIMEOUT_S) -> None:
    """Run a compiler to its end; BuildError (one line: its first error) if it fails or runs past ``timeout``."""
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BuildError(f"building {what} took over {timeout:g} s") from None
    if done.returncode != 0:
        why = first_error(done.stderr) or f"{Path(argv[0]).name} exited with status {done.returncode}"
        raise BuildError(f"building {what} failed: {why}")


def first_error(stderr: str) -> str:
    """The compiler's first line that says ``error``, else its first line (``go build``'s ``# package``
    headings skipped), stripped; "" when it printed nothing."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("#")]
    return next((line for line in lines if "error" in line), lines[0] if lines else "")
