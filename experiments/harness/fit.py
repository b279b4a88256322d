"""Least-squares line fits and medians: the arithmetic behind memory_fit.csv and summary.csv.

The median, its spread and its interval are harness.stats' (``spread`` below is ``stats.spread``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .stats import spread  # noqa: F401  (the one median-and-interval: median, min, max, n, ci_lo, ci_hi, ci_flag)


@dataclass(frozen=True)
class Line:
    slope: float          # e.g. KiB per connection
    intercept: float      # e.g. KiB of the idle server
    r2: float             # coefficient of determination (1.0: every point on the line)
    n: int


def least_squares(xs, ys) -> Line | None:
    """Ordinary least squares y = slope * x + intercept; None with fewer than 2 distinct x."""
    points = [(float(x), float(y)) for x, y in zip(xs, ys) if _number(x) and _number(y)]
    n = len(points)
    if n < 2:
        return None
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    ss_tot = sum((y - mean_y) ** 2 for _, y in points)
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in points)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return Line(slope, intercept, r2, n)


def _number(value) -> bool:
    if value is None or value == "":
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
