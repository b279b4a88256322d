"""benchmarks/full_vs_minimal.py's pure parts: target judging, the summary, the running order, the C client's output.

Unit tests only (no process, no timing): the benchmark itself is run by hand.
"""
from __future__ import annotations

import json

import pytest



def run(model, side, rps, cpu_us, kib):
    return {"model": model, "side": side, "throughput_rps": rps, "server_cpu_us_per_request": cpu_us,
            "kib_per_conn": kib}


# -- judging ------------------------------------------------------------------------------------------------

def test_judge_python_model_limits(bench):
    met = bench.judge("asyncio", 0.85, 1.2, 1.25 * 2.0 + 0.5, 2.0)
    assert [t["met"] for t in met.values()] == [True, True, True]
    missed = bench.judge("asyncio", 0.84, 1.21, 1.25 * 2.0 + 0.51, 2.0)
    assert [t["met"] for t in missed.values()] == [False, False, False]


def test_judge_go_needs_0_9_and_has_no_cpu_target(bench):
    assert bench.judge("go", 0.89, 5.0, 1.0, 1.0)["rps"]["met"] is False
    assert bench.judge("go", 0.9, 5.0, 1.0, 1.0)["rps"]["met"] is True
    assert bench.judge("go", 0.9, 5.0, 1.0, 1.0)["cpu"]["met"] is None


def test_verdict_words(bench):
    assert [bench.verdict({"met": m}) for m in (True, False, None)] == ["yes", "**no**", "n/a"]


# -- the summary ------------------------------------------------------------------------------------------

def test_summarize_ratios_within_rounds(bench):
    rounds = [[run("epoll", "full", 90, 11, 1.0), run("epoll", "bare", 100, 10, 0.5)],
              [run("epoll", "bare", 50, 10, 0.5), run("epoll", "full", 40, 12, 1.0)],
              [run("epoll", "full", 95, 10, 1.2), run("epoll", "bare", 100, 10, 0.7)]]
    (row,) = bench.summarize(rounds, ["epoll"])
    assert row["rounds"] == 3
    assert row["rps_ratio"] == {"median": 0.9, "min": 0.8, "max": 0.95}      # paired, not median / median
    assert row["cpu_ratio"]["median"] == pytest.approx(1.1)
    assert row["throughput_rps_full"] == 90 and row["throughput_rps_bare"] == 100
    assert row["kib_per_conn_full"] == 1.0 and row["kib_per_conn_bare"] == 0.5
    assert row["targets"]["rps"]["met"] is True and row["targets"]["cpu"]["met"] is True
    assert row["targets"]["memory"]["met"] is True                             # 1.0 <= 1.25 x 0.5 + 0.5


def test_summarize_skips_incomplete_rounds_and_absent_models(bench):
    rounds = [[run("go", "full", 90, 1, 8), run("go", "bare", 100, 1, 8)], [run("go", "full", 10, 1, 8)]]
    rows = bench.summarize(rounds, ["go", "threads"])
    assert [r["model"] for r in rows] == ["go"] and rows[0]["rounds"] == 1


def test_format_table_is_markdown_with_a_row_per_model(bench):
    rounds = [[run("go", "full", 85, 2, 8), run("go", "bare", 100, 1, 8)]]
    table = bench.format_table(bench.summarize(rounds, ["go"]))
    header, rule, row = table.splitlines()
    assert header.count("|") == rule.count("|") == row.count("|")
    assert "| go |" in row and "0.85x" in row and "**no**" in row and "n/a" in row


# -- the running order --------------------------------------------------------------------------------------

def test_round_order_runs_everyone_once_and_flips_twins(bench):
    entries = [("a", "full"), ("a", "bare"), ("b", "full"), ("b", "bare")]
    orders = [bench.round_order(entries, n) for n in range(4)]
    assert all(sorted(order) == sorted(entries) for order in orders)
    assert len({tuple(order) for order in orders}) == 4
    first = [order.index(("a", "full")) < order.index(("a", "bare")) for order in orders]
    assert True in first and False in first


# -- the C client's output and what is made of it -------------------------------------------------------

def test_parse_client_output_takes_the_last_json_line(bench):
    line = json.dumps({"requests": 10, "total_requests": 12, "throughput_rps": 5.0, "errors": 0})
    assert bench.parse_client_output(f"noise\n{line}\n\n")["total_requests"] == 12


@pytest.mark.parametrize("stdout, words", [("", "nothing"), ("not json\n", "no JSON"),
                                           ('{"requests": 1}\n', "lacks total_requests")])
def test_parse_client_output_errors_say_what_is_wrong(bench, stdout, words):
    with pytest.raises(ValueError, match=words):
        bench.parse_client_output(stdout)


def test_load_figures_divides_cpu_by_every_reply(bench):
    figures = bench.load_figures({"requests": 800, "total_requests": 1000, "throughput_rps": 400.0, "errors": 0}, 0.02)
    assert figures["server_cpu_us_per_request"] == 20.0 and figures["throughput_rps"] == 400.0


def test_kib_per_conn(bench):
    assert bench.kib_per_conn(1_000_000, 1_000_000 + 5000 * 2048, 5000) == 2.0


def test_echo_frame(bench):
    assert bench.echo_frame(3) == b"\x00\x00\x00\x04\x01\x00\x00\x00"


# -- the command line ------------------------------------------------------------------------------------

def test_parse_models_keeps_the_table_order_and_names_unknown_ones(bench):
    assert [m.name for m in bench.parse_models("go,epoll")] == ["epoll", "go"]
    assert len(bench.parse_models(None)) == len(bench.MODELS)
    with pytest.raises(ValueError, match="unknown model nope"):
        bench.parse_models("epoll,nope")


def test_help_is_complete(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--models", "--rounds", "--duration", "--warmup", "--conns", "--held", "--quick", "--out"):
        assert option in out
