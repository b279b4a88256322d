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
"""
from __future__ import annotations

import psutil
from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily

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
}


class StatsCollector:
    """Reads Stats and the process at scrape time (nothing is updated on the hot path)."""

    def __init__(self, stats: Stats, port: int) -> None:
        self.stats = stats
        self.port = port
        self.process = psutil.Process()

    def collect(self):
        snapshot = self.stats.snapshot()
        labels = ["backend"], [snapshot["backend"]]
        active = GaugeMetricFamily(PREFIX + "connections_active", "connections open now", labels=labels[0])
        active.add_metric(labels[1], snapshot["connections_active"])
        yield active
        for name, help_text in COUNTER_HELP.items():
            family = CounterMetricFamily(PREFIX + name.removesuffix("_total"), help_text, labels=labels[0])
            family.add_metric(labels[1], snapshot[name])
            yield family
        for name, help_text, value in [
            ("open_fds", "file descriptors open in the server process", self.process.num_fds()),
            ("close_wait_connections", "server connections in CLOSE_WAIT (peer closed, we did not)",
             self.close_wait()),
        ]:
            family = GaugeMetricFamily(PREFIX + name, help_text, labels=labels[0])
            family.add_metric(labels[1], value)
            yield family

    def close_wait(self) -> int:
        return sum(1 for c in self.process.net_connections(kind="tcp")
                   if c.status == psutil.CONN_CLOSE_WAIT and c.laddr and c.laddr.port == self.port)


def start(host: str, port: int, stats: Stats, server_port: int):
    """Serve /metrics on host:port in a daemon thread; returns the HTTP server (call shutdown())."""
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats, server_port))
    try:
        httpd, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    return httpd
