"""The lab's servers: one echo protocol, one set of controls, one module per concurrency model.

``BACKENDS`` says what each backend is; ``VARIANTS`` says what the lab compares:
every backend once, and the thread pool twice (a worker per connection, a
worker per request), since that choice is a different model. Every caller
(experiments, ``conclab check``, benchmarks, tests) takes its variants from
here. Modules are imported only when their backend is chosen, so gevent never
enters a process that runs another model.
"""
from __future__ import annotations

import importlib
import importlib.util
import shutil
from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    """A concurrency model's server: ``entry`` is "module:function" in this package.

    The function is ``serve(listener, config, stats)`` and returns after the
    drain; the go backend is its own program, and its function execs it.
    ``needs`` is what must be installed here for it to run (None: nothing).
    """
    name: str
    entry: str
    summary: str
    needs: str | None = None


BACKENDS = {b.name: b for b in (
    Backend("threads", "threads:serve", "one OS thread per connection"),
    Backend("threadpool", "threadpool:serve", "ThreadPoolExecutor, --dispatch connection|request"),
    Backend("asyncio", "aio:serve", "asyncio event loop (protocols)"),
    Backend("uvloop", "aio:serve_uvloop", "asyncio protocols on uvloop (libuv)", "uvloop"),
    Backend("gevent", "green:serve", "gevent greenlets, StreamServer", "gevent"),
    Backend("epoll", "epoll:serve", "hand-written select.epoll loop with a timer heap", None),
    Backend("go", "golang:exec_server", "Go goroutine per connection (reference)", "go"),
)}


@dataclass(frozen=True)
class Variant:
    """A backend plus the options that make it a distinct model (what a run's rows are labelled by)."""
    name: str
    backend: str
    options: tuple = ()

    @property
    def is_pool(self) -> bool:
        return self.backend == "threadpool"

    @property
    def is_python(self) -> bool:
        return self.backend != "go"

    def unavailable(self) -> str | None:
        """Why this variant cannot run here, or None."""
        return unavailable_reason(self.backend)


VARIANTS = {v.name: v for v in (
    Variant("threads", "threads"),
    Variant("threadpool", "threadpool", ("--dispatch", "connection")),
    Variant("threadpool-request", "threadpool", ("--dispatch", "request")),
    Variant("asyncio", "asyncio"),
    Variant("uvloop", "uvloop"),
    Variant("gevent", "gevent"),
    Variant("epoll", "epoll"),
    Variant("go", "go"),
)}


def select_variants(spec: str | None) -> list[Variant]:
    """Variants named in a comma list, in the lab's order; None or "": all of them.

    Raises ValueError naming an unknown entry.
    """
    if not spec:
        return list(VARIANTS.values())
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown backend {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
    return [v for v in VARIANTS.values() if v.name in wanted]


def variant_of(backend: str, options) -> Variant:
    """The variant that (backend, options) runs: the thread pool's --dispatch picks one of two."""
    options = list(options)
    if backend == "threadpool" and "--dispatch" in options:
        name = "threadpool-request" if options[options.index("--dispatch") + 1] == "request" else "threadpool"
        return VARIANTS[name]
    return VARIANTS[backend]


def unavailable_reason(name: str) -> str | None:
    """None if the backend can run here, else a one-line reason and how to fix it."""
    need = BACKENDS[name].needs
    if need == "go":
        if shutil.which("go") is None:
            return "no Go toolchain on PATH: install one (Debian: apt-get install -y golang-go) and retry"
    elif need is not None and importlib.util.find_spec(need) is None:
        return f"Python package {need!r} is not installed: pip install {need}"
    return None


def load(name: str):
    """The backend's entry point, importing its module only now."""
    module, function = BACKENDS[name].entry.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)
