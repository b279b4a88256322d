"""The lab's servers: one echo protocol, one set of controls, one module per concurrency model.

Modules are imported only when their backend is chosen, so gevent never
enters a process that runs another model.
"""
from __future__ import annotations

import importlib
import importlib.util
import shutil

# name -> ("module:function", what the model is, what it needs to run here).
# The function is ``serve(listener, config, stats)``; it returns after the drain.
# The go backend is its own program: its function execs it and never returns.
BACKENDS = {
    "threads": ("servers.threads:serve", "one OS thread per connection", None),
    "threadpool": ("servers.threadpool:serve", "ThreadPoolExecutor, --dispatch connection|request", None),
    "asyncio": ("servers.aio:serve", "asyncio event loop (protocols)", None),
    "uvloop": ("servers.aio:serve_uvloop", "asyncio protocols on uvloop (libuv)", "uvloop"),
    "gevent": ("servers.green:serve", "gevent greenlets, StreamServer", "gevent"),
    "epoll": ("servers.epoll:serve", "hand-written select.epoll loop with a timer heap", None),
    "go": ("servers.golang:exec_server", "Go goroutine per connection (reference)", "go"),
}


def unavailable_reason(name: str) -> str | None:
    """None if the backend can run here, else a one-line reason and how to fix it."""
    need = BACKENDS[name][2]
    if need == "go":
        if shutil.which("go") is None:
            return "no Go toolchain on PATH: install one (Debian: apt-get install -y golang-go) and retry"
    elif need is not None and importlib.util.find_spec(need) is None:
        return f"Python package {need!r} is not installed: pip install {need}"
    return None


def load(name: str):
    """The backend's entry point, importing its module only now."""
    module, function = BACKENDS[name][0].split(":")
    return getattr(importlib.import_module(module), function)
