"""Reliability scenarios: resets, half-closes, clogged and slow peers, fd exhaustion, hostile frames,
churn, shutdown under load, rate limits and safe defaults, run against live servers of every backend.

    from conclab.reliability import run, SCENARIOS, CI, FULL
    outcome = run("emfile", "epoll", [], FULL)
    outcome.passed, outcome.figure, outcome.metrics

One implementation, two users: tests/test_reliability.py (CI sizes, ``CONCLAB_FULL=1`` for the
full ones) and ``conclab check`` (full sizes; table per backend, results/<run-id>/check.csv and
check.json). docs/reliability.md describes every scenario and what each model shows.
"""
from .scenarios import CI, FULL, SCENARIOS, Outcome, Scale, default_scale, known_limit, run

__all__ = ["CI", "FULL", "SCENARIOS", "Outcome", "Scale", "default_scale", "known_limit", "run"]
