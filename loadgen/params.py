"""What one load run is asked to do: ``LoadParams``, its defaults and its validation.

Every option of ``conclab load`` is a field here, so the command line, the
programmatic API (``loadgen.run_load(LoadParams(...))``) and the ``params``
block of the result JSON say the same thing. ``validate()`` turns nonsense
into a ``LoadError`` whose message is the one line the CLI prints (exit 2).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field

from conclab.servers import protocol

DEFAULT_TARGET = "127.0.0.1:7878"     # where `conclab serve BACKEND --port 7878` listens
MODES = ("closed", "open", "hold")
OPS = ("echo", "ping", "work")
PROTOCOLS = ("framed", "raw")
ENGINES = ("native", "locust", "c")
MAX_U32 = 0xFFFFFFFF
C_ENGINE_MAX_FRAME_ARG = 32_768       # --engine c gets a PING or WORK frame on its command line, as hex


class LoadError(Exception):
    """The run cannot go ahead; ``str(error)`` is one line for the user (exit status 2)."""


@dataclass
class LoadParams:
    """Every knob of a load run, with the CLI's defaults."""

    target: str = DEFAULT_TARGET
    mode: str = "closed"
    engine: str = "native"
    conns: int = 50
    pipeline: int = 1
    rate: float | None = None
    duration: float = 10.0
    warmup: float = 0.0
    op: str = "echo"
    size: int = 64
    work: str = "0,0"
    protocol: str = "framed"
    procs: int = 1
    cpus: str | None = None
    connect_timeout: float = 5.0
    connect_rate: float = 1000.0
    keepalive: float | None = None
    probe_conns: int = 0
    source_addrs: str | None = None
    users: int = 10
    spawn_rate: float | None = None
    processes: int = 1
    run_time: float | None = None
    progress: bool = field(default=False, metadata={"doc": "draw a progress bar on stderr (the CLI: only on a tty)"})
    announce: bool = field(default=False, metadata={"doc": "say on stderr when the measured window starts and ends "
                                                           "(CLOCK_MONOTONIC s; the CLI: with --json)"})

    # -- derived values -------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        return parse_target(self.target)

    @property
    def work_us(self) -> tuple[int, int]:
        return parse_work(self.work)

    @property
    def cpu_list(self) -> list[int] | None:
        return None if self.cpus is None else parse_cpus(self.cpus)

    @property
    def sources(self) -> list[str] | None:
        return None if not self.source_addrs else [a.strip() for a in self.source_addrs.split(",") if a.strip()]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "LoadParams":
        return dataclasses.replace(self, **changes)

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> "LoadParams":
        """Raise LoadError naming the first option that makes no sense; return self."""
        parse_target(self.target)
        parse_work(self.work)
        if self.cpus is not None:
            parse_cpus(self.cpus)
        for ok, message in self._checks():
            if not ok:
                raise LoadError(message)
        for address in self.sources or ():
            _check_ip(address, "--source-addrs")
        return self

    def _checks(self):
        yield self.mode in MODES, f"--mode must be one of {', '.join(MODES)}"
        yield self.engine in ENGINES, f"--engine must be one of {', '.join(ENGINES)}"
        yield self.op in OPS, f"--op must be one of {', '.join(OPS)}"
        yield self.protocol in PROTOCOLS, f"--protocol must be one of {', '.join(PROTOCOLS)}"
        yield self.conns >= 1, "--conns must be at least 1"
        yield self.pipeline >= 1, "--pipeline must be at least 1"
        yield self.duration > 0, "--duration must be positive"
        yield self.warmup >= 0, "--warmup must not be negative"
        yield self.size >= 0, "--size must not be negative"
        yield self.mode != "open" or (self.rate is not None and self.rate > 0), "--mode open needs --rate R > 0 (requests/s)"
        yield self.rate is None or self.rate > 0, "--rate must be positive"
        yield self.op != "ping" or self.size <= protocol.MAX_PING_PAYLOAD, \
            f"--op ping carries at most {protocol.MAX_PING_PAYLOAD} bytes: use --size 0..{protocol.MAX_PING_PAYLOAD}"
        yield self.work == "0,0" or self.op == "work", "--work applies to --op work only"
        yield self.protocol != "raw" or self.op == "echo", "--protocol raw (RFC 862) only echoes: use --op echo"
        yield self.protocol != "raw" or self.size >= 1, "--protocol raw needs --size of at least 1 byte"
        yield self.protocol != "raw" or self.mode != "hold", "--mode hold PINGs its connections: it needs --protocol framed"
        yield self.procs >= 1, "--procs must be at least 1"
        yield self.connect_timeout > 0, "--connect-timeout must be positive"
        yield self.connect_rate > 0, "--connect-rate must be positive"
        yield self.keepalive is None or self.keepalive > 0, "--keepalive must be positive"
        yield self.probe_conns >= 0, "--probe-conns must not be negative"
        yield self.users >= 1, "--users must be at least 1"
        yield self.spawn_rate is None or self.spawn_rate > 0, "--spawn-rate must be positive"
        yield self.processes >= 1, "--processes must be at least 1"
        yield self.run_time is None or self.run_time > 0, "--run-time must be positive"
        yield self.engine != "locust" or (self.mode == "closed" and self.protocol == "framed"), \
            "--engine locust runs a closed loop over the framed protocol only"
        unsupported = c_engine_unsupported(self) if self.engine == "c" else None
        yield unsupported is None, f"--engine c: {unsupported} is not supported"

    # -- request shape -------------------------------------------------------------------------
    def request_and_reply(self) -> tuple[bytes, bytes]:
        """(request bytes, the exact reply bytes) for one request, built by the lab's codec."""
        data = payload_bytes(self.size)
        if self.protocol == "raw":
            return data, data
        if self.op == "ping":
            return protocol.encode(protocol.PING, data), protocol.encode(protocol.PONG, data)
        if self.op == "work":
            frame = protocol.encode_work(*self.work_us, data)
            return frame, frame
        frame = protocol.encode(protocol.ECHO, data)
        return frame, frame


def c_engine_unsupported(params: LoadParams) -> str | None:
    """The first option (as typed) the compiled engine (loadgen/cengine.py) cannot do, or None."""
    d = LoadParams()
    limits = (("--mode hold", params.mode == "hold"), ("--protocol raw", params.protocol == "raw"),
              ("--procs", params.procs != 1), ("--source-addrs", bool(params.source_addrs)),
              ("--keepalive", params.keepalive is not None), ("--probe-conns", params.probe_conns != 0),
              ("--connect-timeout", params.connect_timeout != d.connect_timeout),
              (f"--size above {C_ENGINE_MAX_FRAME_ARG} with --op {params.op}",
               params.op != "echo" and params.size > C_ENGINE_MAX_FRAME_ARG))
    return next((option for option, asked in limits if asked), None)


def payload_bytes(size: int) -> bytes:
    """A recognisable payload of ``size`` bytes (not all zeros, so truncation shows)."""
    pattern = b"conclab-" * (size // 8 + 1)
    return pattern[:size]


def parse_target(target: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port)."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise LoadError(f"--target {target!r} is not HOST:PORT (for example {DEFAULT_TARGET})")
    return host.strip("[]"), int(port)


def parse_work(text: str) -> tuple[int, int]:
    """'IO_US,CPU_US' -> (io_us, cpu_us), each 0..2**32-1."""
    parts = text.split(",")
    try:
        io_us, cpu_us = (int(p) for p in parts)
    except ValueError:
        raise LoadError(f"--work {text!r} is not IO_US,CPU_US (two whole microsecond counts, e.g. 1000,50)") from None
    if not (0 <= io_us <= MAX_U32 and 0 <= cpu_us <= MAX_U32):
        raise LoadError(f"--work {text!r}: each value must be in 0..{MAX_U32} microseconds")
    return io_us, cpu_us


def parse_cpus(text: str) -> list[int]:
    """'1' / '0,2' / '0-3' -> sorted CPU numbers, each one this process may run on."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise LoadError(f"--cpus {text!r} is not a CPU list like 1 or 0,2 or 0-3") from None
    allowed = os.sched_getaffinity(0)
    bad = sorted(cpus - allowed)
    if not cpus or bad:
        raise LoadError(f"--cpus {text!r}: no CPU {bad or text} here (this process may use CPUs "
                        f"{','.join(map(str, sorted(allowed)))})")
    return sorted(cpus)


def _check_ip(address: str, option: str) -> None:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise LoadError(f"{option}: {address!r} is not an IP address") from None
