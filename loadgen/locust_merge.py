"""What a Locust worker reports to its master when the test stops, and the master's exact merge.

Every worker (a process of ``loadgen/locustfile.py`` under ``locust --worker``,
on this machine or another) keeps its own µs HDR histogram and counts its
failures by the lab's error kinds. When the test stops it sends one report over
Locust's own message channel (``runner.send_message(REPORT_MESSAGE, report)``)
to the master, which keeps one report per worker and, at the end, merges them:
histograms bucket by bucket (``histo.merge``), counters summed. Nothing is
copied between machines by hand; the master writes the merged report to a file
on its own machine for ``conclab load --engine locust`` to read.

This module imports no Locust and no gevent: the report is plain data, so the
merge is tested without starting anything.
"""
from __future__ import annotations

import os
import socket
from collections import Counter

from . import histo

REPORT_MESSAGE = "conclab_report"       # the message type on Locust's worker -> master channel
ERROR_KINDS = (("server busy", "server_busy"), ("rate limited", "rate_limited"), ("refused", "refused"),
               ("closed by the server", "closed"), ("reset", "reset"), ("timed out", "timeout"),
               ("unexpected reply", "protocol"), ("server error", "server_error"))


def failure_kind(error: str) -> str:
    """A failure's text (``str(exception)``, or Locust's CSV column, which names the type too) -> an error kind."""
    text = str(error).lower()
    for needle, kind in ERROR_KINDS:
        if needle in text:
            return kind
    return "other"


def worker_report(recorder: histo.Recorder, failures: Counter, cpu_s: float, cpu_wall_s: float) -> dict:
    """One worker's part: its histogram (encoded), successes, failures by kind, CPU over its run."""
    encoded = recorder.encode()
    return {"host": socket.gethostname(), "pid": os.getpid(), "requests": recorder.histogram.get_total_count(),
            "errors": dict(failures), "histogram": encoded, "cpu_s": cpu_s, "cpu_wall_s": cpu_wall_s}


def merge_reports(reports: list[dict], expected: int | None = None) -> dict:
    """The master's result: every worker's report kept, histograms added exactly, counters summed.

    ``expected``: how many workers were running when the test stopped (None: not known); a
    shortfall is reported in ``workers_missing``, never hidden.
    """
    merged = histo.merge([r["histogram"] for r in reports])
    errors = Counter()
    for report in reports:
        errors.update(report.get("errors") or {})
    return {"workers": reports, "workers_reported": len(reports),
            "workers_missing": max(0, (expected or 0) - len(reports)),
            "requests": sum(r["requests"] for r in reports), "errors": dict(errors),
            "histogram": histo.encode(merged), "hdr_count": merged.get_total_count()}
