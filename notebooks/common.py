"""What every notebook does: find the repository, load the committed run, show charts and answers,
and run its predict-then-run exercise.

The notebooks read results. This module imports pandas, matplotlib, IPython's
display and the lab's ``conclab.analysis`` package, nothing else: no server, no load
generator, no gevent. The run is ``results/reference`` unless ``CONCLAB_RUN``
names another run directory (the tests use that for runs without some backends).

Each notebook's exercise is the one exception to "read only", and it keeps the
kernel clean: ``run_exercise`` starts ``conclab run ...`` as a subprocess (the
servers and the load generator live there, never in the kernel), with a time
limit, writing into a temporary directory (``$CONCLAB_NOTEBOOK_RESULTS``, else
one made per kernel; never results/), at the profile ``$CONCLAB_NOTEBOOK_PROFILE``
names (quick; tiny in the tests; off runs nothing). ``measured`` turns a derived
frame (conclab.analysis.derive) into quantities with their spread, and ``check``
compares the learner's prediction with them by the lab's one ranking rule
(harness.stats.compare: within the spread is a tie).
"""
from __future__ import annotations

import io
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd         # noqa: E402
from IPython.display import Image, Markdown, display  # noqa: E402

from conclab.analysis import derive, style  # noqa: E402
from conclab.analysis.fmt import num  # noqa: E402
from conclab.analysis.results import RunNotFound, load_run  # noqa: E402
from conclab.experiments.harness import stats  # noqa: E402
from conclab.experiments.harness.profiles import PROFILES  # noqa: E402

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



# -- predict, then run: the exercises ---------------------------------------------------------------
#
# Every notebook has one: the learner writes a prediction into a variable (None: none written), a cell runs a
# short `conclab run` in a subprocess, and the answer cell compares the prediction with that run. The runs go
# to a temporary directory (never results/), take the profile CONCLAB_NOTEBOOK_PROFILE names (quick by default;
# tiny in the tests; off: nothing is run) and are stopped at a time limit (SIGTERM: the harness stops its
# servers and keeps what it measured).

PROFILE_ENV = "CONCLAB_NOTEBOOK_PROFILE"
RESULTS_ENV = "CONCLAB_NOTEBOOK_RESULTS"
EXERCISE_PROFILE = "quick"
OFF = "off"
HARNESS = "conclab.experiments.harness"   # `python -m` it: `conclab run` (docs/experiments.md), no other tools
TIME_LIMIT_S = 60.0
STOP_GRACE_S = 20.0                 # after SIGTERM: the harness stops its servers and writes its manifest
_results_dir = None


@dataclass
class Exercise:
    """One exercise run: the command as a learner would type it, its run (None: not run or nothing measured)."""
    command: str
    profile: str
    run: object = None
    seconds: float = 0.0
    status: str = "not run"


def exercise_profile() -> str:
    """The profile exercise runs use: $CONCLAB_NOTEBOOK_PROFILE (quick, standard, full, tiny, or off)."""
    return (os.environ.get(PROFILE_ENV) or EXERCISE_PROFILE).strip().lower()


def exercise_settings():
    """The exercise profile's settings (experiments.harness.profiles; quick when exercises are off)."""
    return PROFILES.get(exercise_profile()) or PROFILES[EXERCISE_PROFILE]


def exercise_results() -> Path:
    """Where exercise runs go: $CONCLAB_NOTEBOOK_RESULTS, else one temporary directory per kernel."""
    global _results_dir
    given = os.environ.get(RESULTS_ENV)
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        return Path(given)
    if _results_dir is None:
        _results_dir = Path(tempfile.mkdtemp(prefix="conclab-exercises-"))
    return _results_dir


def run_exercise(experiment: str, backends: str, repeat: int, run_id: str,
                 time_limit_s: float = TIME_LIMIT_S) -> Exercise:
    """Run `conclab run EXPERIMENT --backends ... --repeat N` in a subprocess, at most time_limit_s, and load it."""
    profile = exercise_profile()
    args = ["run", experiment, "--backends", backends, "--profile", EXERCISE_PROFILE if profile == OFF else profile,
            "--repeat", str(repeat)]
    shown = "conclab " + " ".join(args)
    if profile == OFF:
        note(f"`{shown}` not run: {PROFILE_ENV}={OFF}.")
        return Exercise(shown, profile)
    parent = Path(tempfile.mkdtemp(prefix=run_id + "-", dir=exercise_results()))
    args += ["--results", str(parent), "--run-id", run_id]
    note(f"Running `{shown}` (at most {num(time_limit_s)} s) ...")
    started = time.monotonic()
    status, stderr = _run_limited([sys.executable, "-m", HARNESS, *args[1:]], time_limit_s)
    seconds = time.monotonic() - started
    try:
        run = load_run(str(parent / run_id))
    except RunNotFound:
        run = None
    done = Exercise(shown, profile, run, seconds, status)
    note(f"{status} in {num(seconds)} s" + (f"; its results: `{parent / run_id}`" if run else "")
         + ("" if status == "completed" else f". Last words:\n```\n{stderr}\n```"))
    return done


def _run_limited(argv: list, time_limit_s: float) -> tuple[str, str]:
    """(status, the last lines of its stderr): run argv; at the time limit (or an interrupted cell) SIGTERM it,
    and SIGKILL it if it lingers."""
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errors, cwd=ROOT)
        try:
            code = process.wait(timeout=time_limit_s)
            status = "completed" if code == 0 else f"failed (exit status {code})"
        except subprocess.TimeoutExpired:
            status = f"stopped at the {num(time_limit_s)} s limit (what it measured is kept)"
        finally:
            _stop(process)
        errors.seek(0)
        return status, "\n".join(errors.read().splitlines()[-8:])


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (the harness stops its servers and writes its manifest), SIGKILL after STOP_GRACE_S."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def result_of(exercise: Exercise, experiment: str):
    """The exercise's run if it measured ``experiment``; else None, and the answer says why."""
    if exercise.run is not None and exercise.run.has(experiment):
        return exercise.run
    answer(f"no {experiment} measurement to compare with ({exercise.status}): run the cell above"
           + (f" with {PROFILE_ENV} unset (it is {OFF})." if exercise.profile == OFF else "."))
    return None


@dataclass(frozen=True)
class Measured:
    """A measured quantity of an exercise run: its median and spread (the median's interval, else min..max)."""
    name: str
    median: float
    lo: float
    hi: float
    rounds: int = 1
    invalid: str = ""               # why the point is not valid (derive.valid): shown, never judged


def measured(frame: pd.DataFrame, column: str, key: str = "variant", scale: float = 1.0, rounds=None) -> dict:
    """{key value: Measured} from a frame of conclab.analysis.derive (medians with their spread columns); a
    point with no valid round keeps its reason (``invalid``). ``rounds``: how many measurements the spread is
    over, where the frame does not say (its ``n`` or ``repeats``)."""
    out = {}
    for _, row in frame.iterrows():
        pair = derive.interval(row, column)
        if pair is None or pd.isna(row.get(column)):
            continue
        counted = row.get("n", row.get("repeats", rounds))
        ok = bool(row.get("valid", True)) if pd.notna(row.get("valid", True)) else True
        out[str(row[key])] = Measured(str(row[key]), float(row[column]) * scale, pair[0] * scale, pair[1] * scale,
                                      int(counted) if counted is not None and pd.notna(counted) else 1,
                                      "" if ok else str(row.get("invalid_reason") or "invalid"))
    return out


def nearest_rate(latency: pd.DataFrame, fraction: float) -> pd.DataFrame:
    """One row per variant of a derive.latency frame: the offered fraction of capacity nearest ``fraction``."""
    if latency.empty:
        return latency
    gap = (latency.rate_fraction - fraction).abs()
    return latency[gap == gap.groupby(latency.variant).transform("min")].drop_duplicates("variant")


def ratio(a: Measured, b: Measured, name: str) -> Measured:
    """a / b, its spread the widest the two spreads allow."""
    return Measured(name, a.median / b.median, a.lo / b.hi if b.hi else float("nan"),
                    a.hi / b.lo if b.lo else float("inf"), min(a.rounds, b.rounds))


def check(prediction, quantities: dict, unit: str = "") -> None:
    """Compare a prediction with the measured quantities, and show them.

    prediction: None (none written: the measurement alone), a number (the only quantity, or the first), a dict
    {name: number}, or a list of names, largest first. A number within a quantity's
    spread is right within noise; two quantities whose spreads overlap are a tie, and no order between them is
    wrong.
    """
    if not quantities:
        answer("the run measured nothing to compare with: see its last words above.")
        return
    shown, quantities = quantities, {name: q for name, q in quantities.items() if not q.invalid}
    if prediction is None:
        lines = ["no prediction written: here is the measurement."]
    elif isinstance(prediction, (list, tuple)):
        lines = _check_order([str(p) for p in prediction], quantities)
    elif isinstance(prediction, dict):
        lines = [_check_number(value, quantities.get(str(name)), name, unit) for name, value in prediction.items()
                 if str(name) in quantities or str(name) not in shown]          # an invalid one: said below
    else:
        first = next(iter(shown.values()))
        lines = [_check_number(prediction, first, first.name, unit)] if not first.invalid else []
    if quantities:
        lines.append("Measured, largest first: " + measured_order(quantities) + ".")
    lines += [f"Not judged: {q.name}'s point is not valid ({q.invalid})." for q in shown.values() if q.invalid]
    if any(q.rounds < 2 for q in shown.values()):
        lines.append("One round only: its spread is a single value (no noise was measured, which is not none).")
    answer(*lines)
    table(pd.DataFrame([{"quantity": q.name, f"median {unit}".strip(): q.median, "low": q.lo, "high": q.hi,
                         "rounds": q.rounds, "valid": not q.invalid} for q in shown.values()]))


def _check_number(value, quantity, name, unit: str) -> str:
    if quantity is None:
        return f"{name}: not measured in this run."
    if value is None:
        return f"{name}: no prediction; measured {num(quantity.median)} {unit}".rstrip() + "."
    verdict = stats.compare(float(value), (quantity.lo, quantity.hi))
    spread = f"{num(quantity.median)} {unit} ({num(quantity.lo)}–{num(quantity.hi)})".replace("  ", " ")
    if verdict == stats.TIE:
        return f"{name}: you said {num(value)}, measured {spread}: right, within the spread (a tie)."
    off = quantity.median / float(value) if float(value) else float("inf")
    return (f"{name}: you said {num(value)}, measured {spread}: the measurement is "
            f"{num(off)}× your prediction ({'higher' if verdict == stats.LOWER else 'lower'} than you thought).")


def _check_order(names: list, quantities: dict) -> list:
    unknown = [n for n in names if n not in quantities]
    known = [n for n in names if n in quantities]
    lines = [f"not measured: {', '.join(unknown)}."] if unknown else []
    right = 0
    pairs = list(itertools.pairwise(known))
    for above, below in pairs:
        verdict = stats.compare(_pair(quantities[above]), _pair(quantities[below]))
        if verdict == stats.HIGHER:
            right += 1
            lines.append(f"{above} above {below}: right.")
        elif verdict == stats.TIE:
            right += 1
            lines.append(f"{above} and {below}: a tie (their spreads overlap), so either order is right.")
        else:
            lines.append(f"{above} above {below}: wrong, {below} measured higher.")
    if pairs:
        lines.insert(0, f"your order, {' > '.join(known)}: {right} of {len(pairs)} steps right.")
    return lines


def _pair(q: Measured) -> tuple:
    return q.lo, q.hi


def measured_order(quantities: dict, smallest_first: bool = False) -> str:
    """The quantities largest (or smallest) first, "=" between neighbours whose spreads overlap (a tie within
    noise), else ">" (or "<")."""
    ranked = sorted(quantities.values(), key=lambda q: q.median, reverse=not smallest_first)
    text = ""
    for previous, q in zip([None, *ranked], ranked):
        if previous is not None:
            text += " = " if stats.compare(_pair(previous), _pair(q)) == stats.TIE else " < " if smallest_first \
                else " > "
        text += f"{q.name} {num(q.median)}"
    return text


__all__ = ["ROOT", "load", "describe", "chart", "show", "finding", "note", "missing", "table", "answer", "num",
           "Exercise", "Measured", "run_exercise", "exercise_profile", "exercise_settings", "result_of", "measured",
           "ratio", "check", "measured_order", "nearest_rate"]
