"""How far to trust a run: the report's first section, the banners above everything, the floor for findings.

The harness calibrates every run (experiments/harness/calibrate.py): timer
wake-up jitter on each CPU the run used, the CPU other processes and the
hypervisor (steal) took during the run, the load average, and the latency
floor (the load generator against the go backend at a low rate: what a request
that does nothing costs on this machine, now). It writes them, with a verdict
(``quiet`` or ``noisy``) and the reasons, to manifest.json ``calibration`` and
to calibration.csv. This module only reads the manifest (analysis never runs
harness code) and turns it into:

* ``banners(run)``: the page's top lines: a noisy run says so, a run without
  calibration (older runs) says "uncalibrated", and a smoke run (profiles
  ``SMOKE_PROFILES``: quick, tiny) says it is for checking the lab, not for
  conclusions;
* ``section(run)``: "How far to trust this run": the figures against their
  limits, the verdict and its reasons, and the rule that a difference below
  the floor is not a finding, with the floor's numbers;
* ``floor(run)`` and ``below_floor(run, delta_us)``: for findings that compare
  latencies, whether a difference is within what the machine does to an idle
  request.
"""
from __future__ import annotations

import pandas as pd

from . import html
from .fmt import MISSING, is_number, num

SECTION_ID = "trust"
TITLE = "How far to trust this run"
SMOKE_PROFILES = ("quick", "tiny")      # profiles sized to check the lab end to end, not to measure it
PHASES = ("start", "end")
BANNER_STYLE = {                        # (background, border): the page's CSS has no banner class of its own
    "noisy": ("#fde2e2", "#d62728"),
    "uncalibrated": ("#eeeeee", "#777777"),
    "smoke": ("#fff4d6", "#e6a700"),
}


def _manifest(run) -> dict:
    return run if isinstance(run, dict) else (getattr(run, "manifest", None) or {})


def calibration(run) -> dict | None:
    """The run's calibration (manifest.json ``calibration``), or None for a run made without one."""
    cal = _manifest(run).get("calibration")
    return cal if isinstance(cal, dict) and cal else None


def profile_name(run) -> str | None:
    m = _manifest(run)
    return (m.get("profile") or {}).get("name") or (m.get("parameters") or {}).get("profile")


def is_smoke(run) -> bool:
    """A quick or tiny run: the lab checked end to end in minutes, its numbers not meant for conclusions."""
    return profile_name(run) in SMOKE_PROFILES


def floor(run) -> dict | None:
    """The run's floor: {"latency_p50_us", "latency_p99_us", "timer_p99_us", "backend", ...}, or None.

    The latency figures are those of the worse phase (start or end) of the idle-echo measurement; the
    timer p99 is the latest 1 ms wake-up (p99) over every CPU and both phases. None when the run has no
    calibration or measured neither.
    """
    cal = calibration(run)
    summary = (cal or {}).get("floor") or {}
    if not any(is_number(summary.get(k)) for k in ("latency_p99_us", "timer_p99_us")):
        return None
    return summary


def floor_us(run) -> float | None:
    """The smallest latency difference (µs) this run can tell from noise: the larger of the floor's latency
    p99 and its timer p99 (None without a floor)."""
    f = floor(run)
    if f is None:
        return None
    return max(v for v in (f.get("latency_p99_us"), f.get("timer_p99_us")) if is_number(v))


def below_floor(run, delta_us) -> bool:
    """Whether a latency difference of ``delta_us`` µs (either sign) is below this run's floor.

    Below the floor a difference is not a finding: an echo that does nothing, on the same machine during
    the same run, varies that much (its p99), and so does a 1 ms timer's wake-up. The floor is
    ``floor_us(run)``: the larger of the two p99s, so the answer errs towards "noise". A run without
    calibration has no floor: the answer is False (it cannot say a difference is noise; the report's
    banner says the run is uncalibrated instead), as it is for a missing ``delta_us``.
    """
    limit = floor_us(run)
    return limit is not None and is_number(delta_us) and abs(delta_us) < limit


# -- the banners ---------------------------------------------------------------------------------------

def _banner(kind: str, text: str) -> str:
    background, border = BANNER_STYLE[kind]
    return (f'<div class="banner banner-{kind}" style="background:{background};border:3px solid {border};'
            f'padding:0.5em 1em;margin:0.3em 0;font-weight:bold">{html.esc(text)} '
            f'<a href="#{SECTION_ID}">{html.esc(TITLE)}</a></div>')


def banner_texts(run) -> list:
    """(kind, text) of each banner the run gets, most serious first."""
    out = []
    cal = calibration(run)
    if cal is None:
        out.append(("uncalibrated", "Uncalibrated: this run has no calibration, so how quiet the machine was is "
                                    "unknown and no difference can be told from noise."))
    elif cal.get("verdict") == "noisy":
        k = len(cal.get("reasons") or [])
        limit = floor_us(run)
        below = f", {num(limit)} µs," if limit is not None else ""
        out.append(("noisy", f"A noisy run: {k} {'measure' if k == 1 else 'measures'} of the machine past their "
                             f"limits. Differences below the floor{below} are not findings."))
    if is_smoke(run):
        out.append(("smoke", f"A smoke run (profile {profile_name(run)}), for checking the lab, not for conclusions."))
    return out


def banners(run) -> str:
    """The banners' HTML, for the very top of the page (empty for a calibrated, quiet, standard or full run)."""
    return "\n".join(_banner(kind, text) for kind, text in banner_texts(run))


# -- the section ---------------------------------------------------------------------------------------

def _triple(stats: dict | None) -> str:
    """"p50 / p99 / max" of one measure (µs), or the reason it is missing."""
    if not stats:
        return MISSING
    if stats.get("error"):
        return f"not measured: {stats['error']}"
    return " / ".join(num(stats.get(k)) for k in ("p50_us", "p99_us", "max_us"))


def _load(phase: dict, judged: bool = True) -> str:
    """The 1-minute load average; at the end, said to be the run's own (calibrate: recorded, not judged)."""
    load = (phase.get("loadavg") or [None])[0]
    return num(load) if judged or not is_number(load) else f"{num(load)} (mostly the run's own tasks: not judged)"


def figures(cal: dict) -> pd.DataFrame:
    """The calibration as (measure, start, during the run, end, noisy above) rows, numbers as the page shows them."""
    limits, settings = cal.get("limits") or {}, cal.get("settings") or {}
    start, end, during = cal.get("start") or {}, cal.get("end") or {}, cal.get("run") or {}
    skipped = end.get("skipped")
    cpu_count = cal.get("cpu_count")
    rows = []

    def add(measure, at_start=MISSING, in_run=MISSING, at_end=MISSING, limit=""):
        rows.append({"measure": measure, "start": at_start, "during the run": in_run, "end": at_end,
                     "noisy above": limit})
    load_limit = (limits.get("load_per_cpu") or 0) * (cpu_count or 0)
    add(f"load average, 1 min ({num(cpu_count)} CPUs)", _load(start), MISSING,
        _load(end, judged=False) if end else MISSING, f"{num(load_limit)} at start" if load_limit else "")
    cpus = sorted({*(start.get("timer") or {}), *(end.get("timer") or {})}, key=int)
    for cpu in cpus:
        add(f"timer: a {num(settings.get('timer_sleep_us'))} µs sleep woke up late by, CPU {cpu} "
            f"(µs, p50 / p99 / max of {num(settings.get('timer_samples'))})",
            _triple((start.get("timer") or {}).get(cpu)), MISSING,
            _triple((end.get("timer") or {}).get(cpu)) if not skipped else f"not measured: {skipped}",
            f"p99 {num(limits.get('timer_p99_us'))} µs")
    backend = ((start.get("floor") or {}).get("backend") or (end.get("floor") or {}).get("backend")
               or (cal.get("floor") or {}).get("backend") or "?")
    servers = ",".join(map(str, cal.get("server_cpus") or []))
    add(f"latency floor: {backend} at {num(settings.get('floor_rate_rps'))} req/s open loop, "
        f"{num(settings.get('floor_conns'))} connections, {num(settings.get('floor_s'))} s, server on CPU {servers} "
        "(µs, p50 / p99 / max)", _triple(start.get("floor")), MISSING,
        _triple(end.get("floor")) if not skipped else f"not measured: {skipped}",
        f"p99 {num(limits.get('floor_p99_us'))} µs")
    run_cpus = ",".join(map(str, cal.get("cpus") or []))
    machine = during.get("machine") or {}
    add(f"busy, the run's CPUs {run_cpus} (%)", in_run=num(during.get("busy_pct")))
    add(f"steal, the run's CPUs {run_cpus} (% of their time)", in_run=num(during.get("steal_pct")),
        limit=f"{num(limits.get('steal_pct'))} %")
    add("the run's own processes (% of one CPU)", in_run=num(during.get("own_cpu_pct")))
    add(f"other processes on CPUs {run_cpus} (% of one CPU)", in_run=num(during.get("others_cpu_pct")),
        limit=f"{num(limits.get('others_cpu_pct'))} %")
    add("busy, whole machine (%)", in_run=num(machine.get("busy_pct")))
    add("steal, whole machine (%)", in_run=num(machine.get("steal_pct")))
    return pd.DataFrame(rows)


def _rule(run, cal: dict) -> str:
    f = floor(run)
    if f is None:
        return ("Differences below the floor are not findings; this run measured no floor "
                "(see what was not measured), so no difference on this page can be told from noise.")
    settings = cal.get("settings") or {}
    parts = ["Differences below the floor are not findings."]
    if is_number(f.get("latency_p99_us")):
        parts.append(f"On this machine, during this run, an echo that does nothing ({f.get('backend') or '?'} at "
                     f"{num(settings.get('floor_rate_rps'))} req/s) took p50 {num(f.get('latency_p50_us'))} µs and "
                     f"p99 {num(f.get('latency_p99_us'))} µs (the worse of start and end).")
    if is_number(f.get("timer_p99_us")):
        parts.append(f"A {num(settings.get('timer_sleep_us'))} µs sleep woke up as much as "
                     f"{num(f.get('timer_p99_us'))} µs late (p99, the worst CPU).")
    parts.append(f"A latency difference smaller than {num(floor_us(run))} µs (the larger of the two p99s) is "
                 "within that noise, not a finding.")
    return " ".join(parts)


def _uncalibrated(run) -> str:
    m = _manifest(run)
    host = m.get("host") or {}
    start, end = (host.get("loadavg_at_start") or [None])[0], (m.get("loadavg_at_end") or [None])[0]
    text = ("This run has no calibration: it was made before the harness measured the machine at the start "
            "and end of every run, so the timer jitter, the CPU other processes took, steal and the latency "
            "floor are unknown, and no difference on this page can be told from noise.")
    if is_number(start) or is_number(end):
        text += (f" All it recorded is the load average: {num(start)} at the start and {num(end)} at the end, "
                 f"on {num(host.get('cpu_count'))} CPUs.")
    return text + " Run it again (conclab run) for a calibrated run."


def section(run) -> str:
    """The section's HTML: the figures, the verdict and why, the floor rule (or: no calibration)."""
    parts = [f'<h2 id="{SECTION_ID}">{html.esc(TITLE)}</h2>']
    cal = calibration(run)
    if cal is None:
        parts.append(f'<p class="verdict uncalibrated">{html.esc(_uncalibrated(run))}</p>')
        parts.append(html.bullets(["Differences below the floor are not findings: this run has no floor."],
                                  "missing"))
        return "\n".join(parts)
    verdict = cal.get("verdict") or "unknown"
    reasons = cal.get("reasons") or []
    if verdict == "noisy":
        words = f"Verdict: noisy. {len(reasons)} {'measure' if len(reasons) == 1 else 'measures'} past their limits:"
    elif verdict == "quiet":
        words = "Verdict: quiet. Every measure was within its limit."
    else:
        words = f"Verdict: {verdict}."
    parts.append(f'<p class="verdict {html.esc(verdict)}"><strong>{html.esc(words)}</strong></p>')
    if reasons:
        parts.append(html.bullets(reasons, "warnings"))
    parts.append(html.table(figures(cal)))
    missing = cal.get("not_measured") or []
    if missing:
        parts.append("<p>Not measured (judges nothing):</p>" + html.bullets(missing, "missing"))
    parts.append(f'<p class="finding floor-rule">{html.esc(_rule(run, cal))}</p>')
    return "\n".join(parts)
