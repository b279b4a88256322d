"""The redis_call experiment read back: what one Redis round trip per request costs each model.

experiments.redis_call measures every model twice per round, paired: with the
rate limit's bucket in Redis (one EVALSHA round trip per request) and in memory
(none), everything else equal; the thread pools at their default size and at
Little's law's. Here:

* ``points(run)``: medians over the valid rounds per (case, store), a case being
  a variant, and for a pool its size ("default" or "little"), with the spreads
  ``derive.medians`` keeps;
* ``redis_call(run)``: one row per case. The cost of the round trip is paired
  per round (the two servers of a round met the same minute of the machine):
  ``delta_cpu_us`` = server CPU µs per request with Redis - without,
  ``delta_ctx`` the same for context switches, ``ratio_rps`` = throughput with
  Redis / without; each summarised over the rounds by harness.stats.spread
  (median, min, max, the 95 % interval of the median). ``cpu_verdict`` and
  ``rps_verdict`` rank the paired values against "no cost" (0 µs, 1x) with
  harness.stats.compare: "tie" when the interval holds it (within noise).
  Points with store errors (``rate_store_errors`` > 0) are invalid in the
  table already; ``store_errors`` sums them over every round, so the case says
  it was flagged. Redis's own CPU per request is the Redis points' median.
* ``finding(frame)``, ``draw(frame, finding)``, ``tables(run)``: the sentence,
  the chart (Δ CPU µs/request and the throughput ratio per case, whiskers min–max
  over rounds) and the tables under it; ``make(run)`` is the report's maker.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from conclab.experiments.harness import stats
from matplotlib.ticker import FuncFormatter

from . import derive, style
from .fmt import Builder, Finding, nothing, num
from .tables import MS_PER_US, caption, left_out, spread_table

TABLE = "redis_call"
STORES = ("redis", "memory")
VALUES = ["throughput_rps", "p50_us", "p99_us", "server_threads", "cpu_us_per_req", "ctx_per_req",
          "rate_store_calls", "rate_store_errors", "redis_cpu_us_per_req", "redis_rtt_us", "workers",
          "little_workers", "conns", "conns_served", "unanswered", "max_unanswered_wait_us", "errors",
          "redis_shares_loadgen_cpu"]
INTERVALS = ["throughput_rps_lo", "throughput_rps_hi"]
PAIRED = {"delta_cpu_us": ("cpu_us_per_req", "diff", 0.0), "delta_ctx": ("ctx_per_req", "diff", 0.0),
          "ratio_rps": ("throughput_rps", "ratio", 1.0)}
SUFFIXES = {"median": "", "min": "_min", "max": "_max", "ci_lo": "_lo", "ci_hi": "_hi", "n": "_n"}
SIZE_WORDS = {"default": "default size", "little": "Little's-law size"}


def case_label(variant: str, pool_size) -> str:
    """"asyncio"; a pool: "threadpool-request, Little's-law size"."""
    if pool_size is None or (isinstance(pool_size, float) and pd.isna(pool_size)) or pool_size == "":
        return variant
    return f"{variant}, {SIZE_WORDS.get(pool_size, pool_size)}"


def with_cases(t: pd.DataFrame) -> pd.DataFrame:
    labels = [case_label(v, p) for v, p in zip(t.variant, t.pool_size)] if not t.empty else []
    return t.assign(case=pd.Series(labels, index=t.index, dtype=object))


def points(run) -> pd.DataFrame:
    """Medians over the valid rounds per (variant, case, store)."""
    t = with_cases(run.tables[TABLE])
    return derive.medians(t, ["variant", "case", "store"], VALUES)


def paired(t: pd.DataFrame, column: str, how: str) -> dict:
    """case -> [Redis vs memory of ``column``, per round where both points are valid] (difference or ratio)."""
    if t.empty:
        return {}
    ok, _ = derive.validity(t)
    t = t[ok]
    side = {store: t[t.store == store].groupby(["case", "repeat"])[column].median() for store in STORES}
    values = side["redis"] - side["memory"] if how == "diff" else side["redis"] / side["memory"]
    values = values.replace([np.inf, -np.inf], np.nan).dropna()
    return {case: list(v) for case, v in values.groupby(level=0)}


def against_none(spread: dict | None, none: float) -> str | None:
    """A paired cost against no cost (0 µs, 1x): "higher", "lower", or "tie" when its interval holds it."""
    if not spread:
        return None
    return stats.compare(stats.interval(spread), stats.interval(none))


def redis_call(run) -> pd.DataFrame:
    """One row per case: both stores' medians, the paired costs with their spread and verdicts, validity."""
    t = with_cases(run.tables[TABLE])
    p = points(run)
    if p.empty:
        return pd.DataFrame(columns=["variant", "case", "delta_cpu_us", "ratio_rps", "valid", "invalid_reason"])
    pairs = {name: paired(t, column, how) for name, (column, how, _) in PAIRED.items()}
    rows = []
    for case in dict.fromkeys(t.case):
        mine = p[p.case == case]
        row = {"variant": mine.variant.iloc[0], "case": case,
               "pool_size": t[t.case == case].pool_size.iloc[0]}
        for store in STORES:
            side = mine[mine.store == store]
            for column in VALUES + INTERVALS:
                row[f"{column}_{store}"] = side[column].iloc[0] if not side.empty and column in side else None
        verdicts = {}
        for name, (_, _, none) in PAIRED.items():
            spread = stats.spread(pairs[name].get(case, []))
            for field, suffix in SUFFIXES.items():
                row[name + suffix] = spread[field] if spread else None
            verdicts[name] = against_none(spread, none)
        row["cpu_verdict"], row["rps_verdict"] = verdicts["delta_cpu_us"], verdicts["ratio_rps"]
        row["redis_cpu_us_per_req"] = row["redis_cpu_us_per_req_redis"]
        row["store_errors"] = pd.to_numeric(t[(t.case == case) & (t.store == "redis")].rate_store_errors,
                                            errors="coerce").fillna(0).sum()
        reasons = [r for r in mine.invalid_reason.dropna() if r]
        row["valid"] = bool(row["delta_cpu_us_n"])
        row["invalid_reason"] = None if row["valid"] else ("; ".join(dict.fromkeys(reasons)) or "no valid pair")
        rows.append(row)
    return derive.sort_variants(pd.DataFrame(rows))


# -- the sentence -----------------------------------------------------------------------------------

def _paired_piece(name: str, row, column: str, unit: str = "") -> tuple[str, dict]:
    """"{name}{unit} ({name_min}–{name_max})" and its facts: a paired value and its min–max over rounds."""
    facts = {name: row[column], f"{name}_min": row.get(column + "_min"), f"{name}_max": row.get(column + "_max"),
             f"{name}_n": row.get(column + "_n")}
    spread = "" if num(facts[f"{name}_min"]) == num(facts[f"{name}_max"]) else \
        " ({" + name + "_min}–{" + name + "_max})"
    return "{" + name + "}" + unit + spread, facts


VERDICT_WORDS = {stats.HIGHER: "more than none", stats.LOWER: "less than none", stats.TIE: "a tie with none, "
                 "within noise"}


def finding(frame: pd.DataFrame) -> Finding:
    """The cost of the round trip per model: the most and least extra CPU per request, the throughput ratios,
    ties said as ties, the pools at their two sizes, Redis's own CPU, flagged and left-out cases."""
    if frame.empty:
        return nothing("redis_call was not measured in this run")
    b = Builder()
    everything, frame = frame, derive.valid(frame)
    if frame.empty:
        _left_out(b, everything)
        return b.finding("redis_call has no case with both stores valid in one round")
    most = frame.loc[frame.delta_cpu_us.astype(float).idxmax()]
    least = frame.loc[frame.delta_cpu_us.astype(float).idxmin()]
    d1, f1 = _paired_piece("most", most, "delta_cpu_us", " µs")
    r1, g1 = _paired_piece("most_ratio", most, "ratio_rps", "×")
    d2, f2 = _paired_piece("least", least, "delta_cpu_us", " µs")
    r2, g2 = _paired_piece("least_ratio", least, "ratio_rps", "×")
    paired_note = " (paired per round, median (min–max) over {rounds} round(s))."
    if len(frame) == 1:
        b.add("One Redis round trip per request cost {most_case} +" + d1 + " of server CPU per request ("
              "{most_verdict}), throughput " + r1 + " of the memory store's" + paired_note,
              most_case=most.case, most_verdict=VERDICT_WORDS[most.cpu_verdict], rounds=most.delta_cpu_us_n,
              **f1, **g1)
        title = "A Redis round trip per request: +{most} µs of server CPU on {most_case}"
    else:
        b.add("One Redis round trip per request cost {most_case} the most server CPU, +" + d1 + " per request ("
              "{most_verdict}), throughput " + r1 + " of the memory store's; {least_case} the least, +" + d2
              + " ({least_verdict}), throughput " + r2 + paired_note,
              most_case=most.case, least_case=least.case, most_verdict=VERDICT_WORDS[most.cpu_verdict],
              least_verdict=VERDICT_WORDS[least.cpu_verdict], rounds=frame.delta_cpu_us_n.max(),
              **f1, **g1, **f2, **g2)
        title = "A Redis round trip per request: +{most} µs of server CPU on {most_case}, +{least} µs on {least_case}"
    ties = frame[frame.rps_verdict == stats.TIE]
    if not ties.empty:
        b.add("Throughput with and without Redis tie within noise for {tied}.", tied=", ".join(ties.case))
    _pools(b, frame)
    redis_cpu = frame.redis_cpu_us_per_req.dropna() if "redis_cpu_us_per_req" in frame else pd.Series(dtype=float)
    if not redis_cpu.empty:
        spent = "{redis_lo}" if num(redis_cpu.min()) == num(redis_cpu.max()) else "{redis_lo}–{redis_hi}"
        b.add("Redis itself spent " + spent + " µs of CPU per request (median per case), on the load "
              "generator's CPU{shared}.", redis_lo=redis_cpu.min(), redis_hi=redis_cpu.max(),
              shared=", which it shared with the generator" if everything.redis_shares_loadgen_cpu_redis.fillna(0)
              .astype(bool).any() else "")
    flagged = everything[everything.store_errors.fillna(0) > 0]
    if not flagged.empty:
        b.add("Flagged: {flagged} had store errors (verdicts not from Redis); those points are left out.",
              flagged=", ".join(f"{r.case} ({num(r.store_errors)})" for r in flagged.itertuples()))
    _left_out(b, everything)
    return b.finding(title)


def _pools(b: Builder, frame: pd.DataFrame) -> None:
    """Each pool's throughput with Redis at its default size against Little's law's size."""
    for variant in dict.fromkeys(frame[frame.pool_size.notna() & (frame.pool_size != "")].variant):
        mine = frame[frame.variant == variant].set_index("pool_size")
        if not {"default", "little"} <= set(mine.index):
            continue
        default, little = mine.loc["default"], mine.loc["little"]
        verdict = stats.compare(_rps_interval(little), _rps_interval(default))
        b.add("{v} with Redis: {w_little} workers (Little's law) {rps_little} rps, {verdict} {w_default} workers "
              "(its default size) {rps_default} rps.", prefix=f"{variant}.", v=variant,
              w_default=default.workers_redis, rps_default=default.throughput_rps_redis,
              w_little=little.workers_redis, rps_little=little.throughput_rps_redis,
              verdict={stats.HIGHER: "more than", stats.LOWER: "less than",
                       stats.TIE: "a tie within noise with"}[verdict])


def _rps_interval(row):
    """The Redis point's throughput interval: its median's 95 % interval, else the median alone."""
    lo, hi = row.get("throughput_rps_lo_redis"), row.get("throughput_rps_hi_redis")
    pair = stats.interval((lo, hi)) if lo is not None and pd.notna(lo) and pd.notna(hi) else None
    return pair or stats.interval(row.throughput_rps_redis)


def _left_out(b: Builder, frame: pd.DataFrame) -> None:
    bad = derive.invalid(frame)
    if not bad.empty:
        b.add("Left out, no round with both stores valid: {cases}.",
              cases="; ".join(f"{r.case} ({r.invalid_reason})" for r in bad.itertuples()))


# -- the chart ----------------------------------------------------------------------------------------

def draw(frame: pd.DataFrame, finding_: Finding):
    """Two panels per case: Δ server CPU µs per request (Redis - memory) and throughput Redis / memory, paired
    per round, whiskers min–max over rounds; invalid cases named so and left empty."""
    fig, axes = style.figure(ncols=2, wide=True)
    y = np.arange(len(frame))[::-1]
    ok = frame["valid"].astype(bool).to_numpy()
    colors = [style.color(v) for v in frame.variant]
    labels = [f"{case}{'' if good else ' (invalid)'}" for case, good in zip(frame.case, ok)]
    for ax, column, none, xlabel, fmt in (
            (axes[0][0], "delta_cpu_us", 0.0, "server CPU µs/request, with Redis - without",
             lambda v, _: num(v)),
            (axes[0][1], "ratio_rps", 1.0, "throughput, with Redis / without",
             lambda v, _: f"{num(v)}×")):
        values = frame[column].astype(float).fillna(0).to_numpy()
        ax.barh(y[ok], values[ok], color=[c for c, good in zip(colors, ok) if good])
        lo = (frame[column] - frame[column + "_min"]).astype(float).clip(lower=0).fillna(0).to_numpy()
        hi = (frame[column + "_max"] - frame[column]).astype(float).clip(lower=0).fillna(0).to_numpy()
        ax.errorbar(values[ok], y[ok], xerr=[lo[ok], hi[ok]], fmt="none", ecolor=style.NEUTRAL, capsize=3)
        ax.axvline(none, color=style.NEUTRAL, ls="--", lw=1.2)
        ax.set_yticks(y, labels if ax is axes[0][0] else [], fontsize=10)      # the cases named once, on the left
        ax.xaxis.set_major_formatter(FuncFormatter(fmt))
        ax.set_xlabel(xlabel + " (paired per round; whiskers: min–max)", fontsize=10)
    style.title(fig, finding_.title)
    return fig


def make(run):
    """The report's maker: (finding, draw() or None without data)."""
    frame = redis_call(run)
    f = finding(frame)
    return f, (lambda: draw(frame, f)) if not frame.empty else None


# -- the tables ---------------------------------------------------------------------------------------

def _spread_cell(row, name: str, unit: str = "") -> str:
    if pd.isna(row.get(name)):
        return "–"
    lo, hi = row.get(name + "_min"), row.get(name + "_max")
    spread = f" ({num(lo)}–{num(hi)})" if pd.notna(lo) and num(lo) != num(hi) else ""
    return f"{num(row[name])}{unit}{spread}, {int(row[name + '_n'])} round(s)"


def tables(run) -> list:
    frame = redis_call(run)
    if frame.empty:
        return []
    shown = pd.DataFrame({
        "case": frame.case,
        "workers": [_pair(r, "workers") for _, r in frame.iterrows()],
        "rps with / without Redis": [_pair(r, "throughput_rps") for _, r in frame.iterrows()],
        "throughput ratio": [_spread_cell(r, "ratio_rps", "×") for _, r in frame.iterrows()],
        "p50 ms with / without": [_pair(r, "p50_us", MS_PER_US) for _, r in frame.iterrows()],
        "p99 ms with / without": [_pair(r, "p99_us", MS_PER_US) for _, r in frame.iterrows()],
        "threads with / without": [_pair(r, "server_threads") for _, r in frame.iterrows()],
        "Δ CPU µs/req": [_spread_cell(r, "delta_cpu_us") for _, r in frame.iterrows()],
        "CPU verdict": frame.cpu_verdict.map(lambda v: VERDICT_WORDS.get(v, "–")),
        "Δ switches/req": [_spread_cell(r, "delta_ctx") for _, r in frame.iterrows()],
        "Redis CPU µs/req": frame.redis_cpu_us_per_req.map(num),
        "store calls / errors": [f"{num(r.rate_store_calls_redis)} / {num(r.store_errors)}"
                                 for r in frame.itertuples()],
        "valid": ["yes" if ok else f"no: {why}" for ok, why in zip(frame.valid, frame.invalid_reason)]})
    p = points(run)
    labelled = p.assign(point=[f"{r.case}, {r.store}" for r in p.itertuples()])
    little = p[p.little_workers.notna()] if "little_workers" in p else p.iloc[0:0]
    out = [(caption("One Redis round trip per request, per model: medians over rounds (with / without); paired "
                    "costs per round, median (min–max); Redis pinned to the load generator's CPU", p), shown)]
    if not little.empty:
        out.append((("Little's law per pool: workers = memory-store rps x (CPU µs/request + Redis round trip), "
                     "medians over rounds"), _little_table(run)))
    out += [spread_table(labelled, "point", "case, store"), left_out(labelled, "point", "case, store")]
    return out


def _little_table(run) -> pd.DataFrame:
    t = run.tables[TABLE]
    t = t[t.little_workers.notna()]
    out = t.groupby("variant")[["little_rate_rps", "little_service_us", "redis_rtt_us", "little_workers",
                                "workers"]].median().reset_index()
    return out.rename(columns={"little_rate_rps": "rate to keep (rps)", "little_service_us": "service µs",
                               "redis_rtt_us": "Redis round trip µs", "little_workers": "Little's law",
                               "workers": "workers run"})


def _pair(row, column: str, scale: float = 1.0) -> str:
    a, b = row.get(f"{column}_redis"), row.get(f"{column}_memory")
    return " / ".join(num(v * scale) if v is not None and pd.notna(v) else "–" for v in (a, b))


def experiment_tables(run, experiment: str) -> list:
    """(caption, frame) pairs under redis_call's chart; [] for any other experiment."""
    return tables(run) if experiment == TABLE else []
