"""The lab's statistics, in one place: a median over rounds, its spread, its interval, and rankings.

Every number the lab quotes is a median over interleaved rounds (``--repeat`` /
the profile's ``rounds``). ``spread(values)`` gives that median with what an
expert needs to trust it: min, max, n and a 95 % interval of the median,
``ci_lo`` .. ``ci_hi``:

* n >= ``MIN_BOOTSTRAP_N`` (3): a percentile bootstrap of the median,
  ``RESAMPLES`` (2,000) resamples with replacement drawn from a fixed seed
  (``SEED``), so the same values always give the same interval. With so few
  rounds the bootstrap median can only be one of the values, and the interval
  is often [min, max]: the honest answer for 3 to 5 rounds.
* n < 3: no resampling makes sense; the interval is [min, max] and ``ci_flag``
  says so (``CI_MIN_MAX``). With one round it is a single point: no noise was
  measured, which is not the same as none.

``compare(a, b)`` is the one rule for ranking two measured values: "higher" or
"lower" only when their intervals do not overlap, else "tie" (within noise).
A plain number counts as a point interval (a model's ceiling, a claim's figure).
The report (analysis.derive.compare_medians) and the summaries use these and
nothing else; ``harness.fit.spread`` is this ``spread``.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

LEVEL = 0.95                # the interval's coverage
RESAMPLES = 2_000           # bootstrap resamples
SEED = 20_240_601           # fixed: the same values always give the same interval
MIN_BOOTSTRAP_N = 3         # below this the interval is [min, max] (flagged)
CI_BOOTSTRAP = "bootstrap"  # ci_flag of an interval from resampling
CI_MIN_MAX = "min-max"      # ci_flag when n < MIN_BOOTSTRAP_N: the interval is [min, max]
HIGHER, LOWER, TIE = "higher", "lower", "tie"
FIELDS = ("median", "min", "max", "n", "ci_lo", "ci_hi", "ci_flag")


def numbers(values) -> list:
    """The finite numbers among values (None, "", NaN, text and infinities dropped)."""
    out = []
    for value in values:
        if value is None or value == "" or isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out.append(number)
    return out


@lru_cache(maxsize=64)
def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """The resampling plan for n values: the same (seeded) for every group of n values."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def median_interval(values, level: float = LEVEL, resamples: int = RESAMPLES,
                    seed: int = SEED) -> tuple[float, float, str] | None:
    """(lo, hi, flag): a ``level`` interval of the median of values (see the module doc); None without values."""
    data = np.sort(np.asarray(numbers(values), dtype=float))
    if data.size == 0:
        return None
    if data.size < MIN_BOOTSTRAP_N:
        return float(data[0]), float(data[-1]), CI_MIN_MAX
    medians = np.median(data[_resample_indices(int(data.size), resamples, seed)], axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(medians, [tail, 1.0 - tail], method="inverted_cdf")
    return float(lo), float(hi), CI_BOOTSTRAP


def spread(values) -> dict | None:
    """median, min, max, n and the interval of the median (``FIELDS``) of the numeric values; None if none."""
    data = numbers(values)
    if not data:
        return None
    lo, hi, flag = median_interval(data)
    return {"median": float(np.median(data)), "min": min(data), "max": max(data), "n": len(data),
            "ci_lo": lo, "ci_hi": hi, "ci_flag": flag}


def interval(value) -> tuple[float, float] | None:
    """(lo, hi) of a spread dict, a pandas row/dict with ci_lo/ci_hi (or min/max), a (lo, hi) pair or a number."""
    if value is None:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return (float(value), float(value)) if math.isfinite(float(value)) else None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        lo, hi = numbers([value[0]]), numbers([value[1]])
        return (lo[0], hi[0]) if lo and hi else None
    get = value.get if hasattr(value, "get") else (lambda key, default=None: getattr(value, key, default))
    for lo_key, hi_key in (("ci_lo", "ci_hi"), ("min", "max")):
        lo, hi = numbers([get(lo_key, None)]), numbers([get(hi_key, None)])
        if lo and hi:
            return lo[0], hi[0]
    median = numbers([get("median", None)])
    return (median[0], median[0]) if median else None


def compare(a, b) -> str:
    """"higher" if a's interval lies wholly above b's, "lower" if wholly below, else "tie" (within noise).

    a and b: anything ``interval`` reads (a spread, a row with ci_lo/ci_hi, a (lo, hi) pair, a number).
    Unknown on either side: "tie" (nothing is ranked on a missing number).
    """
    ia, ib = interval(a), interval(b)
    if ia is None or ib is None:
        return TIE
    if ia[0] > ib[1]:
        return HIGHER
    if ia[1] < ib[0]:
        return LOWER
    return TIE
