"""The report layer (analysis/): loading a run, charts, findings, claims, targets, --compare, the CLI.

Built from tests/fixtures/run-tiny: a real ``conclab run all --profile tiny``
of every backend (raw/ left out), copied to a temporary directory per test
module so nothing is written into the repository. Variants of it (an
experiment missing, a saturated point, a skipped backend, doubled
throughput) are made here by editing the copy's CSVs.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

from conclab import cli as conclab_cli
from conclab import demo
from conclab.analysis import claims, cli, compare, derive, report
from conclab.analysis.claims import MEMORY_TARGETS_KIB, THROUGHPUT_TARGETS, targets
from conclab.analysis.fmt import num
from conclab.analysis.results import load_run, read_table
from conclab.experiments import registry
from conclab.experiments.harness.tables import COLUMNS

FIXTURE = Path(__file__).parent / "fixtures" / "run-tiny"
MIN_PIXEL_STD = 0.02          # a blank (one-colour) image has 0
MIN_INK_FRACTION = 0.01       # at least 1% of the pixels are not background
MAX_REPORT_FILE_BYTES = 1_000_000


def copy_run(tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(FIXTURE, target)
    return target


def edit_csv(run_dir: Path, table: str, change) -> None:
    path = run_dir / f"{table}.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    change(frame)
    frame.to_csv(path, index=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The fixture run and its report, built once: (run, report path, chart results)."""
    run_dir = copy_run(tmp_path_factory.mktemp("report"))
    run = load_run(str(run_dir))
    path, results = report.write(run)
    return run, Path(path), results


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith(("http:", "https:", "#", "mailto:")):
                self.refs.append(value)


def page_text(path: Path) -> str:
    """The page's visible text, entities decoded, whitespace collapsed."""
    import html
    raw = re.sub(r"<style>.*?</style>", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", raw)))


# -- loading --------------------------------------------------------------------------------------

def test_fixture_follows_the_contract():
    for table, columns in COLUMNS.items():
        path = FIXTURE / f"{table}.csv"
        assert path.exists(), f"fixture lacks {table}.csv: regenerate it (see tests/fixtures/README.md)"
        assert list(pd.read_csv(path, nrows=0).columns) == list(columns), f"{table}.csv is stale"


def test_load_run_reads_every_table_and_fills_missing_ones(tmp_path):
    run = load_run(str(FIXTURE))
    assert set(run.tables) == set(COLUMNS)
    assert run.has("throughput") and run.manifest["status"] == "complete"
    run_dir = copy_run(tmp_path)
    (run_dir / "c10k.csv").unlink()
    frame = read_table(str(run_dir), "c10k")
    assert frame.empty and list(frame.columns) == list(COLUMNS["c10k"])
    assert not load_run(str(run_dir)).has("c10k")


def test_load_run_by_id_and_latest(tmp_path):
    copy_run(tmp_path, "20000101-000000-all")
    assert Path(load_run("20000101-000000-all", str(tmp_path)).path).name == "20000101-000000-all"
    assert Path(load_run("latest", str(tmp_path)).path).name == "20000101-000000-all"


# -- charts and page ------------------------------------------------------------------------------

def test_every_chart_is_written_and_not_blank(built):
    _run, path, results = built
    drawn = [r for r in results if r.files]
    assert {r.name for r in drawn} == {spec.name for spec in report.CHARTS}, "the fixture has data for every chart"
    for result in drawn:
        svg = (path.parent / result.files["svg"]).read_text(encoding="utf-8")
        assert "<svg" in svg and svg.rstrip().endswith("</svg>")
        pixels = matplotlib.image.imread(path.parent / result.files["png"])[..., :3]
        assert pixels.std() > MIN_PIXEL_STD, f"{result.name}.png is blank"
        assert (pixels.mean(axis=2) < 0.95).mean() > MIN_INK_FRACTION, f"{result.name}.png is nearly empty"


def test_html_references_only_files_that_exist(built):
    _, path, _ = built
    links = Links()
    links.feed(path.read_text(encoding="utf-8"))
    assert any(r.endswith(".png") for r in links.refs)
    for ref in links.refs:
        assert (path.parent / ref).exists(), f"report.html links to missing {ref}"


def test_report_directory_is_small(built):
    _, path, _ = built
    for file in path.parent.rglob("*"):
        if file.is_file():
            assert file.stat().st_size < MAX_REPORT_FILE_BYTES, f"{file} is too big for the repository"


def test_page_has_summary_machine_claims_targets_and_every_finding(built):
    run, path, results = built
    text = page_text(path)
    for heading in ("Summary", "Machine", "Claims vs measured", "Targets", *registry.names()):
        assert heading in text
    assert run.manifest["host"]["cpu_model"] in text
    for result in results:
        assert re.sub(r"\s+", " ", result.finding.text) in text


def test_the_trade_off_table_comes_first_and_is_written_beside_the_page(built):
    from conclab.analysis import tradeoff_table
    run, path, _ = built
    page = path.read_text(encoding="utf-8")
    assert re.findall(r'<h2 id="([^"]+)"', page)[0] == tradeoff_table.SECTION_ID
    written = pd.read_csv(path.parent / tradeoff_table.FILE)
    assert list(written.variant) == tradeoff_table.build(run).variants


def test_numbers_are_printed_for_people():
    assert [num(v) for v in (50.0, 12345.6, 0.5, 2.50, 0.0123, None)] == ["50", "12,346", "0.5", "2.5", "0.0123", "–"]


# -- findings agree with the tables ------------------------------------------------------------------

def test_every_number_of_a_finding_is_one_of_its_facts(built):
    _, _, results = built
    for result in results:
        shown = re.findall(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?", result.finding.text)   # not p99's 99
        allowed = {num(v) for v in result.finding.numbers.values()}
        for token in shown:
            assert token in allowed, f"{result.name}: {token} in {result.finding.text!r} is not one of its facts"


def facts(results, name):
    return next(r.finding.facts for r in results if r.name == name)


def test_throughput_finding_matches_the_csv(built):
    run, _, results = built
    t = pd.read_csv(FIXTURE / "throughput.csv")
    ref = t[t.conns == run.profile["reference_conns"]].groupby("variant").throughput_rps.median()
    f = facts(results, "throughput")
    assert (f["hi"], f["hi_rps"]) == (ref.idxmax(), pytest.approx(ref.max()))
    assert (f["lo"], f["lo_rps"]) == (ref.idxmin(), pytest.approx(ref.min()))
    assert f["times"] == pytest.approx(ref.max() / ref.min())


def test_memory_finding_matches_the_fit(built):
    _, _, results = built
    fit = pd.read_csv(FIXTURE / "memory_fit.csv")
    rss = fit[fit.metric == "rss_kib"].groupby("variant").per_conn.median()
    f = facts(results, "memory_per_conn")
    assert (f["hi"], f["hi_kib"]) == (rss.idxmax(), pytest.approx(rss.max()))
    assert (f["lo"], f["lo_kib"]) == (rss.idxmin(), pytest.approx(rss.min()))
    threads = fit[(fit.variant == "threads")].set_index("metric").per_conn
    v = facts(results, "memory_thread_vms")
    assert v["vms_mib"] == pytest.approx(threads["vms_kib"] / 1024)
    assert v["rss_kib"] == pytest.approx(threads["rss_kib"])


def test_io_bound_finding_uses_the_pool_ceiling(built):
    _, _, results = built
    io = pd.read_csv(FIXTURE / "io_bound.csv")
    pool = io[io.variant.str.startswith("threadpool")]
    f = facts(results, "io_bound")
    assert f["ceiling"] == pytest.approx(pool.workers.iloc[0] / (pool.io_us.iloc[0] / 1e6))
    assert f["pool_rps"] == pytest.approx(pool.groupby(["variant", "conns"]).throughput_rps.median().max())
    top = io[io.conns == io.conns.max()].groupby("variant").throughput_rps.median()
    assert (f["top"], f["top_rps"]) == (top.idxmax(), pytest.approx(top.max()))


def test_switch_and_c10k_findings_match_the_csv(built):
    _, _, results = built
    s = pd.read_csv(FIXTURE / "switch.csv")
    thread = s[s.variant == "thread-pinned"].ns_per_switch.median()
    assert facts(results, "switch")["thread_ns"] == pytest.approx(thread)
    c = pd.read_csv(FIXTURE / "c10k.csv")
    served = c[(c.held >= c.hold_target) & (c.connect_errors == 0) & (c.requests > 0) & (c.errors == 0)]
    f = facts(results, "c10k")
    assert (f["k"], f["n"], f["target"]) == (len(served), len(c), c.hold_target.max())


def test_targets_are_judged_from_targets_csv(built):
    run, _, _ = built
    t = pd.read_csv(FIXTURE / "targets.csv")
    table = targets(run)
    for row in table.itertuples():
        goals = THROUGHPUT_TARGETS if row.target == "throughput_ratio_to_go" else MEMORY_TARGETS_KIB
        source = t[(t.target == row.target) & (t.variant == row.variant)]
        if source.empty or source.value.isna().all():
            assert row.status == "not measured"
            continue
        value = source.value.iloc[0]
        assert row.value == pytest.approx(value)
        met = value >= goals[row.variant] if row.target == "throughput_ratio_to_go" else value <= goals[row.variant]
        assert row.status == ("met" if met else "missed")


# -- degraded runs ----------------------------------------------------------------------------------

KEPT_IN_DEGRADED = ("throughput", "switch")


def keep_only(run_dir: Path, experiments) -> None:
    """Make the copy a run of only these experiments: other tables gone, the manifest says so."""
    for name in set(registry.names()) - set(experiments):
        for table in registry.tables()[name]:
            (run_dir / f"{table}.csv").unlink()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["experiments"] = manifest["parameters"]["experiments"] = list(experiments)
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def degraded(tmp_path_factory):
    """Through the CLI: a run of only throughput and switch, one saturated point, one skipped backend."""
    run_dir = copy_run(tmp_path_factory.mktemp("degraded"))
    keep_only(run_dir, KEPT_IN_DEGRADED)

    def saturate(frame):
        frame.loc[0, "loadgen_saturated"] = "1"

    def skip(frame):
        frame.loc[len(frame)] = {"run_id": "x", "experiment": "throughput", "backend": "go", "variant": "go",
                                 "point": "", "reason": "pretend: no Go toolchain on PATH"}
    edit_csv(run_dir, "throughput", saturate)
    edit_csv(run_dir, "skipped", skip)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = cli.main([str(run_dir)])
    return load_run(str(run_dir)), status, printed.getvalue()


def test_cli_report_prints_the_path(degraded):
    run, status, printed = degraded
    assert status == 0
    assert printed.strip().splitlines()[-1] == str(Path(run.path) / "report.html")


def test_cli_report_rejects_unknown_runs(tmp_path, capsys):
    assert cli.main(["no-such-run", "--results", str(tmp_path)]) == 2
    assert "no-such-run" in capsys.readouterr().err
    assert cli.main(["--compare", "a", "b", "c"]) == 2


def test_missing_experiments_are_reported_not_fatal(degraded):
    run, _, _ = degraded
    text = page_text(Path(run.path) / "report.html")
    for name in set(registry.names()) - set(KEPT_IN_DEGRADED):
        assert f"No data: {name} was not part of this run" in text
    assert "c10k was not measured in this run" in text          # the claims table says so too
    charts = {p.stem for p in (Path(run.path) / "charts").glob("*.png")}
    assert charts == {s.name for s in report.CHARTS if s.experiment in KEPT_IN_DEGRADED}


def test_saturation_and_skips_are_warned(degraded):
    run, _, _ = degraded
    text = page_text(Path(run.path) / "report.html")
    t = run.tables["throughput"]
    first = t.iloc[0]
    assert f"throughput: the load generator was saturated at 1 point(s) ({first.variant}@conns={num(first.conns)})" \
        in text
    assert "throughput: go skipped: pretend: no Go toolchain on PATH" in text


# -- compare --------------------------------------------------------------------------------------

def test_compare_computes_ratios(tmp_path):
    a_dir, b_dir = copy_run(tmp_path, "before"), copy_run(tmp_path, "after")
    edit_csv(b_dir, "throughput", lambda f: f.__setitem__("throughput_rps",
                                                          pd.to_numeric(f.throughput_rps) * 2))
    edit_csv(b_dir, "memory_fit", lambda f: f.__setitem__("per_conn", pd.to_numeric(f.per_conn) / 4))
    a, b = load_run(str(a_dir)), load_run(str(b_dir))
    table = compare.compare(a, b)
    tput = table[table.key == "throughput"]
    assert len(tput) == len(derive.valid(derive.at_reference(a))) and (tput.ratio.round(9) == 2).all()
    assert set(tput.change) == {"better in B"}
    rss = table[(table.key == "rss_per_conn") & (table.value_a > 0)]
    assert (rss.ratio.round(9) == 0.25).all() and set(rss.change) == {"better in B"}
    same = table[table.key == "switch"]
    assert (same.ratio == 1).all() and set(same.change) == {"same (within noise)"}
    path = Path(compare.build(a, b, str(tmp_path / "cmp")))
    links = Links()
    links.feed(path.read_text(encoding="utf-8"))
    assert links.refs and all((path.parent / r).exists() for r in links.refs)
    assert f"{num(2)}×" in path.read_text(encoding="utf-8")


# -- command line ---------------------------------------------------------------------------------

def test_the_conclab_parser_gives_report_and_demo():
    parser = conclab_cli.build_parser()
    for command in ("report", "demo"):
        args = parser.parse_args([command])
        assert callable(args.run)
    assert parser.parse_args(["report", "--compare", "a", "b"]).compare == ["a", "b"]


@pytest.mark.live
def test_demo_runs_the_harness_then_prints_the_report_path_last(tmp_path, capsys, monkeypatch):
    """The harness is replaced by a stand-in that 'measures' by printing a prepared run (the real one takes minutes)."""
    run_dir = copy_run(tmp_path / "results", "demo-run")
    keep_only(run_dir, ("switch",))
    fake = tmp_path / "fake_harness.py"
    fake.write_text(f"import sys\nprint('[   0.0s] measuring...', file=sys.stderr)\nprint({str(run_dir)!r})\n")
    monkeypatch.setattr(demo, "harness_command", lambda args: [sys.executable, str(fake)])
    assert conclab_cli.main(["demo", "--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == str(tmp_path / "results" / "demo-run" / "report.html")
    assert "conclab demo: 2/2" in out.err
    assert (tmp_path / "results" / "demo-run" / "report.html").exists()


# -- invalid points -------------------------------------------------------------------------------

POOL = "threadpool"
FAST_RPS = 999_999.0          # faster than anything measured: it would be every headline if it were used


@pytest.fixture(scope="module")
def invalid_pool(tmp_path_factory):
    """The fixture with the connection-dispatch pool's load points invalid (as the harness marks them when it
    serves only its workers' connections) and its numbers made the best of the run; the report's page and
    findings on it (every chart's finding, no chart drawn: ``built`` draws them)."""
    run_dir = copy_run(tmp_path_factory.mktemp("invalid"))

    def spoil(frame):
        pool = frame.variant == POOL
        conns = pd.to_numeric(frame.loc[pool, "conns"])
        frame.loc[pool, "throughput_rps"] = str(FAST_RPS)
        frame.loc[pool, "p99_us"] = "1"
        frame.loc[pool, "conns_served"] = "2"
        frame.loc[pool, "unanswered"] = (conns - 2).astype(int).astype(str)
        frame.loc[pool, "max_unanswered_wait_us"] = "300000"
        frame.loc[pool, "valid"] = "0"
        frame.loc[pool, "invalid_reason"] = [f"served 2 of {c} connections; {c - 2} requests unanswered"
                                             for c in conns.astype(int)]
        frame.loc[~pool, "conns_served"] = frame.loc[~pool, "conns"]
        frame.loc[~pool, ["unanswered", "valid"]] = ["0", "1"]
    for table in ("throughput", "latency", "io_bound", "cpu_bound"):
        edit_csv(run_dir, table, spoil)
    run = load_run(str(run_dir))
    # Findings as drawn charts have them (the summary lists a chart's finding only once it is drawn); the
    # files named are not made: drawing is the `built` fixture's test, and the check here is the numbers.
    results = [report.ChartResult(spec.name, spec.experiment, spec.make(run)[0], {"png": f"charts/{spec.name}.png",
                                                                                  "svg": f"charts/{spec.name}.svg"})
               for spec in report.CHARTS]
    path = run_dir / report.REPORT_FILE
    path.write_text(report.render(run, results, str(run_dir)), encoding="utf-8")
    return run, path, results


def test_an_invalid_point_is_never_a_headline_or_a_ranking(invalid_pool):
    run, _, results = invalid_pool
    f = facts(results, "throughput")
    assert POOL not in (f["hi"], f["lo"]) and f["hi_rps"] < FAST_RPS
    assert f[f"invalid.{POOL}.served"] == 2 and f[f"invalid.{POOL}.conns"] == 4       # said why it was left out
    io = facts(results, "io_bound")
    assert io["v"] != POOL and io["pool_rps"] < FAST_RPS and io["top"] != POOL
    assert POOL not in derive.valid(derive.at_reference(run)).variant.tolist()
    ref = derive.at_reference(run)
    assert not ref[ref.variant == POOL].valid.iloc[0]                                 # flagged, not dropped
    assert ref[ref.variant == POOL].invalid_reason.iloc[0] == "served 2 of 4 connections; 2 requests unanswered"
    headline = compare.headline(run)
    assert headline[(headline.variant == POOL) & headline.key.isin(["throughput", "io_bound", "knee"])].empty
    cpu = facts(results, "cpu_bound")
    assert FAST_RPS not in cpu.values()


def test_an_invalid_point_makes_no_knee(invalid_pool):
    run, _, results = invalid_pool
    knees = derive.knees(run).set_index("variant")
    assert knees.loc[POOL, "where"] == "no valid point" and pd.isna(knees.loc[POOL, "knee"])
    assert POOL not in set(derive.spectrum(run)[1].variant)
    f = facts(results, "latency_load")
    assert POOL not in {f.get("hi"), f.get("lo"), f.get("v")}
    assert f[f"invalid.{POOL}.k"] == 2


def test_an_invalid_point_meets_no_target_and_is_flagged_on_the_page(invalid_pool):
    run, path, _ = invalid_pool
    table = targets(run)
    pool = table[(table.target == "throughput_ratio_to_go") & (table.variant == POOL)].iloc[0]
    assert pool.status == "not measured" and "invalid" in pool.detail
    text = page_text(path)
    assert "Invalid points, left out of the findings" in text
    assert f"{num(FAST_RPS)} ✗" in text
    assert f"throughput: 1 invalid point(s), marked ✗ in the tables and left out of the findings ({POOL}@conns=4: " \
           "served 2 of 4 connections; 2 requests unanswered)" in text
    claim = next(c for c in claims.claims(run) if c.claim.startswith("A thread pool caps"))
    assert f"{POOL} served only 2 of 8 connections" in claim.measured


def test_charts_draw_invalid_points_hollow(invalid_pool):
    from conclab.analysis import charts
    run, _, _ = invalid_pool
    t = derive.throughput(run)
    fig = charts.draw_throughput(t, report.findings.throughput(derive.at_reference(run), 4), 4)
    hollow = [line for line in fig.axes[0].get_lines() if line.get_markerfacecolor() == "none"
              and len(line.get_xdata())]
    assert len(hollow) == 1 and list(hollow[0].get_ydata()) == [FAST_RPS]


# -- ranking honesty: ranked only where the intervals separate ----------------------------------------

def synthetic_throughput(tmp_path: Path, values: dict, name: str = "synthetic") -> Path:
    """A run of throughput only: per variant one row per round (its values, in rounds 1, 2, 3) at the reference
    point, every row valid, the rest of each row from the fixture."""
    run_dir = copy_run(tmp_path, name)
    keep_only(run_dir, ("throughput",))

    def rewrite(frame):
        template = frame[frame.variant == "go"].iloc[0]
        rows = []
        for variant, rounds in values.items():
            for repeat, rps in enumerate(rounds, 1):
                row = template.copy()
                row[["backend", "variant", "repeat", "throughput_rps", "cpu_us_per_req", "valid", "conns_served",
                     "unanswered", "loadgen_saturated"]] = [variant, variant, str(repeat), str(rps),
                                                            str(1e6 / rps), "1", row["conns"], "0", "0"]
                rows.append(row)
        frame.drop(frame.index, inplace=True)
        for i, row in enumerate(rows):
            frame.loc[i] = row
    edit_csv(run_dir, "throughput", rewrite)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["parameters"]["repeat"] = 3
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return run_dir


def throughput_finding(run_dir: Path):
    from conclab.analysis import findings
    run = load_run(str(run_dir))
    return findings.throughput(derive.at_reference(run), derive.reference_conns(run))


def test_overlapping_intervals_are_a_tie_and_separated_ones_rank(tmp_path):
    overlap = throughput_finding(synthetic_throughput(tmp_path, {"epoll": [20_000, 30_000, 24_000],
                                                                 "asyncio": [22_000, 27_000, 33_000]}, "overlap"))
    assert "tie within noise" in overlap.title and "tie within noise" in overlap.text
    for word in ("fastest", "slowest", "×"):
        assert word not in overlap.title and word not in overlap.text, word
    apart = throughput_finding(synthetic_throughput(tmp_path, {"epoll": [20_000, 21_000, 22_000],
                                                               "asyncio": [30_000, 31_000, 29_000]}, "apart"))
    assert "tie" not in apart.title and "asyncio is fastest" in apart.title and "epoll slowest" in apart.title
    assert apart.facts["times"] == pytest.approx(30_000 / 21_000)
    assert (apart.facts["hi_rps_min"], apart.facts["hi_rps_max"]) == (29_000, 31_000)       # the spread is shown
    assert apart.facts["hi_cpu"] == pytest.approx(1e6 / 30_000)                             # and what a request cost
    for finding in (overlap, apart):                     # the spreads are facts too: every number shown is one
        allowed = {num(v) for v in finding.numbers.values()}
        assert set(re.findall(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?", finding.text)) <= allowed, finding.text


def test_compare_medians_is_the_one_rule():
    row = {"throughput_rps": 10.0, "throughput_rps_lo": 9.0, "throughput_rps_hi": 11.0}
    assert derive.compare_medians(row, {"throughput_rps": 12.0, "throughput_rps_lo": 11.5,
                                        "throughput_rps_hi": 13.0}, "throughput_rps") == "lower"
    assert derive.compare_medians(row, {"throughput_rps": 12.0, "throughput_rps_min": 10.5,
                                        "throughput_rps_max": 13.0}, "throughput_rps") == "tie"
    assert derive.compare_medians(row, 8.0, "throughput_rps") == "higher"
    assert derive.compare_medians({"ns_per_switch": 5.0, "ns_min": 4.0, "ns_max": 6.0},
                                  {"ns_per_switch": 9.0, "ns_min": 5.5, "ns_max": 9.5}, "ns_per_switch") == "tie"


# -- the summary: valid points only, and "all" means all ---------------------------------------------

SUPERLATIVES = re.compile(r"\b(fastest|slowest|most|least|every|all|each)\b", re.IGNORECASE)


def test_every_summary_number_is_from_valid_points_and_all_means_all(invalid_pool):
    run, path, results = invalid_pool
    items = report.summary(run, results, claims.claims(run), targets(run))
    by_name = {r.name: r for r in results}
    pool = re.compile(rf"\b{POOL}\b(?!-)")
    for name in ("throughput", "latency_load", "io_bound"):      # the experiments where the pool is invalid
        finding = by_name[name].finding
        assert FAST_RPS not in finding.numbers.values() and num(FAST_RPS) not in finding.title
        title = finding.title + "."
        assert title in items
        if SUPERLATIVES.search(finding.title):
            assert pool.search(finding.title) and "left out" in finding.title, finding.title
    text = " ".join(items)
    assert num(FAST_RPS) not in text
    # the headline tables: summary.csv medians and targets.csv come from valid rows only
    def row(variant, rps, valid, reason=""):
        return {"backend": variant, "variant": variant, "repeat": 1, "conns": 50, "throughput_rps": rps,
                "cpu_us_per_req": 10.0, "valid": int(valid), "invalid_reason": reason, "loadgen_saturated": 0}
    rows = [row("go", 40_000.0, True), row("epoll", 35_000.0, True),
            row(POOL, FAST_RPS, False, "served 6 of 50 connections"),
            dict(row("uvloop", FAST_RPS, False, "load generator saturated"), loadgen_saturated=1)]
    from conclab.experiments.harness import summary as harness_summary
    summ = harness_summary.summarize({"throughput": rows})
    assert all(r["median"] != FAST_RPS and r["max"] != FAST_RPS for r in summ)
    assert {r["variant"] for r in summ if r["metric"] != "valid"} == {"go", "epoll"}
    ratios = {t["variant"]: t["value"] for t in harness_summary.targets(summ, 50, [])}
    assert ratios[POOL] is None and ratios["uvloop"] is None and ratios["epoll"] == pytest.approx(35 / 40)


def test_page_has_a_reliability_section_that_says_what_the_run_lacks(built):
    """run-tiny has no conclab check files: the section is there and says so for each (tests/test_soak.py
    draws it from a run directory that has them)."""
    _run, path, _results = built
    text = page_text(path)
    assert '<h2 id="reliability">' in path.read_text(encoding="utf-8")
    for sentence in ("No scenario table: this run has no check.csv", "No soak: this run has no soak.csv",
                     "No overload table: this run has no overload.csv"):
        assert sentence in text
