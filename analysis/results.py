"""Read one results/<run-id>/ into pandas: the one loader the report, the notebooks and the tests use.

    from conclab.analysis.results import load_run
    run = load_run("results/20260101-120000-all")      # or just the run id, or "latest"
    run.tables["throughput"].groupby(["variant", "conns"]).throughput_rps.median()
    run.has("c10k"), run.skipped, run.manifest["host"]["cpu_model"]

Every table of docs/experiments.md (``experiments.harness.tables.COLUMNS``) is in
``run.tables``; a table the run did not write is an empty frame with the right
columns, so code never needs to ask whether a file exists, only whether it
has rows (``run.has``). Text columns (variant, CPU lists, notes) stay text.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pandas as pd

from conclab.experiments import registry
from conclab.experiments.harness.tables import COLUMNS

from .style import order

DEFAULT_RESULTS = "results"
MANIFEST = "manifest.json"
LATEST = "latest"
TEXT_COLUMNS = ("run_id", "experiment", "backend", "variant", "op", "server_cpus", "cpus", "bench", "source",
                "metric", "unit", "point", "reason", "note", "target", "detail", "invalid_reason", "residuals",
                "ci_flag", "loadgen_engine")


class RunNotFound(Exception):
    """The named run is not a directory with a manifest or tables in it."""


@dataclass
class Run:
    """One run directory, loaded."""
    path: str
    manifest: dict
    tables: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.manifest.get("run_id") or os.path.basename(os.path.normpath(self.path))

    @property
    def profile(self) -> dict:
        return self.manifest.get("profile") or {}

    @property
    def skipped(self) -> pd.DataFrame:
        return self.tables["skipped"]

    def requested(self, experiment: str) -> bool:
        """Whether the run was asked to measure this experiment (manifest parameters)."""
        wanted = self.manifest.get("experiments") or (self.manifest.get("parameters") or {}).get("experiments")
        return experiment in wanted if wanted else self.has(experiment)

    def has(self, experiment: str) -> bool:
        """Whether the experiment's main table has at least one row."""
        main = registry.get(experiment).tables[0].name if experiment in registry.BY_NAME else experiment
        return not self.tables[main].empty

    def variants(self, table: str | None = None) -> list:
        """Variant names: those the run measured (manifest), or those in one table; in the lab's order."""
        if table is None:
            names = [v["name"] for v in self.manifest.get("variants", [])]
        else:
            frame = self.tables[table]
            names = frame.loc[frame.backend != "micro", "variant"].dropna().unique()
        return order(names)

    def summary(self, experiment: str, metric: str, point: str | None = None) -> pd.DataFrame:
        """summary.csv rows of one experiment and metric (optionally one point)."""
        s = self.tables["summary"]
        rows = s[(s.experiment == experiment) & (s.metric == metric)]
        return rows[rows.point == point] if point is not None else rows


def resolve(spec: str, results_dir: str = DEFAULT_RESULTS) -> str:
    """A run directory from a path, a run id under results_dir, or "latest"."""
    if spec == LATEST:
        runs = list_runs(results_dir)
        if not runs:
            raise RunNotFound(f"no runs under {results_dir}/: run `conclab run all` first")
        return runs[-1]
    candidates = list(dict.fromkeys([spec, os.path.join(results_dir, spec)]))
    for candidate in candidates:
        if os.path.isdir(candidate) and _is_run(candidate):
            return candidate
    raise RunNotFound(f"{spec}: not a run directory (no {MANIFEST} or tables in {' or '.join(candidates)})")


def list_runs(results_dir: str = DEFAULT_RESULTS) -> list:
    """Run directories under results_dir, oldest first (by start time in the manifest, then name)."""
    if not os.path.isdir(results_dir):
        return []
    paths = [os.path.join(results_dir, name) for name in sorted(os.listdir(results_dir))]
    runs = [p for p in paths if os.path.isdir(p) and _is_run(p)]
    return sorted(runs, key=lambda p: (_read_manifest(p).get("start") or "", os.path.basename(p)))


def load_run(spec: str, results_dir: str = DEFAULT_RESULTS) -> Run:
    """Load every table of one run (see the module docstring)."""
    path = resolve(spec, results_dir)
    manifest = _read_manifest(path)
    tables = {name: read_table(path, name) for name in COLUMNS}
    return Run(path=path, manifest=manifest, tables=tables)


def read_table(path: str, name: str) -> pd.DataFrame:
    """One CSV of a run as a frame; missing or empty file -> empty frame with the contract's columns."""
    file = os.path.join(path, f"{name}.csv")
    columns = list(COLUMNS[name])
    if not os.path.exists(file) or os.path.getsize(file) == 0:
        return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in columns})
    text = {c: str for c in TEXT_COLUMNS}
    frame = pd.read_csv(file, dtype=text, keep_default_na=True)
    for column in columns:                       # an older run may lack a newer column
        if column not in frame:
            frame[column] = pd.Series(dtype=_dtype(column))
    return frame


def _dtype(column: str) -> str:
    return "object" if column in TEXT_COLUMNS else "float64"


def _is_run(path: str) -> bool:
    return os.path.exists(os.path.join(path, MANIFEST)) or any(
        os.path.exists(os.path.join(path, f"{name}.csv")) for name in registry.names(in_all=True))


def _read_manifest(path: str) -> dict:
    file = os.path.join(path, MANIFEST)
    if not os.path.exists(file):
        return {}
    with open(file, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError:
            return {"status": "unreadable manifest"}
