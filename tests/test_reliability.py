"""Reliability under faults, for every backend variant: the scenarios of reliability/scenarios.py.

The same code is ``conclab check``; docs/reliability.md describes each scenario and
what each model shows. Here they run at CI sizes (reliability.CI: 2,000 churn
cycles, 300 resets, 50 slow clients, ...); ``CONCLAB_FULL=1`` runs the full ones
(reliability.FULL, what ``conclab check`` uses). The scenarios that take seconds
per variant carry the ``slow`` marker: ``-m "not slow"`` leaves them out.

A scenario a model cannot pass by its nature (reliability.scenarios.KNOWN_LIMITS)
is an expected failure here, and only for the failure that shows that limit.
"""
from __future__ import annotations

import pytest

from conclab.reliability import scenarios

pytestmark = pytest.mark.live

SCALE = scenarios.default_scale()


def verdict(outcome: scenarios.Outcome) -> None:
    if outcome.passed:
        return
    if outcome.limit:
        pytest.xfail(f"{outcome.limit}. Measured: {outcome.figure}")
    pytest.fail(f"{outcome.variant} {outcome.scenario}: " + "; ".join(outcome.failures) + f" [{outcome.figure}]",
                pytrace=False)


def check(name: str, variant) -> None:
    backend, options = variant
    verdict(scenarios.run(name, backend, options, SCALE))


def test_resets_mid_frame_leave_nothing_behind(variant):
    """Clients reset mid-frame and mid-reply: a bystander is served throughout; fds back, no CLOSE_WAIT."""
    check("reset", variant)


def test_half_close_gets_every_reply_then_eof(variant):
    """SHUT_WR after pipelined ECHOs, WORK waits and 2 MiB of replies: all come back in order, then EOF."""
    check("half_close", variant)


@pytest.mark.slow
def test_clogged_reader_is_bounded_dropped_and_does_not_delay_shutdown(variant):
    """A client that never reads: RSS bounded, others served, dropped after --idle-timeout,
    and SIGTERM exits within --drain-timeout + 1 s while it is clogged."""
    check("clogged_reader", variant)


@pytest.mark.slow
def test_slowloris_is_closed_by_the_timeouts(variant):
    """Silent and byte-dribbling clients are closed by the idle and frame timeouts; a newcomer is
    served meanwhile (not in the connection-dispatch pool: its known limit)."""
    check("slowloris", variant)


@pytest.mark.slow
def test_fd_exhaustion_backs_off_and_recovers(variant):
    """Under a low RLIMIT_NOFILE with more clients than it can hold: under 25% CPU (no accept busy loop),
    the existing client is served, and a new one is served once fds are freed."""
    check("emfile", variant)


def test_hostile_frames_get_an_error_and_allocate_nothing(variant):
    """Lengths up to 2^32-1, unknown ops, short WORK, oversized PING: ERROR naming the problem, close;
    clients announcing 1 MiB frames they never send cost the server almost nothing."""
    check("hostile", variant)


def test_churn_returns_fds_and_leaves_no_close_wait(variant):
    """Connect/request/close cycles (some close before the reply, some send nothing)."""
    check("churn", variant)


def test_sigterm_under_load_loses_no_reply(variant):
    """SIGTERM under a closed loop of 100 connections: every request the server counted was answered, exit 0."""
    check("shutdown", variant)


@pytest.mark.slow
def test_rate_limit_delay_holds_the_rate(variant):
    """--rate-limit 200 --burst 10, a client pipelining 16: 200 requests/s within 10%."""
    check("rate_delay", variant)


def test_rate_limit_reject_refuses_the_excess_and_stays_open(variant):
    """--rate-limit-mode reject: the burst is served, the rest gets ERROR "rate limited", the connection lives."""
    check("rate_reject", variant)


def test_max_frame_is_enforced_on_the_header(variant):
    """--max-frame 1000: 1000 is echoed; a bare 4-byte header announcing 1001 is refused at once."""
    check("max_frame", variant)


def test_binds_loopback_by_default_and_warns_otherwise(variant):
    """No --host: 127.0.0.1. A non-loopback --host warns (Go's binary too); 127.0.0.2 does not."""
    check("loopback", variant)
