"""The Prometheus endpoint of every backend: live while the server is busy, and equal to STATS."""
from __future__ import annotations

import threading
import time
import urllib.request

import pytest

from conclab.servers.launcher import free_port, wait_until
from conclab.servers.protocol import ECHO, WORK, encode_work

pytestmark = pytest.mark.live

SCRAPE_TIMEOUT = 5.0


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("conclab_"):
            name_labels, value = line.rsplit(" ", 1)
            values[name_labels.split("{")[0]] = float(value)
    return values


def busy_clients(server, stop: threading.Event, count: int = 4):
    def loop():
        with server.connect() as client:
            while not stop.is_set():
                client.request(ECHO, b"x" * 64)
                client.request(WORK, encode_work(0, 2000)[5:])    # 2 ms of CPU: the loop is busy
    threads = [threading.Thread(target=loop) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_metrics_are_live_under_load_and_agree_with_stats(start):
    port = free_port()
    server = start("--metrics-port", str(port))
    stop = threading.Event()
    threads = busy_clients(server, stop)
    try:
        assert wait_until(lambda: scrape(port)["conclab_requests_total"] > 50, timeout=10)
        began = time.monotonic()
        under_load = scrape(port)
        assert time.monotonic() - began < SCRAPE_TIMEOUT
        assert under_load["conclab_connections_active"] == 4
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    with server.connect() as client:
        # the 4 busy clients gone and this one accepted (active == 1 alone also holds while one busy client
        # is still closing and this one waits in the accept queue)
        settled = lambda: (lambda m: (m["conclab_connections_active"], m["conclab_connections_total"]))(scrape(port))
        assert wait_until(lambda: settled() == (1, 5))
        scraped = scrape(port)
        stats = client.stats()                   # this STATS request is one more request, 5 more bytes
    assert scraped["conclab_requests_total"] == stats["requests_total"] - 1
    assert scraped["conclab_bytes_in_total"] == stats["bytes_in"] - 5
    assert scraped["conclab_connections_total"] == stats["connections_total"] == 5
    for name in ("connections_rejected", "idle_timeouts", "protocol_errors"):
        assert scraped[f"conclab_{name}_total"] == stats[name]
    assert scraped["conclab_close_wait_connections"] == 0
    assert scraped["conclab_open_fds"] >= 3
