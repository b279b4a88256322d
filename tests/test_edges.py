"""Edge scenarios, for every backend variant: fairness, peers that do not read, shutdown and resource
edges, start-up validation (reliability/edges.py; docs/reliability.md, "Edge scenarios").

Each test is one scenario through ``scenarios.run`` and the verdict of tests/test_reliability.py:
CI sizes here (reliability.edges.EDGE_CI), ``CONCLAB_FULL=1`` for the full ones. A failure a model
cannot avoid by its nature (scenarios.KNOWN_LIMITS) is an expected failure, and only that failure.
"""
from __future__ import annotations

import pytest
from test_reliability import SCALE, verdict

from conclab.reliability import scenarios

pytestmark = pytest.mark.live


def check(name: str, variant) -> None:
    backend, options = variant
    verdict(scenarios.run(name, backend, options, SCALE))


def test_a_pipelining_client_does_not_starve_others(variant):
    """One client pipelines ECHOs as fast as the server takes them and reads every reply: another's
    PINGs are answered within 0.5 s each, an idle connection gets "idle timeout" within 1 + 1 s."""
    check("fairness", variant)


def test_clients_that_never_read_hold_no_worker_others_need(variant):
    """--workers 2: two clients push 8 MiB of ECHOs each and never read; a third client's PING is
    answered within 1 s (the connection-dispatch pool cannot: its known limit)."""
    check("non_reading_clients", variant)


def test_a_connection_closing_with_unsent_replies_is_reset_in_time(variant):
    """A protocol error read together with an 8 MiB ECHO the peer never reads: within --idle-timeout
    + 2 s the connection is gone, in the server and in the kernel (a reset, no FIN-WAIT-1 orphan)."""
    check("closing_with_unsent_data", variant)


@pytest.mark.slow
def test_sigterm_in_a_connect_burst_exits_cleanly(variant):
    """SIGTERM while 300 connections pour in from 6 threads, 10 times: exit 0 within 2 s with the final
    JSON line, connections_aborted 0, no traceback."""
    check("sigterm_during_connect_burst", variant)


def test_thread_exhaustion_sheds_instead_of_dying(variant):
    """RLIMIT_AS = VMS + 2.5 GiB, then 300 connections at once: each PONG or "server busy" (counted),
    the server lives, a fresh client is served afterwards."""
    check("thread_exhaustion", variant)


@pytest.mark.slow
def test_closed_connections_leave_no_state(variant):
    """--idle-timeout 60, two rounds of connect/PING/close cycles: RSS after the second within
    250 B per closed connection of RSS after the first."""
    check("churn_state", variant)


@pytest.mark.slow
def test_a_slow_but_steady_reader_gets_every_byte(variant):
    """--idle-timeout 1, 8 MiB of replies read 64 KiB every 0.3 s for 8 s, then at full speed: nothing
    is cut, since the replies always make progress."""
    check("slow_steady_reader", variant)


@pytest.mark.slow
def test_a_stopped_reader_is_reset_and_counted_idle(variant):
    """--idle-timeout 1, a client that never reads (8 MiB pushed; 2 MiB pushed): within 1 + 2 s it is
    gone (not active, fds back, no socket left), idle_timeouts + 1, and it reads a reset."""
    check("stopped_reader", variant)


def test_an_idle_connection_keeps_no_big_frame_buffer(variant):
    """64 clients each ECHO 1 MiB, then idle: RSS within the baseline + 64 x 256 KiB."""
    check("big_frame_memory", variant)


def test_timeouts_no_timer_can_hold_are_refused_at_start(variant):
    """--idle-timeout 1e10 / inf, --frame-timeout 1e10, --drain-timeout inf: exit 2, one line naming the
    option, no traceback (the go binary started directly too)."""
    check("huge_timeouts", variant)


def test_metrics_port_zero_is_reported_and_slow_scrapers_harm_nobody(variant):
    """--metrics-port 0: "metrics on HOST:PORT" on stderr; a silent and a dribbling client on it do not
    delay a scrape (< 2 s) nor SIGTERM (exit 0 within 3 s)."""
    check("metrics_port", variant)


def test_the_buffer_budget_bounds_memory_and_refuses_past_it(variant):
    """--max-buffered 8 MiB, 40 connections each send most of one 1 MiB frame: RSS within the baseline
    + 8 + 16 MiB, those past the budget get ERROR "server busy" (buffer_rejections counts them), honest
    clients are served meanwhile, admitted frames are echoed once complete, and the budget is free after."""
    check("buffer_budget", variant)
