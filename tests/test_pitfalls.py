"""The pitfall lab: a tiny `conclab run pitfalls` on the thread pool shows each fault's failure, and the report renders it."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

from conclab.analysis import report
from conclab.analysis.results import load_run
from conclab.experiments import pitfalls
from conclab.experiments.harness import cli
from conclab.servers import processes
from conclab.experiments.harness.tables import COLUMNS

RUN_ID = "pitfalls-tiny"
BACKEND = "threadpool"          # connection dispatch: the one model where silent clients starve the rest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    started = time.monotonic()
    code = cli.main(["pitfalls", "--profile", "tiny", "--backends", BACKEND, "--results", str(results),
                     "--run-id", RUN_ID])
    return code, results / RUN_ID, time.monotonic() - started


def final(summary: pd.DataFrame, pitfall: str, fixed: bool) -> pd.Series:
    rows = summary[(summary.pitfall == pitfall) & (summary.fixed == int(fixed))]
    assert len(rows) == 1, (pitfall, fixed)
    return rows.iloc[0]


def test_tables_have_the_contract_columns(tiny):
    code, run_dir, elapsed = tiny
    assert code == 0 and elapsed < 60
    for table in ("pitfalls", "pitfalls_summary"):
        frame = pd.read_csv(run_dir / f"{table}.csv")
        assert list(frame.columns) == list(COLUMNS[table])
    series = pd.read_csv(run_dir / "pitfalls.csv")
    assert set(series.pitfall) == set(pitfalls.PITFALLS) and set(series.fixed) == {0, 1}
    assert (series.groupby(["pitfall", "fixed"]).size() >= 3).all()        # a time series, not a point
    assert processes.live_count() == 0


def test_leak_leaves_close_wait_only_when_broken(tiny):
    s = pd.read_csv(tiny[1] / "pitfalls_summary.csv")
    broken, fixed = final(s, "leak", False), final(s, "leak", True)
    assert broken.close_wait_end > 0 and broken.fds_end - broken.fds_start >= broken.served * 0.9
    assert fixed.close_wait_end == 0 and fixed.fds_end <= fixed.fds_start + 1
    assert broken.served > 0 and fixed.served > 0


def test_no_deadline_starves_the_pool_only_when_broken(tiny):
    s = pd.read_csv(tiny[1] / "pitfalls_summary.csv")
    broken, fixed = final(s, "no-deadline", False), final(s, "no-deadline", True)
    assert broken.served == 0 and broken.starved > 0
    assert fixed.served > 0 and fixed.silent_dropped > 0


def test_unbounded_rejects_only_when_fixed(tiny):
    s = pd.read_csv(tiny[1] / "pitfalls_summary.csv")
    broken, fixed = final(s, "unbounded", False), final(s, "unbounded", True)
    assert broken.rejected == 0 and fixed.rejected > 0
    assert broken.fds_peak > fixed.fds_peak


def test_hard_kill_loses_replies_only_when_broken(tiny):
    s = pd.read_csv(tiny[1] / "pitfalls_summary.csv")
    broken, fixed = final(s, "hard-kill", False), final(s, "hard-kill", True)
    assert broken.replies_lost > 0 and broken.exit_status < 0
    assert fixed.replies_lost == 0 and fixed.exit_status == 0 and fixed.served == fixed.sent


def test_report_has_the_pitfalls_section(tiny):
    run = load_run(str(tiny[1]))
    path, results = report.write(run)
    text = Path(path).read_text(encoding="utf-8")
    assert 'id="pitfalls"' in text and "未关闭conn" in text and "SetReadDeadline" in text
    drawn = [r for r in results if r.experiment == "pitfalls" and r.files]
    assert drawn, "the pitfalls chart was drawn"
    assert all((Path(path).parent / r.files["png"]).exists() for r in drawn)


@pytest.mark.unit
def test_no_deadline_sentence_is_computed_over_every_fixed_variant():
    """'served in all' only when every fixed variant served every fresh client; else each shortfall by name."""
    from conclab.analysis import findings
    def rows(threadpool_served):
        return pd.DataFrame([
            {"variant": v, "backend": v, "pitfall": "no-deadline", "fixed": fixed, "sent": sent, "served": served,
             "starved": sent - served}
            for v, sent in (("threads", 10), ("threadpool", 50), ("go", 10))
            for fixed, served in ((0, 0 if v == "threadpool" else sent),
                                  (1, threadpool_served if v == "threadpool" else sent))])
    short = findings.pitfalls(rows(17)).text
    assert "every fresh client was served in threads and go." in short
    assert "threadpool served 17 of 50 fresh clients (33 starved)" in short and "in all" not in short
    assert "every fresh client was served in all 3 variants" in findings.pitfalls(rows(50)).text
