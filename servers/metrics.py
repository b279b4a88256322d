"""Prometheus exposition of the server's counters, plus the two numbers that reveal leaks.

The monitoring advice of the article the lab answers (docs/article.md), made
concrete: besides the STATS counters the endpoint reports the process's open
file descriptors and its connections in CLOSE_WAIT (the peer has closed, we have not: a count that keeps growing is
the signature of a connection leak).

The HTTP endpoint runs in its own OS thread, started before the backend takes
over the main thread. That is what keeps scraping alive while an asyncio loop
or the gevent hub is busy: the GIL is handed over every ``sys.getswitchinterval()``
(5 ms), whatever the single-threaded model is doing. Metric names are shared
with the Go server (servers/go/main.go), so one dashboard fits every backend.

A scrape must cost the server little, since every Python thread shares one
GIL: while the collector computes, an event loop waits. So CLOSE_WAIT is
counted by the kernel (``tcpdiag.count``: sock_diag filtered by port and
state, in C), not by psutil's ``net_connections``, whose Python parses the
machine's whole TCP table and lists every fd of the process. Without netlink
the psutil count is the fallback, taken at most once per ``SLOW_COUNT_EVERY``
seconds and reused in between, so frequent scrapes cannot make it a load.

Each scrape connection gets its own daemon thread (the standard library's
threading HTTP server) with a socket timeout, so a client that connects and
sends nothing, or dribbles a header, holds one idle thread, never the scrapes
of others, and never the exit: the threads are daemons, and ``shutdown``
stops only the accept loop.

With ``--procs N`` the parent process serves the one endpoint, and ``stats``
is its view of the workers (servers/prefork.py): their counters and open fds
summed at scrape time, asked of each worker over a private socket.
"""
from __future__ import annotations

import socket
import sys
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psutil
from prometheus_client import make_wsgi_app
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily

from . import tcpdiag
from .base import StartupError
from .stats import Stats

PREFIX = "conclab_"
COUNTER_HELP = {
    "connections_total": "connections admitted",
    "connections_rejected": "connections refused with 'server busy' (over --max-conns)",
    "requests_total": "complete requests received",
    "bytes_in": "bytes received",
    "bytes_out": "bytes of replies sent",
    "idle_timeouts": "connections closed by --idle-timeout",
    "frame_timeouts": "connections closed by --frame-timeout",
    "protocol_errors": "connections closed for breaking the protocol",
    "rate_limited": "requests answered 'rate limited'",
    "buffer_rejections": "connections refused a frame with 'server busy' (over --max-buffered)",
    "offloaded": "WORK requests whose CPU part ran in the --cpu-offload process pool",
    "rate_store_calls": "round trips to the --rate-limit-store (EVALSHA sent)",
    "rate_store_errors": "requests given the --rate-limit-on-error verdict (store down, slow or skipped while reconnecting)",
}
GAUGE_HELP = {
    "connections_active": "connections open now",
    "buffered_bytes": "request bytes held and not yet answered, reserved from --max-buffered",
}
SLOW_COUNT_EVERY = 1.0         # seconds: the psutil fallback for CLOSE_WAIT is taken at most this often
SCRAPE_IO_TIMEOUT = 5.0        # seconds a scrape connection may stay silent (reading) or stalled (writing)


class StatsCollector:
    """Reads Stats and the process at scrape time (nothing is updated on the hot path)."""

    def __init__(self, stats: Stats, port: int) -> None:
        self.stats = stats
        self.port = port
        self.process = psutil.Process()
        self.open_fds = getattr(stats, "open_fds", self.process.num_fds)   # --procs: every worker's, summed
        self.netlink = True                    # until it fails once
        self.slow = (-float("inf"), 0)         # (when, value) of the last psutil count
        self.lock = threading.Lock()           # scrapes run in threads of their own

    def collect(self):
        snapshot = self.stats.snapshot()
        labels = ["backend"], [snapshot["backend"]]
        for name, help_text in GAUGE_HELP.items():
            gauge = GaugeMetricFamily(PREFIX + name, help_text, labels=labels[0])
            gauge.add_metric(labels[1], snapshot[name])
            yield gauge
        for name, help_text in COUNTER_HELP.items():
            family = CounterMetricFamily(PREFIX + name.removesuffix("_total"), help_text, labels=labels[0])
            family.add_metric(labels[1], snapshot[name])
            yield family
        for name, help_text, value in [
            ("open_fds", "file descriptors open in the server process", self.open_fds()),
            ("close_wait_connections", "server connections in CLOSE_WAIT (peer closed, we did not)",
             self.close_wait()),
        ]:
            family = GaugeMetricFamily(PREFIX + name, help_text, labels=labels[0])
            family.add_metric(labels[1], value)
            yield family

    def close_wait(self) -> int:
        """Our connections in CLOSE_WAIT: the kernel counts (sock_diag); else psutil, at most once a second."""
        if self.netlink:
            try:
                return tcpdiag.count(self.port, [tcpdiag.TCP_CLOSE_WAIT])["tcp_close_wait"]
            except OSError:
                self.netlink = False
        with self.lock:
            taken, value = self.slow
            if time.monotonic() - taken >= SLOW_COUNT_EVERY:
                value = sum(1 for c in self.process.net_connections(kind="tcp")
                            if c.status == psutil.CONN_CLOSE_WAIT and c.laddr and c.laddr.port == self.port)
                self.slow = (time.monotonic(), value)
            return value


class ScrapeHandler(WSGIRequestHandler):
    """One scrape connection: silent in the log, and bounded in how long it may stall each read or write."""

    timeout = SCRAPE_IO_TIMEOUT               # StreamRequestHandler.setup: settimeout on the connection

    def log_message(self, format, *args) -> None:
        pass


class MetricsServer(ThreadingMixIn, WSGIServer):
    """The standard library's WSGI server with a daemon thread per connection."""

    daemon_threads = True


def start(host: str, port: int, stats: Stats, server_port: int):
    """Serve /metrics on host:port in a daemon thread; returns the HTTP server (call shutdown()).

    Says where on stderr, ``metrics on HOST:PORT`` (the port the kernel chose for
    ``--metrics-port 0``), as the Go server does; stdout stays the contract's.
    """
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats, server_port))
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        server_class = type("MetricsServer", (MetricsServer,), {"address_family": family})
        httpd = make_server(address[0], port, make_wsgi_app(registry), server_class, handler_class=ScrapeHandler)
    except OSError as exc:                     # socket.gaierror included
        raise StartupError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    bound_host, bound_port = httpd.socket.getsockname()[:2]
    where = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
    print(f"metrics on {where}", file=sys.stderr, flush=True)
    return httpd
