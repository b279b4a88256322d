"""The teaching notebooks (notebooks/NN_*.py, jupytext percent format) run top to bottom without an error.

Each notebook is converted with jupytext and executed by nbclient in a fresh
python3 kernel (MPLBACKEND=Agg) against the committed results/reference run;
a last cell, added here, lists the modules the notebook imported, and none may
be a server backend (or the hooks they share), gevent, greenlet, locust or
uvloop: the notebooks read results, and their one predict-then-run exercise
runs ``conclab run`` in a subprocess. Here the exercises run sized down
(CONCLAB_NOTEBOOK_PROFILE=tiny) into a temporary directory
(CONCLAB_NOTEBOOK_RESULTS), and each answer cell must reach the comparison
with a measured run; results/ must not change. The same notebooks also run
against runs derived from the reference, with the exercises off
(CONCLAB_NOTEBOOK_PROFILE=off: their answer cells say so): one without go (as
when Go is not installed) and with a ``pitfalls.csv`` (the table the pitfalls
experiment will write), and one with two backends and some experiments
missing, so the branches a future run can take are executed. The kernels run a
few at a time.

The comparison itself (notebooks/common.py: ``check``, ``measured_order``,
``ratio``, ``nearest_rate``) is unit-tested below on hand-made quantities.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import jupytext
import nbclient
import nbformat
import pandas as pd
import pytest

from conclab.servers import BACKENDS

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
REFERENCE = ROOT / "results" / "reference"
FIXTURE = ROOT / "tests" / "fixtures" / "run-tiny"    # a tiny run with the tables the reference may lack
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
# What a notebook must never import: the server backends (and the hooks they share), gevent, locust, uvloop.
BACKEND_MODULES = sorted({"conclab.servers." + b.entry.split(":")[0] for b in BACKENDS.values()} | {"conclab.servers.base"})
FORBIDDEN_PACKAGES = ("gevent", "greenlet", "locust", "uvloop")
CELL_TIMEOUT_S = 120               # an exercise's run is stopped at 60 s (common.TIME_LIMIT_S), then drains
EXERCISE_PROFILE = "tiny"          # what the exercises run at here (seconds each)
ANSWERED = "no prediction written"   # what an answer cell says once it compared with a measured run
NOT_RUN = "not run: CONCLAB_NOTEBOOK_PROFILE=off"
PARALLEL = 3                       # kernels at once (2 CPUs: kernels spend much of their life waiting)
MODULES_MARK = "conclab-modules:"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
CHECK_CELL = (f"import sys, json\nprint({MODULES_MARK!r}, json.dumps(sorted("
              f"{{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN_PACKAGES!r}) "
              f"| set(sys.modules) & set({BACKEND_MODULES!r}))))")


# -- runs derived from the reference ----------------------------------------------------------------

def derive_run(dest: Path, keep=None, drop_tables=(), pitfalls: bool = False, borrow=()) -> Path:
    """A copy of the reference run with only the variants in `keep`, without `drop_tables`, maybe a pitfalls.csv,
    with the tables in `borrow` taken from the tiny fixture run where the reference has none."""
    shutil.copytree(REFERENCE, dest)
    for table in borrow:
        if not (dest / f"{table}.csv").exists():
            shutil.copy(FIXTURE / f"{table}.csv", dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for table in drop_tables:                               # as if the experiment had not been run
        (dest / f"{table}.csv").unlink(missing_ok=True)
    samples = pd.read_csv(dest / "samples.csv", dtype=str, keep_default_na=False)
    samples[~samples["experiment"].isin(drop_tables)].to_csv(dest / "samples.csv", index=False)
    if keep is not None:
        for csv in dest.glob("*.csv"):
            frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
            if "variant" in frame and csv.name != "skipped.csv":
                micro = frame["backend"] == "micro" if "backend" in frame else False
                frame[frame["variant"].isin(keep) | micro].to_csv(csv, index=False)
        dropped = [v for v in manifest.get("variants", []) if v["name"] not in keep]
        manifest["variants"] = [v for v in manifest.get("variants", []) if v["name"] in keep]
        skipped = pd.read_csv(dest / "skipped.csv", dtype=str, keep_default_na=False)
        rows = [{"run_id": manifest.get("run_id", ""), "experiment": "all", "backend": v.get("backend", v["name"]),
                 "variant": v["name"], "point": "", "reason": "removed for the notebook tests"} for v in dropped]
        pd.concat([skipped, pd.DataFrame(rows, columns=skipped.columns)]).to_csv(dest / "skipped.csv", index=False)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    if pitfalls:
        write_pitfalls(dest / "pitfalls.csv", manifest.get("run_id", "test"))
    return dest


def write_pitfalls(path: Path, run_id: str) -> None:
    """A pitfalls table in the announced shape: broken vs fixed time series per pitfall and backend."""
    rows = []
    for variant, backend in (("threads", "threads"), ("asyncio", "asyncio")):
        for pitfall in ("leak", "no-deadline", "unbounded", "hard-kill"):
            for fixed in (False, True):
                for step in range(6):
                    grows = 0 if fixed else step
                    rows.append({"run_id": run_id, "backend": backend, "variant": variant, "pitfall": pitfall,
                                 "fixed": fixed, "t_s": step * 0.5, "fds": 5 + (10 * grows if pitfall == "leak" else 0),
                                 "close_wait": 10 * grows if pitfall == "leak" else 0, "rss_kib": 30000 + 500 * grows,
                                 "threads": 1 + (20 * grows if pitfall == "unbounded" else 0), "served": 100 * step,
                                 "starved": 3 * grows if pitfall == "no-deadline" else 0,
                                 "replies_lost": (1 if not fixed and step == 5 else 0) if pitfall == "hard-kill"
                                 else 0})
    pd.DataFrame(rows).to_csv(path, index=False)


# -- execution ---------------------------------------------------------------------------------------

def script_of(notebook: Path, directory: Path) -> Path:
    """The notebook's code cells, top to bottom, as one script in directory (tracebacks show its lines)."""
    script = directory / notebook.name
    script.write_text("\n\n".join(c.source for c in jupytext.read(notebook).cells if c.cell_type == "code"))
    return script


def case_cell(script: Path, run_dir: Path) -> str:
    """A cell that runs a whole notebook's code, in a namespace of its own, against another run, exercises off."""
    return (f"import os, runpy\nos.environ['CONCLAB_RUN'] = {str(run_dir)!r}\n"
            "os.environ['CONCLAB_NOTEBOOK_PROFILE'] = 'off'\ntry:\n"
            f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
            "finally:\n" + "\n".join("    " + line for line in CHECK_CELL.splitlines()))


def modules_of(cell) -> list | None:
    """The forbidden modules a check printed in this cell's output (None: no check ran)."""
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream" and MODULES_MARK in output.text:
            return json.loads(output.text.split(MODULES_MARK, 1)[1].splitlines()[0])
    return None


def text_of(cells) -> str:
    """Everything the cells printed or displayed as text (the answers, the exercise's notes)."""
    out = []
    for cell in cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                out.append(output.text)
            elif "data" in output:
                out.append(output["data"].get("text/markdown", "") or output["data"].get("text/plain", ""))
    return "\n".join(out)


async def execute(nb, name: str, exercises: Path):
    """Run a notebook (the check cell appended) in a fresh kernel with every error kept in its cell, its
    exercise at the tiny profile into ``exercises``; return the notebook as executed and the forbidden modules
    its kernel had imported by the end."""
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, allow_errors=True,
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    env = {**os.environ, "MPLBACKEND": "Agg", "CONCLAB_RUN": str(REFERENCE), "PYDEVD_DISABLE_FILE_VALIDATION": "1",
           "CONCLAB_NOTEBOOK_PROFILE": EXERCISE_PROFILE, "CONCLAB_NOTEBOOK_RESULTS": str(exercises)}
    await client.async_execute(env=env)
    modules = modules_of(nb.cells[-1])
    if modules is None:
        raise AssertionError(f"{name}: the module check printed nothing")
    return nb, modules


def errors_of(cell) -> list:
    return [ANSI.sub("", f"{o.ename}: {o.evalue}\n" + "\n".join(o.traceback)) for o in cell.get("outputs", [])
            if o.get("output_type") == "error"]


async def run_reference(notebook: Path, exercises: Path) -> dict:
    """The notebook as a reader runs it: its own kernel, the committed run. {stem: (errors, modules, text)}."""
    nb, modules = await execute(jupytext.read(notebook), notebook.name, exercises)
    errors = [f"cell {i}:\n{e}" for i, cell in enumerate(nb.cells) for e in errors_of(cell)]
    return {("reference", notebook.stem): (errors, modules, text_of(nb.cells))}


async def run_derived(cases: list, exercises: Path) -> dict:
    """Every (run, notebook) case against a derived run, one cell each, in one kernel (kernels cost seconds)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(case_cell(script, run_dir)) for _, script, run_dir in cases]
    nb, _ = await execute(nb, "derived runs", exercises)
    out, before = {}, set()
    for (key, _, _), cell in zip(cases, nb.cells):
        after = set(modules_of(cell) or ())
        out[key] = (errors_of(cell), sorted(after - before), text_of([cell]))   # what this case's notebook imported
        before |= after
    return out


async def execute_all(reference: list, derived: list, exercises: Path) -> dict:
    gate = asyncio.Semaphore(PARALLEL)

    async def guarded(job):
        async with gate:
            return await job

    parts = await asyncio.gather(guarded(run_derived(derived, exercises)),          # the longest: first
                                 *(guarded(run_reference(nb, exercises)) for nb in reference))
    return {key: value for part in parts for key, value in part.items()}


# Which notebooks run against which run. "no-go": every backend but go (as without a Go toolchain), plus a
# pitfalls.csv, and pool_sizing and m_to_n from the fixture run; "small": two backends, no c10k, switch or
# cpu_bound (notebook 2 has no branch for that).
RUNS = {
    "reference": ("01", "02", "03", "04", "05", "06"),
    "no-go": ("01", "02", "03", "04", "05", "06"),
    "small": ("01", "03", "04", "05", "06"),
}


def make_runs(tmp: Path) -> dict:
    return {
        "no-go": derive_run(tmp / "no-go", keep=["threads", "threadpool", "threadpool-request", "asyncio", "uvloop",
                                                 "gevent", "epoll"], pitfalls=True,
                         borrow=("pool_sizing", "m_to_n")),
        "small": derive_run(tmp / "small", keep=["asyncio", "threadpool"], drop_tables=("c10k", "switch", "cpu_bound")),
    }


CASES = [(run, nb.stem) for run, numbers in RUNS.items() for nb in NOTEBOOKS if nb.stem[:2] in numbers]


def listing(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{case: (errors, forbidden modules, text)}, and "exercises": (the exercise runs' manifests, whether
    results/ changed)."""
    if not REFERENCE.is_dir():
        pytest.skip(f"{REFERENCE.relative_to(ROOT)} is not committed: the notebooks have no run to read")
    runs = make_runs(tmp_path_factory.mktemp("runs"))
    scripts = tmp_path_factory.mktemp("scripts")
    exercises = tmp_path_factory.mktemp("exercises")
    by_stem = {nb.stem: script_of(nb, scripts) for nb in NOTEBOOKS}
    derived = [((run, stem), by_stem[stem], runs[run]) for run, stem in CASES if run != "reference"]
    results_before = listing(ROOT / "results")
    out = asyncio.run(execute_all(NOTEBOOKS, derived, exercises))
    out["exercises"] = (sorted(exercises.rglob("manifest.json")), listing(ROOT / "results") != results_before)
    return out


def test_there_are_notebooks():
    assert [nb.stem[:2] for nb in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.live
@pytest.mark.parametrize("case", CASES, ids=[f"{run}-{stem[:2]}" for run, stem in CASES])
def test_notebook_runs_and_imports_no_server(outcomes, case):
    errors, modules, _ = outcomes[case]
    assert not errors, f"{case[1]} against the {case[0]} run:\n" + "\n".join(errors)
    assert modules == [], f"{case[1]} imported {modules}: notebooks must only read results"


@pytest.mark.live
@pytest.mark.parametrize("case", CASES, ids=[f"{run}-{stem[:2]}" for run, stem in CASES])
def test_exercise_answer_compares_with_its_run(outcomes, case):
    """Against the reference (exercises on) the answer reached the comparison with a measured run; with the
    exercises off it says the command was not run, and the answer cell still runs."""
    _, _, text = outcomes[case]
    expected = ANSWERED if case[0] == "reference" else NOT_RUN
    assert expected in text, f"{case[1]} against the {case[0]} run never said {expected!r}:\n{text[-3000:]}"


@pytest.mark.live
def test_exercises_run_in_the_temporary_directory_only(outcomes):
    manifests, results_changed = outcomes["exercises"]
    exercises = sum(Path(path).read_text().count("common.run_exercise(") for path in NOTEBOOKS)
    assert len(manifests) == exercises, [str(m) for m in manifests]
    assert all(json.loads(m.read_text())["profile"]["name"] == EXERCISE_PROFILE for m in manifests)
    assert not results_changed, "an exercise wrote into results/"


# -- the exercises' comparison (notebooks/common.py), on hand-made quantities ------------------------

@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("notebook_common", NOTEBOOK_DIR / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                   # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def quantities(common, **spreads) -> dict:
    """name=(median, low, high[, invalid reason]) -> {name: Measured}, 3 rounds each."""
    return {name: common.Measured(name, *values[:3], 3, *values[3:]) for name, values in spreads.items()}


def test_a_number_within_the_spread_is_a_tie_and_one_outside_says_how_far_off(common, capsys):
    common.check({"threads": 25.5, "gevent": 40}, quantities(common, threads=(25, 24, 26), gevent=(10, 9.5, 10.5)),
                 "KiB")
    out = capsys.readouterr().out
    assert "threads: you said 25.5, measured 25 KiB (24–26): right, within the spread (a tie)." in out
    assert "gevent: you said 40, measured 10 KiB (9.5–10.5): the measurement is 0.25× your prediction " \
           "(lower than you thought)." in out


def test_an_order_is_judged_step_by_step_and_a_tie_is_never_wrong(common, capsys):
    common.check(["c", "a", "b"], quantities(common, a=(10, 9, 11), b=(10.5, 10, 12), c=(2, 1, 3)))
    out = capsys.readouterr().out
    assert "your order, c > a > b: 1 of 2 steps right." in out
    assert "c above a: wrong, a measured higher." in out
    assert "a and b: a tie (their spreads overlap), so either order is right." in out
    assert "Measured, largest first: b 10.5 = a 10 > c 2." in out


def test_no_prediction_shows_the_measurement_and_an_invalid_point_is_never_judged(common, capsys):
    measured = quantities(common, a=(5, 4, 6, "load generator saturated"), b=(3, 2.5, 3.5))
    common.check(None, measured)
    common.check({"a": 5, "b": 3}, measured)
    out = capsys.readouterr().out
    assert "no prediction written: here is the measurement." in out
    assert "Not judged: a's point is not valid (load generator saturated)." in out
    assert "a: you said" not in out and "b: you said 3, measured 3 (2.5–3.5): right" in out
    assert "Measured, largest first: b 3." in out


def test_measured_reads_a_derived_frame_with_its_spread_and_validity(common):
    frame = pd.DataFrame({"variant": ["x", "y"], "p99_us": [1000.0, 2000.0], "p99_us_lo": [900.0, 1500.0],
                          "p99_us_hi": [1100.0, 2500.0], "n": [3, 2], "valid": [True, False],
                          "invalid_reason": [None, "too short"]})
    got = common.measured(frame, "p99_us", scale=1e-3)
    assert (got["x"].median, got["x"].lo, got["x"].hi, got["x"].rounds, got["x"].invalid) == \
        pytest.approx((1.0, 0.9, 1.1, 3, ""))
    assert got["y"].invalid == "too short" and got["y"].rounds == 2
    x_over_y = common.ratio(got["x"], got["y"], "x/y")
    assert (x_over_y.median, x_over_y.lo, x_over_y.hi) == pytest.approx((0.5, 0.9 / 2.5, 1.1 / 1.5))
    assert common.measured_order(got, smallest_first=True) == "x 1 < y 2"


def test_nearest_rate_takes_each_variants_offered_fraction_closest_to_the_one_asked(common):
    latency = pd.DataFrame({"variant": ["x", "x", "x", "y", "y"], "rate_fraction": [0.3, 0.5, 0.9, 0.4, 0.7]})
    assert common.nearest_rate(latency, 0.5).rate_fraction.tolist() == [0.5, 0.4]


@pytest.mark.live
def test_an_exercise_past_its_time_limit_is_stopped_and_keeps_what_it_measured(common, tmp_path, monkeypatch):
    monkeypatch.setenv(common.PROFILE_ENV, EXERCISE_PROFILE)
    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path))
    started = time.monotonic()
    exercise = common.run_exercise("memory,throughput", "asyncio", repeat=3, run_id="limited", time_limit_s=3)
    assert exercise.status.startswith("stopped at the 3 s limit"), exercise.status
    assert time.monotonic() - started < 3 + common.STOP_GRACE_S
    manifests = list(tmp_path.rglob("manifest.json"))
    assert [json.loads(m.read_text())["status"] for m in manifests] == ["interrupted"]
