"""The trade-off table (analysis/tradeoff_table.py) and its decision guide, from synthetic runs written here.

Each test writes a small results folder (CSV tables with the contract's columns, a manifest) with known rows,
loads it the way the report does and checks the table against those rows: every cell is its rows' median, an
experiment the run lacks says "not measured" with its command, an invalid point is never a figure, overlapping
intervals are a tie, the guide quotes the cells' figures, tradeoff.csv is written and the report shows the
table first. No process is started.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from conclab.analysis import derive, report, tradeoff_table
from conclab.analysis.fmt import num
from conclab.analysis.results import load_run
from conclab.experiments.harness.tables import COLUMNS

CONNS = 50
ROUNDS = (1, 2, 3)


def write_run(path: Path, tables: dict, repeat: int = 3) -> Path:
    """A run directory: each table's rows under the contract's columns (absent cells empty), a manifest."""
    path.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        frame = pd.DataFrame(rows)
        frame.reindex(columns=list(COLUMNS[name])).to_csv(path / f"{name}.csv", index=False)
    manifest = {"run_id": path.name, "status": "complete", "experiments": sorted(tables),
                "parameters": {"repeat": repeat}, "profile": {"name": "standard", "reference_conns": CONNS}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def key(experiment: str, variant: str, repeat: int) -> dict:
    return {"run_id": "synthetic", "experiment": experiment, "backend": variant.split("-")[0], "variant": variant,
            "repeat": repeat}


def throughput_rows(values: dict, cpu_us: float = 10.0, invalid: dict | None = None) -> list:
    """Closed-loop rows at the reference point: variant -> req/s per round; ``invalid``: variant -> reason."""
    rows = []
    for variant, per_round in values.items():
        for repeat, rps in zip(ROUNDS, per_round):
            bad = (invalid or {}).get(variant)
            rows.append({**key("throughput", variant, repeat), "conns": CONNS, "throughput_rps": rps,
                         "cpu_us_per_req": cpu_us + repeat, "valid": 0 if bad else 1, "invalid_reason": bad or "",
                         "loadgen_saturated": 1 if bad else 0, "conns_served": CONNS, "unanswered": 0})
    return rows


def latency_rows(p99_at_half: dict) -> list:
    """Open-loop rows at 0.1 and 0.5 of capacity (10,000 req/s): variant -> p99 (µs) at 0.5 per round."""
    rows = []
    for variant, per_round in p99_at_half.items():
        for repeat, p99 in zip(ROUNDS, per_round):
            for fraction, value in ((0.1, 500.0), (0.5, p99)):
                offered = 10_000 * fraction
                rows.append({**key("latency", variant, repeat), "conns": CONNS, "capacity_rps": 10_000,
                             "rate_fraction": fraction, "offered_rps": offered, "throughput_rps": offered,
                             "p99_us": value, "requests": 1000, "valid": 1, "conns_served": CONNS,
                             "unanswered": 0, "loadgen_saturated": 0})
    return rows


def memory_fit_rows(per_conn: dict) -> list:
    """Per variant: (RSS KiB/conn, kernel KiB/conn) per round."""
    rows = []
    for variant, per_round in per_conn.items():
        for repeat, (rss, kernel) in zip(ROUNDS, per_round):
            for metric, value in (("rss_kib", rss), ("kernel_kib", kernel)):
                rows.append({**key("memory", variant, repeat), "metric": metric, "per_conn": value,
                             "intercept": 1000, "r2": 0.999, "n_points": 5, "unit": "KiB"})
    return rows


@pytest.fixture
def run(tmp_path):
    """epoll and asyncio tie on req/s, go is well above both but saturated (invalid); memory and latency
    measured for three models; convoy, cores, c10k and switch not in the run."""
    path = write_run(tmp_path / "synthetic", {
        "throughput": throughput_rows({"epoll": (100_000, 110_000, 120_000), "asyncio": (105_000, 108_000, 112_000),
                                       "go": (300_000, 310_000, 320_000)},
                                      invalid={"go": "load generator saturated"}),
        "latency": latency_rows({"epoll": (2000, 2100, 2200), "asyncio": (8000, 8100, 8200),
                                 "threads": (30_000, 31_000, 32_000)}),
        "memory_fit": memory_fit_rows({"epoll": ((1.0, 4.0), (1.1, 4.1), (1.2, 4.2)),
                                       "threads": ((25.0, 30.0), (25.5, 30.5), (26.0, 31.0))}),
        "memory": [{**key("memory", v, 1), "n_target": 1000, "n_conns": 1000, "rss_kib": 50_000}
                   for v in ("epoll", "threads")],
    })
    return load_run(str(path))


@pytest.fixture
def table(run):
    return tradeoff_table.build(run)


def raw(run, table_name: str, **where) -> pd.DataFrame:
    frame = run.tables[table_name]
    for column, value in where.items():
        frame = frame[frame[column] == value]
    return frame


# -- cells ---------------------------------------------------------------------------------------------

def test_every_cell_is_the_median_of_its_input_rows(run, table):
    measured = [(v, c.key) for v in table.variants for c in tradeoff_table.COLUMNS
                if table.cell(v, c.key).usable]
    assert measured, "the synthetic run measures something"
    for variant, column in measured:
        cell = table.cell(variant, column)
        source = cell.source
        assert source["variant"] == variant
        if column in ("rps", "cpu"):
            rows = raw(run, "throughput", variant=variant, conns=source["conns"])
            name = "throughput_rps" if column == "rps" else "cpu_us_per_req"
            assert cell.value == rows[name].median()
            assert (cell.lo, cell.hi) == pytest.approx((rows[name].min(), rows[name].max()))   # 3 rounds: min–max
        elif column == "p99_half":
            rows = raw(run, "latency", variant=variant, rate_fraction=source["rate_fraction"])
            assert source["rate_fraction"] == tradeoff_table.HALF_LOAD
            assert cell.value == pytest.approx(rows.p99_us.median() / 1000)
        elif column == "memory":
            rows = raw(run, "memory_fit", variant=variant)
            per_metric = rows.groupby("metric").per_conn.median()
            assert cell.value == pytest.approx(per_metric["rss_kib"] + per_metric["kernel_kib"])
        elif column == "past":
            continue                # no knee in this run: no figure (checked below)
        else:
            pytest.fail(f"untraced column {column}")
        assert num(cell.value) in cell.text


def test_the_table_has_a_row_per_model_and_a_column_per_cost(table):
    assert table.variants[:3] == ["threads", "threadpool", "threadpool-request"] and "go" in table.variants
    frame = table.frame()
    assert list(frame.columns) == ["variant", "model", *table.headers.values()]
    assert f"req/s at {CONNS} connections" in frame.columns


def test_a_missing_experiment_says_not_measured_and_names_its_command(run, table):
    for column in tradeoff_table.COLUMNS:
        if run.has(column.experiment):
            continue
        for variant in table.variants:
            cell = table.cell(variant, column.key)
            assert cell.status == tradeoff_table.NOT_MEASURED and cell.text.startswith("not measured")
            assert cell.value is None
        assert any(f"`conclab run {column.experiment}`" in note and table.headers[column.key] in note
                   for note in table.notes), column.experiment
    assert not any("conclab run throughput" in note for note in table.notes)


def test_a_model_the_experiment_did_not_measure_says_so(table):
    cell = table.cell("uvloop", "rps")          # throughput is in the run, uvloop is not in it
    assert cell.status == tradeoff_table.NOT_MEASURED and cell.value is None


def test_an_invalid_point_is_never_a_figure(table):
    for column in ("rps", "cpu"):
        cell = table.cell("go", column)
        assert cell.status == tradeoff_table.INVALID and cell.value is None
        assert cell.text == "invalid: load generator saturated"
        assert "310,000" not in cell.text
    for sentence in table.guide:
        assert "310,000" not in sentence.text and ("go", "rps") not in sentence.refs
    throughput = next(s for s in table.guide if "requests/s" in s.text)
    assert "invalid: go" in throughput.text          # said, with its reason in the cell, not ranked


def test_overlapping_intervals_are_a_tie(table):
    epoll, asyncio = table.cell("epoll", "rps"), table.cell("asyncio", "rps")
    assert derive.compare_medians(epoll.interval, asyncio.interval) == derive.TIE
    throughput = next(s for s in table.guide if "requests/s" in s.text)
    assert "asyncio 108,000 and epoll 110,000 req/s (a tie within noise)" in throughput.text


def test_separated_intervals_rank(tmp_path):
    path = write_run(tmp_path / "ranked", {"throughput": throughput_rows({"epoll": (100_000, 110_000, 120_000),
                                                                          "asyncio": (50_000, 51_000, 52_000)})})
    t = tradeoff_table.build(load_run(str(path)))
    throughput = next(s for s in t.guide if "requests/s" in s.text)
    most = throughput.text.split(";")[0]
    assert most.endswith("epoll 110,000 req/s") and "tie" not in most
    assert ("asyncio", "rps") not in throughput.refs


def test_the_guide_quotes_the_tables_figures(table):
    assert 2 <= len(table.guide) <= len(tradeoff_table.GUIDE)
    for sentence in table.guide:
        quoted = {num(table.cell(v, k).value) for v, k in sentence.refs}
        for variant, column in sentence.refs:
            assert table.cell(variant, column).usable
            assert f"{variant} {num(table.cell(variant, column).value)}" in sentence.text
        numbers = set(re.findall(r"\d[\d,]*(?:\.\d+)?", sentence.text.replace("p99", "")))
        counts = {num(len(table.variants)), num(CONNS)}
        assert numbers <= quoted | counts, sentence.text


def test_a_sentence_about_the_models_counts_all_of_them(table):
    memory = next(s for s in table.guide if s.text.startswith("For many idle connections"))
    assert f"of the {len(table.variants)} models" in memory.text
    assert "not measured: threadpool" in memory.text         # the models without a figure are named


def test_guide_sentences_without_inputs_are_left_out(table):
    texts = " ".join(s.text for s in table.guide)
    for absent in ("CPU-bound work beside short requests", "second CPU", "idle connections:",
                   "from one connection's work"):
        assert absent not in texts


def test_the_convoy_sentence_names_the_models_within_twice(tmp_path):
    rows = []
    for variant, (base, loaded) in {"gevent": (1000, 1500), "epoll": (1000, 9000)}.items():
        for repeat in ROUNDS:
            for cpu_conns, p99 in ((0, base), (2, loaded + 10 * repeat)):
                rows.append({**key("convoy", variant, repeat), "case": variant, "procs": 1, "n_server_cpus": 1,
                             "cpu_conns": cpu_conns, "cpu_us": 2000, "conns": 10, "rate": 1000, "p99_us": p99,
                             "p50_us": p99 / 2, "valid": 1, "conns_served": 10, "unanswered": 0})
    t = tradeoff_table.build(load_run(str(write_run(tmp_path / "convoy", {"convoy": rows}))))
    sentence = next(s for s in t.guide if "beside short requests" in s.text)
    assert "only gevent" in sentence.text and "epoll" not in sentence.text.split("(of the")[0]
    assert t.cell("gevent", "convoy").value == pytest.approx(1.52)          # rounds 1.51, 1.52, 1.53: the median


# -- files and the page --------------------------------------------------------------------------------

def test_tradeoff_csv_is_written_with_every_cell(table, tmp_path):
    path = Path(tradeoff_table.write_csv(table, str(tmp_path)))
    assert path.name == tradeoff_table.FILE
    written = pd.read_csv(path)
    assert list(written.variant) == table.variants
    epoll = written.set_index("variant").loc["epoll"]
    assert epoll["rps"] == table.cell("epoll", "rps").text
    assert epoll["rps_median"] == table.cell("epoll", "rps").value
    assert epoll["convoy_status"] == tradeoff_table.NOT_MEASURED


def test_the_report_shows_the_table_first(run):
    page = report.render(run, [], run.path)
    headings = re.findall(r'<h2 id="([^"]+)"', page)
    assert headings[0] == tradeoff_table.SECTION_ID
    section = page[page.index(f'<h2 id="{tradeoff_table.SECTION_ID}"'):page.index('<h2 id="trust"')]
    assert "<table>" in section and "the guide" in section
    assert table_text(tradeoff_table.build(run).cell("epoll", "rps").text) in section


def table_text(text: str) -> str:
    import html
    return html.escape(text)


def test_the_past_capacity_sentence_lists_the_earliest_knee_first():
    """Tied knees are listed by their value, whatever the table's order of the models."""
    knees = {"gevent": (0.9, 0.5, 0.9), "threads": (0.3, 0.3, 0.5), "go": (0.5, 0.5, 0.9), "epoll": (0.95, 0.95, 0.95)}
    cells = {v: {"past": tradeoff_table.Cell(f"knee at {value}×", value, lo, hi)} for v, (value, lo, hi) in knees.items()}
    table = tradeoff_table.Table(list(knees), cells, {}, [], [])
    text = tradeoff_table._past(table).text
    assert "for threads 0.3×, go 0.5× and gevent 0.9× (a tie within noise)" in text and "epoll" not in text.split("(of")[0]
