"""The backend variants a run compares: every backend of servers.BACKENDS, the thread pool twice.

A variant is a backend plus the options that make it a distinct model:
``threadpool`` (a worker per connection) and ``threadpool-request`` (a worker
per request) are the same module with ``--dispatch`` set differently.
"""
from __future__ import annotations

from dataclasses import dataclass

from servers import BACKENDS, unavailable_reason

POOL_BACKEND = "threadpool"


@dataclass(frozen=True)
class Variant:
    name: str
    backend: str
    options: tuple = ()

    @property
    def is_pool(self) -> bool:
        return self.backend == POOL_BACKEND

    @property
    def is_python(self) -> bool:
        return self.backend != "go"

    def unavailable(self) -> str | None:
        """Why this variant cannot run here (servers.unavailable_reason), or None."""
        return unavailable_reason(self.backend)


def all_variants() -> list[Variant]:
    variants = []
    for backend in BACKENDS:
        if backend == POOL_BACKEND:
            variants.append(Variant(backend, backend, ("--dispatch", "connection")))
            variants.append(Variant(backend + "-request", backend, ("--dispatch", "request")))
        else:
            variants.append(Variant(backend, backend))
    return variants


def select(spec: str | None) -> list[Variant]:
    """Variants named in a comma list (variant or backend names), in the lab's order; None: all.

    Raises ValueError naming an unknown entry.
    """
    variants = all_variants()
    if not spec:
        return variants
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    known = {v.name for v in variants}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ValueError(f"unknown backend {unknown[0]!r}: choose from {', '.join(v.name for v in variants)}")
    return [v for v in variants if v.name in wanted]
