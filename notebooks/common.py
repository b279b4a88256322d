"""What every notebook does first: find the repository, load the committed run, show charts and answers.

The notebooks read results only. This module imports pandas, matplotlib, IPython's
display and the lab's ``conclab.analysis`` package, nothing else: no server, no load
generator, no gevent. The run is ``results/reference`` unless ``CONCLAB_RUN``
names another run directory (the tests use that for runs without some backends).
"""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd         # noqa: E402
from IPython.display import Image, Markdown, display  # noqa: E402

from conclab.analysis import style  # noqa: E402
from conclab.analysis.fmt import num  # noqa: E402
from conclab.analysis.results import load_run  # noqa: E402

RUN_ENV = "CONCLAB_RUN"
DEFAULT_RUN = ROOT / "results" / "reference"


def load():
    """The run the notebook reads: $CONCLAB_RUN, else results/reference."""
    return load_run(os.environ.get(RUN_ENV) or str(DEFAULT_RUN))


def describe(run) -> None:
    """Which run this is, what it measured, what it skipped (and why)."""
    host = run.manifest.get("host") or {}
    params = run.manifest.get("parameters") or {}
    lines = [f"run **{run.id}** ({run.manifest.get('status', 'status unknown')}), "
             f"profile `{run.profile.get('name', '?')}`, repeat {params.get('repeat', '?')}",
             f"server CPUs {params.get('server_cpus', '?')}, load generator CPUs {params.get('loadgen_cpus', '?')}"
             + (f", {host.get('cpu_count')} CPUs: {host.get('cpu_model')}" if host.get("cpu_model") else ""),
             "variants: " + (", ".join(run.variants()) or "none")]
    skipped = run.skipped
    for row in skipped.itertuples():
        where = f" ({row.point})" if isinstance(row.point, str) and row.point else ""
        lines.append(f"skipped in {row.experiment}: {row.variant}{where}: {row.reason}")
    display(Markdown("\n".join(f"* {line}" for line in lines)))


def chart(draw, *args, **kwargs) -> None:
    """Build a figure with one of conclab.analysis.charts' draw_* functions (in the lab's style) and show it as a PNG."""
    with style.context():
        fig = draw(*args, **kwargs)
    show(fig)


def show(fig) -> None:
    """Show a matplotlib Figure as a PNG, whatever the matplotlib backend (Agg in CI)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=style.DPI)
    display(Image(data=buffer.getvalue()))


def finding(f) -> None:
    """A Finding's sentence (analysis.findings), under its chart."""
    display(Markdown(f"*{f.text}*" if f.text else "*(nothing measured)*"))


def note(markdown: str) -> None:
    display(Markdown(markdown))


def missing(what: str) -> None:
    display(Markdown(f"**Not in this run:** {what}. Run `conclab run {what.split()[0]}` to measure it."))


def table(frame: pd.DataFrame, digits: int = 3) -> None:
    """A frame with its numbers as the report prints them (3 significant digits)."""
    shown = frame.copy()
    for column in shown.columns:
        if pd.api.types.is_numeric_dtype(shown[column]) and not pd.api.types.is_bool_dtype(shown[column]):
            shown[column] = shown[column].map(lambda v: num(v, digits))
    display(shown.style.hide(axis="index") if len(shown) else shown)     # (Styler needs jinja2: pandas' own extra)


def answer(*lines: str) -> None:
    """The answer to a notebook's question, every number in it computed from the run."""
    lines = [line for line in lines if line]
    print("Answer:", *lines, sep="\n  " if len(lines) > 1 else " ")


__all__ = ["ROOT", "load", "describe", "chart", "show", "finding", "note", "missing", "table", "answer", "num"]
