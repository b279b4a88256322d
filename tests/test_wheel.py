"""The lab as a user installs it: a built wheel in a fresh virtualenv holds every source file and runs.

An editable install maps ``conclab.*`` onto the source folders, so it cannot
show a file missing from the wheel (the Go sources an experiment builds, say).
This test builds the wheel, installs it into a new venv with no access to the
checkout (the dependencies come from the test venv's site-packages, added as a
plain path, so nothing is downloaded), checks that every module and every file
a layer compiles or reads (Go, C, go.mod) is installed and that every experiment
module imports, then runs one experiment at the tiny profile from a directory
outside the repository and writes the report. That experiment is ``switch``:
it compiles the C and the Go microbenchmarks from the installed sources and
serves with the Go backend (built from the installed sources too) and a Python
one, through the load generator. Every experiment's own run is tested in the
checkout (tests/test_experiments.py and the modules running the named ones).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from conclab.experiments import registry

pytestmark = pytest.mark.live

REPO = Path(__file__).resolve().parent.parent
BACKENDS = "epoll,go"            # one Python model and the compiled reference: every code path, kept short
EXPERIMENT = "switch"            # builds the C and Go sources the wheel carries, serves both backends
PACKAGED = ("*.py", "*.go", "go.mod", "*.c")   # what the layers import, compile or read at run time
STEP_TIMEOUT_S = 600
UNPACKAGED = (".git", ".venv", "build", "dist", "results", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis")


def run(cmd, cwd, timeout=STEP_TIMEOUT_S) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with only the built wheel installed; returns its bin directory."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"             # a clean copy: a stale build/ in the checkout must not leak into the wheel
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*UNPACKAGED))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(base),
         str(source)], cwd=base)
    wheel = next(base.glob("conclab-*.whl"))
    venv = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base)
    target = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (target / "test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")   # a path, not the finder
    run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "-q",
         str(wheel)], cwd=base)
    return venv / "bin"


def test_the_wheel_imports_from_its_venv_not_the_checkout(installed, tmp_path):
    code = "import conclab.servers, conclab.analysis; print(conclab.servers.__file__)"
    where = run([str(installed / "python"), "-c", code], cwd=tmp_path).stdout.strip()
    assert where.startswith(str(installed.parent)) and not where.startswith(str(REPO) + os.sep)


def source_files() -> set:
    """Every file the layers import, compile or read, as the wheel names it (``conclab/<layer>/...``)."""
    with open(REPO / "pyproject.toml", "rb") as f:
        folders = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    folders = {"conclab": "conclab", **folders}
    names = set()
    for package, folder in folders.items():
        root = REPO / folder
        for pattern in PACKAGED:
            for path in root.rglob(pattern):
                relative = path.relative_to(root)
                if "__pycache__" not in relative.parts and (package != "conclab" or len(relative.parts) == 1):
                    names.add("/".join([*package.split("."), *relative.parts]))
    return names


def test_the_wheel_holds_every_source_file_and_every_experiment_imports(installed, tmp_path):
    wheel = next(installed.parent.parent.glob("conclab-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        missing = sorted(source_files() - set(archive.namelist()))
    assert missing == [], f"not in the wheel: {missing}"
    code = ("from conclab.experiments import registry\n"
            "print(sum(hasattr(e.load(), 'run') for e in registry.EXPERIMENTS))")
    assert run([str(installed / "python"), "-c", code], cwd=tmp_path).stdout.strip() == str(len(registry.names()))


def test_the_wheel_runs_an_experiment_and_reports(installed, tmp_path):
    results = tmp_path / "results"
    env_cmd = [str(installed / "conclab"), "run", EXPERIMENT, "--profile", "tiny",
               "--backends", BACKENDS, "--results", str(results), "--run-id", "wheel"]
    run(env_cmd, cwd=tmp_path)
    run_dir = results / "wheel"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    with open(run_dir / "skipped.csv", newline="") as f:
        skipped = list(csv.DictReader(f))
    assert skipped == [], f"skipped in the installed lab: {skipped}"
    assert manifest.get("experiment_s", {}).get(EXPERIMENT) is not None, f"{EXPERIMENT} did not run"
    page = run([str(installed / "conclab"), "report", str(run_dir)], cwd=tmp_path).stdout.strip().splitlines()[-1]
    assert Path(page).is_file()
