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

DEFAULT_MAX_BUFFERED = 256 << 20   # 256 MiB: fits a small machine (docs/protocol.md section 3)
FAULTS = ("none", "leak", "no-deadline", "unbounded", "hard-kill")
PYTHON_ONLY = ("procs", "switch_interval", "python")   # options of the Python backends (go has its own knobs)
OFFLOAD_BACKENDS = ("asyncio", "uvloop", "gevent", "epoll")   # --cpu-offload: the event loops (servers/offload.py)
MAX_PROCS = 1024               # --procs: worker processes (each a whole interpreter)
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
    max_buffered: int = field(default=DEFAULT_MAX_BUFFERED, metadata={"help": "global budget of request bytes held and not yet answered; a frame that does not fit gets ERROR 'server busy'", "metavar": "BYTES"})
    drain_timeout: float = field(default=5.0, metadata={"help": "graceful shutdown deadline, seconds; what is left then is aborted"})
    metrics_port: int | None = field(default=None, metadata={"help": "serve Prometheus metrics on this port (off by default)"})
    rate_limit: float | None = field(default=None, metadata={"help": "requests/s per connection (token bucket); off by default"})
    burst: float | None = field(default=None, metadata={"help": "token bucket size for --rate-limit (default: the rate)"})
    rate_limit_mode: str = field(default="delay", metadata={"help": "delay (wait for a token) or reject (ERROR 'rate limited')",
                                                            "choices": ("delay", "reject")})
    rate_limit_store: str = field(default="memory", metadata={"help": "where the token bucket lives: memory, or "
                                                                      "redis://HOST:PORT[/DB], shared by every process "
                                                                      "and host using it (docs/ratelimit.md)",
                                                              "metavar": "STORE"})
    rate_limit_scope: str = field(default="connection", metadata={"help": "what one bucket belongs to: a connection, or "
                                                                          "a client (the peer's IP address)",
                                                                  "choices": ("connection", "client")})
    rate_limit_on_error: str = field(default="allow", metadata={"help": "a redis store unreachable or slow (50 ms): "
                                                                        "allow (admit) or deny (ERROR 'rate limited')",
                                                                "choices": ("allow", "deny")})
    fault: str = field(default="none", metadata={"help": "teaching switch that turns one safeguard off", "choices": FAULTS})
    workers: int | None = field(default=None, metadata={"help": "threadpool: worker threads (default: min(32, cpus + 4), like ThreadPoolExecutor)"})
    dispatch: str = field(default="connection", metadata={"help": "threadpool: a worker per connection, or per request",
                                                          "choices": ("connection", "request")})
    gomaxprocs: int | None = field(default=None, metadata={"help": "go: GOMAXPROCS", "default": "what Go chooses"})
    procs: int = field(default=1, metadata={"help": "Python backends: worker processes serving one port, each with "
                                                    "--max-conns / N of the cap (servers/prefork.py)", "metavar": "N"})
    switch_interval: float | None = field(default=None, metadata={"help": "Python backends: sys.setswitchinterval, "
                                                                          "seconds", "default": "CPython's 0.005", "metavar": "S"})
    python: str | None = field(default=None, metadata={"help": "Python backends: run the server under this interpreter",
                                                       "default": "the running one", "metavar": "PATH"})
    cpu_offload: str = field(default="none", metadata={"help": "event-loop backends: process computes WORK's CPU part "
                                                               "in a process pool, one worker per CPU",
                                                       "choices": ("none", "process")})

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
            (self.max_buffered >= self.max_frame, "--max-buffered must be at least --max-frame (one maximal frame must fit)"),
            (self.drain_timeout >= 0, "--drain-timeout must not be negative"),
            (self.metrics_port is None or 0 <= self.metrics_port <= 65535, "--metrics-port must be in 0..65535"),
            (self.rate_limit is None or self.rate_limit > 0, "--rate-limit must be positive"),
            (self.burst is None or self.burst >= 1, "--burst must be at least 1"),
            (self.workers is None or self.workers >= 1, "--workers must be at least 1"),
            (self.gomaxprocs is None or self.gomaxprocs >= 1, "--gomaxprocs must be at least 1"),
            (1 <= self.procs <= MAX_PROCS, f"--procs must be in 1..{MAX_PROCS}"),
            (self.rate_limit_store == "memory" or self.rate_limit_store.startswith("redis://"),
             "--rate-limit-store must be memory or redis://HOST:PORT[/DB]"),
            (self.rate_limit_scope in ("connection", "client"), "--rate-limit-scope must be connection or client"),
            (self.rate_limit_on_error in ("allow", "deny"), "--rate-limit-on-error must be allow or deny"),
            # the shared rate limit: each control changes what --rate-limit does, so without it one is a
            # mistake to report, not a setting to ignore (the go backend's messages, servers/go/config.go)
            (self.rate_limit_store == "memory" or self.rate_limit is not None, "--rate-limit-store needs --rate-limit"),
            (self.rate_limit_scope == "connection" or self.rate_limit is not None,
             "--rate-limit-scope needs --rate-limit"),
            (self.rate_limit_on_error == "allow" or self.rate_limit_store != "memory",
             "--rate-limit-on-error needs --rate-limit-store redis://HOST:PORT (memory never fails)"),
            (self.switch_interval is None or (self.switch_interval > 0 and _finite(self.switch_interval)),
             f"--switch-interval must be a positive number of seconds, at most {MAX_TIMEOUT_S}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.rate_limit_store != "memory":
            from .redis_bucket import parse_url        # imported here: only a redis store needs the client
            parse_url(self.rate_limit_store)           # ValueError in one line, as go's parseRedisURL

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
    def buffer_budget(self) -> float:
        """--max-buffered, or no budget at all under --fault unbounded."""
        return float("inf") if self.fault == "unbounded" else self.max_buffered

    @property
    def rate_limit_shared(self) -> bool:
        """A connection's requests draw on a bucket that is not its own: a redis store, or scope client."""
        return self.rate_limit is not None and (self.rate_limit_store != "memory" or self.rate_limit_scope == "client")

    @property
    def rate_store_label(self) -> str:
        """The store as STATS and the final line show it: memory, or redis://HOST:PORT (no database: where
        it is, not how it is used), as the go backend shows it."""
        if self.rate_limit_store == "memory":
            return "memory"
        from .redis_bucket import parse_url
        address = parse_url(self.rate_limit_store)
        host = f"[{address.host}]" if ":" in address.host else address.host
        return f"redis://{host}:{address.port}"

    @property
    def effective_burst(self) -> float | None:
        """The bucket size: --burst, else the rate, and never under one whole token."""
        return None if self.rate_limit is None else max(self.burst or self.rate_limit, 1.0)

    def python_only(self) -> list[str]:
        """The options given here that only the Python backends take (--procs, ...), as --names."""
        return ["--" + f.name.replace("_", "-") for f in dataclasses.fields(self)
                if f.name in PYTHON_ONLY and getattr(self, f.name) != f.default]

    def per_worker(self) -> "ServerConfig":
        """One of --procs workers' settings: its share of the server's caps, ceil(cap / procs) of --max-conns
        and of --max-buffered (never under one --max-frame)."""
        return dataclasses.replace(self, max_conns=math.ceil(self.max_conns / self.procs),
                                   max_buffered=max(self.max_frame, math.ceil(self.max_buffered / self.procs)))

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
    return {"str": str, "int": int, "float": float, "int | None": int, "float | None": float, "str | None": str}[f.type]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ServerConfig field as a --option with its help and default."""
    for f in dataclasses.fields(ServerConfig):
        meta = dict(f.metadata)
        default = meta.get("default", "off" if f.default is None else f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_type_of(f), default=f.default,
                            choices=meta.get("choices"), metavar=None if "choices" in meta else meta.get("metavar", f.name.upper()),
                            help=f"{meta['help']} (default: {default})")


def from_namespace(ns: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(ServerConfig)})
