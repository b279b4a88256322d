"""Compiled helpers built once per source version: a cache directory keyed by the sources' hash.

The go backend (``servers/golang.py``) and the load generator's compiled engine
(``loadgen/cengine.py``) are programs built from source on first use. Both go
into ``$XDG_CACHE_HOME/conclab/<name>-<hash>/`` (default ``~/.cache``), where
``<hash>`` is the SHA-256 of the source files (names and contents): editing a
source rebuilds, an unchanged source reuses the binary. Concurrent first uses
take a file lock, so one builds and the others wait; the build writes a
temporary file that is renamed into place, so a killed build never leaves half
a binary. When the cache cannot be created the build goes to a fresh temporary
directory instead.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


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
