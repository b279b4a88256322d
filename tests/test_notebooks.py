"""The teaching notebooks (notebooks/NN_*.py, jupytext percent format) run top to bottom without an error.

Each notebook is converted with jupytext and executed by nbclient in a fresh
python3 kernel (MPLBACKEND=Agg) against the committed results/reference run;
a last cell, added here, lists the modules the notebook imported, and none may
be a server backend (or the hooks they share), gevent, greenlet, locust or
uvloop: the notebooks read results, they never run anything. The same notebooks also run
against runs derived from the reference: one without go (as when Go is not
installed) and with a ``pitfalls.csv`` (the table the pitfalls experiment will
write), and one with two backends and some experiments missing, so the
branches a future run can take are executed. The kernels run a few at a time.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from pathlib import Path

import jupytext
import nbclient
import nbformat
import pandas as pd
import pytest

from conclab.servers import BACKENDS

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
REFERENCE = ROOT / "results" / "reference"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
# What a notebook must never import: the server backends (and the hooks they share), gevent, locust, uvloop.
BACKEND_MODULES = sorted({"conclab.servers." + b.entry.split(":")[0] for b in BACKENDS.values()} | {"conclab.servers.base"})
FORBIDDEN_PACKAGES = ("gevent", "greenlet", "locust", "uvloop")
CELL_TIMEOUT_S = 120
PARALLEL = 3                       # kernels at once (2 CPUs: kernels spend much of their life waiting)
MODULES_MARK = "conclab-modules:"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
CHECK_CELL = (f"import sys, json\nprint({MODULES_MARK!r}, json.dumps(sorted("
              f"{{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN_PACKAGES!r}) "
              f"| set(sys.modules) & set({BACKEND_MODULES!r}))))")


# -- runs derived from the reference ----------------------------------------------------------------

def derive_run(dest: Path, keep=None, drop_tables=(), pitfalls: bool = False) -> Path:
    """A copy of the reference run with only the variants in `keep`, without `drop_tables`, maybe a pitfalls.csv."""
    shutil.copytree(REFERENCE, dest)
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
    """A cell that runs a whole notebook's code, in a namespace of its own, against another run."""
    return (f"import os, runpy\nos.environ['CONCLAB_RUN'] = {str(run_dir)!r}\ntry:\n"
            f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
            "finally:\n" + "\n".join("    " + line for line in CHECK_CELL.splitlines()))


def modules_of(cell) -> list | None:
    """The forbidden modules a check printed in this cell's output (None: no check ran)."""
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream" and MODULES_MARK in output.text:
            return json.loads(output.text.split(MODULES_MARK, 1)[1].splitlines()[0])
    return None


async def execute(nb, name: str):
    """Run a notebook (the check cell appended) in a fresh kernel with every error kept in its cell;
    return the notebook as executed and the forbidden modules its kernel had imported by the end."""
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, allow_errors=True,
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    env = {**os.environ, "MPLBACKEND": "Agg", "CONCLAB_RUN": str(REFERENCE), "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    await client.async_execute(env=env)
    modules = modules_of(nb.cells[-1])
    if modules is None:
        raise AssertionError(f"{name}: the module check printed nothing")
    return nb, modules


def errors_of(cell) -> list:
    return [ANSI.sub("", f"{o.ename}: {o.evalue}\n" + "\n".join(o.traceback)) for o in cell.get("outputs", [])
            if o.get("output_type") == "error"]


async def run_reference(notebook: Path) -> dict:
    """The notebook as a reader runs it: its own kernel, the committed run. {stem: (errors, modules)}."""
    nb, modules = await execute(jupytext.read(notebook), notebook.name)
    errors = [f"cell {i}:\n{e}" for i, cell in enumerate(nb.cells) for e in errors_of(cell)]
    return {("reference", notebook.stem): (errors, modules)}


async def run_derived(cases: list) -> dict:
    """Every (run, notebook) case against a derived run, one cell each, in one kernel (kernels cost seconds)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(case_cell(script, run_dir)) for _, script, run_dir in cases]
    nb, _ = await execute(nb, "derived runs")
    out, before = {}, set()
    for (key, _, _), cell in zip(cases, nb.cells):
        after = set(modules_of(cell) or ())
        out[key] = (errors_of(cell), sorted(after - before))          # what this case's notebook imported
        before |= after
    return out


async def execute_all(reference: list, derived: list) -> dict:
    gate = asyncio.Semaphore(PARALLEL)

    async def guarded(job):
        async with gate:
            return await job

    parts = await asyncio.gather(*(guarded(run_reference(nb)) for nb in reference), guarded(run_derived(derived)))
    return {key: value for part in parts for key, value in part.items()}


# Which notebooks run against which run. "no-go": every backend but go (as without a Go toolchain), plus a
# pitfalls.csv; "small": two backends, no c10k, switch or cpu_bound (notebook 2 has no branch for that).
RUNS = {
    "reference": ("01", "02", "03", "04", "05"),
    "no-go": ("01", "02", "03", "04", "05"),
    "small": ("01", "03", "04", "05"),
}


def make_runs(tmp: Path) -> dict:
    return {
        "no-go": derive_run(tmp / "no-go", keep=["threads", "threadpool", "threadpool-request", "asyncio", "uvloop",
                                                 "gevent", "epoll"], pitfalls=True),
        "small": derive_run(tmp / "small", keep=["asyncio", "threadpool"], drop_tables=("c10k", "switch", "cpu_bound")),
    }


CASES = [(run, nb.stem) for run, numbers in RUNS.items() for nb in NOTEBOOKS if nb.stem[:2] in numbers]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    if not REFERENCE.is_dir():
        pytest.skip(f"{REFERENCE.relative_to(ROOT)} is not committed: the notebooks have no run to read")
    runs = make_runs(tmp_path_factory.mktemp("runs"))
    scripts = tmp_path_factory.mktemp("scripts")
    by_stem = {nb.stem: script_of(nb, scripts) for nb in NOTEBOOKS}
    derived = [((run, stem), by_stem[stem], runs[run]) for run, stem in CASES if run != "reference"]
    return asyncio.run(execute_all(NOTEBOOKS, derived))


def test_there_are_notebooks():
    assert [nb.stem[:2] for nb in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("case", CASES, ids=[f"{run}-{stem[:2]}" for run, stem in CASES])
def test_notebook_runs_and_imports_no_server(outcomes, case):
    errors, modules = outcomes[case]
    assert not errors, f"{case[1]} against the {case[0]} run:\n" + "\n".join(errors)
    assert modules == [], f"{case[1]} imported {modules}: notebooks must only read results"
