"""One settings object for every backend: the controls of docs/protocol.md section 3.

Each field is a named, documented tunable with the contract's default; the
command line is generated from these fields (``add_arguments``), so a control is
declared once and means the same thing in every concurrency model.
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
from dataclasses import dataclass, field

from .protocol import DEFAULT_MAX_FRAME

FAULTS = ("none", "leak", "no-deadline", "unbounded", "hard-kill")
MAX_TIMEOUT_S = 1_000_000      # ~11.6 days: every timer API of every backend (and Go's time.Duration) holds it


@dataclass
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "bind address (loopback unless you say otherwise)"})
    port: int = field(default=0, metadata={"help": "TCP port; 0 picks a free one, printed on the 'listening on' line"})
    protocol: str = field(default="framed", metadata={"help": "framed (the lab protocol) or raw (RFC 862 echo)",
                                                      "choices": ("framed", "raw")})
    max_conns: int = field(default=10_000, metadata={"help": "connections over this cap get ERROR 'server busy' and are closed"})
    idle_timeout: float = field(default=60.0, metadata={"help": "seconds without a complete frame (raw: any byte) before ERROR 'idle timeout'"})
    frame_timeout: float = field(default=10.0, metadata={"help": "seconds a started frame has to complete (defeats slowloris dribbling)"})
    max_frame: int = field(default=DEFAULT_MAX_FRAME, metadata={"help": "largest accepted frame length (op + payload), bytes"})
    drain_timeout: float = field(default=5.0, metadata={"help": "graceful shutdown deadline, seconds; what is left then is aborted"})
    metrics_port: int | None = field(default=None, metadata={"help": "serve Prometheus metrics on this port (off by default)"})
    rate_limit: float | None = field(default=None, metadata={"help": "requests/s per connection (token bucket); off by default"})
    burst: float | None = field(default=None, metadata={"help": "token bucket size for --rate-limit (default: the rate)"})
    rate_limit_mode: str = field(default="delay", metadata={"help": "delay (wait for a token) or reject (ERROR 'rate limited')",
                                                            "choices": ("delay", "reject")})
    fault: str = field(default="none", metadata={"help": "teaching switch that turns one safeguard off", "choices": FAULTS})
    workers: int | None = field(default=None, metadata={"help": "threadpool: worker threads (default: min(32, cpus + 4), like ThreadPoolExecutor)"})
    dispatch: str = field(default="connection", metadata={"help": "threadpool: a worker per connection, or per request",
                                                          "choices": ("connection", "request")})
    gomaxprocs: int | None = field(default=None, metadata={"help": "go: GOMAXPROCS (default: what Go chooses)"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first setting that makes no sense."""
        checks = [
            (0 <= self.port <= 65535, "--port must be in 0..65535"),
            (self.max_conns >= 1, "--max-conns must be at least 1"),
            (self.idle_timeout > 0, "--idle-timeout must be positive"),
            (self.frame_timeout > 0, "--frame-timeout must be positive"),
            *((_finite(value), f"--{name} must be a finite number of seconds, at most {MAX_TIMEOUT_S}")
              for name, value in (("idle-timeout", self.idle_timeout), ("frame-timeout", self.frame_timeout),
                                  ("drain-timeout", self.drain_timeout))),
            (1 <= self.max_frame <= 0xFFFFFFFF, "--max-frame must be in 1..4294967295"),
            (self.drain_timeout >= 0, "--drain-timeout must not be negative"),
            (self.metrics_port is None or 0 <= self.metrics_port <= 65535, "--metrics-port must be in 0..65535"),
            (self.rate_limit is None or self.rate_limit > 0, "--rate-limit must be positive"),
            (self.burst is None or self.burst >= 1, "--burst must be at least 1"),
            (self.workers is None or self.workers >= 1, "--workers must be at least 1"),
            (self.gomaxprocs is None or self.gomaxprocs >= 1, "--gomaxprocs must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"

    @property
    def connection_cap(self) -> float:
        """--max-conns, or no cap at all under --fault unbounded."""
        return float("inf") if self.fault == "unbounded" else self.max_conns

    @property
    def effective_burst(self) -> float | None:
        """The bucket size: --burst, else the rate, and never under one whole token."""
        return None if self.rate_limit is None else max(self.burst or self.rate_limit, 1.0)

    def argv(self) -> list[str]:
        """These settings as command-line options (for the Go server and subprocesses)."""
        args = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and value != f.default:
                args += ["--" + f.name.replace("_", "-"), str(value)]
        return args


def _finite(seconds: float) -> bool:
    """A timeout every backend can arm: not inf or nan, not past MAX_TIMEOUT_S (no "never": use a day)."""
    return math.isfinite(seconds) and seconds <= MAX_TIMEOUT_S


def _type_of(f: dataclasses.Field) -> type:
    return {"str": str, "int": int, "float": float, "int | None": int, "float | None": float}[f.type]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ServerConfig field as a --option with its help and default."""
    for f in dataclasses.fields(ServerConfig):
        meta = dict(f.metadata)
        default = "off" if f.default is None else f.default
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_type_of(f), default=f.default,
                            choices=meta.get("choices"), metavar=None if "choices" in meta else f.name.upper(),
                            help=f"{meta['help']} (default: {default})")


def from_namespace(ns: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(ServerConfig)})
