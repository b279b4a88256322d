"""Latency histograms: HDR (hdrhistogram) in microseconds, recorded in batches, merged exactly.

``HdrHistogram.record_value`` is pure Python, too slow to call once per
request at the rates the generator drives (docs/performance.md has its cost). The hot loop therefore appends each
latency, an int of microseconds, to a plain list (``Recorder.values``); once
per tick ``fold()`` counts the list with ``collections.Counter`` (C speed) and
records each *distinct* value once with ``record_value(value, count)``. Every
latency is recorded; only the bookkeeping is batched.

Processes hand their histograms over encoded (the HdrHistogram V2 text form)
and ``merge`` adds the counts, so percentiles of a multi-process run are those
of all its requests, never an average of per-process percentiles.
"""
from __future__ import annotations

import math
from collections import Counter

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000          # one hour; anything slower is clamped (and counted)
SIGNIFICANT_FIGURES = 3             # 0.1% value resolution
EXACT_BELOW = 2048                  # with 3 figures, HDR keeps every value below this apart (its sub-bucket count)
SPREAD = 256                        # more distinct values than this in one fold: group them by HDR bucket first
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9), ("p9999", 99.99))


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def bucketed(counts: Counter) -> Counter:
    """``counts`` with values of EXACT_BELOW and up grouped by the HDR bucket they fall in (its lowest value),
    when there are many distinct ones. The histogram puts them in those buckets anyway; grouping first makes
    one record_value call per bucket instead of per value. That matters when the generator lags: latencies
    then spread out, nearly every one distinct, and folding them one by one (~1 µs each) would lag it more."""
    if len(counts) <= SPREAD:
        return counts
    grouped = Counter()
    for value, count in counts.items():
        if value >= EXACT_BELOW:
            shift = value.bit_length() - EXACT_BELOW.bit_length() + 1
            value = value >> shift << shift
        grouped[value] += count
    return grouped


class Recorder:
    """A histogram fed in batches: the hot path only does ``values.append(us)``."""

    __slots__ = ("clamped", "histogram", "values")

    def __init__(self) -> None:
        self.histogram = new_histogram()
        self.values: list[int] = []      # the hot loop binds values.append: never rebind this list
        self.clamped = 0

    def fold(self) -> int:
        """Move the pending values into the histogram; return how many there were."""
        values = self.values
        if not values:
            return 0
        record = self.histogram.record_value
        for value, count in bucketed(Counter(values)).items():
            if not record(value, count):
                record(HIGHEST_US, count)
                self.clamped += count
        pending = len(values)
        values.clear()
        return pending

    @property
    def count(self) -> int:
        return self.histogram.get_total_count() + len(self.values)

    def reset(self) -> None:
        """Forget everything recorded so far (the end of the warm-up)."""
        self.values.clear()
        self.histogram.reset()
        self.clamped = 0

    def encode(self) -> str:
        self.fold()
        return encode(self.histogram)


def encode(histogram: HdrHistogram) -> str:
    """The histogram in HdrHistogram's compressed V2 text form (base64)."""
    return histogram.encode().decode("ascii")


def decode(text: str) -> HdrHistogram:
    histogram = new_histogram()
    histogram.decode_and_add(text)
    return histogram


def merge(encoded: list[str]) -> HdrHistogram:
    """One histogram whose every bucket count is the sum of the inputs' (exact)."""
    total = new_histogram()
    for text in encoded:
        if text:
            total.decode_and_add(text)
    return total


def summary(histogram: HdrHistogram) -> dict:
    """p50 p90 p99 p999 p9999 max (µs) plus count and mean; zeros when empty.

    One pass over the counts (hdrh's own percentile iterator is pure Python
    per bucket and takes a good fraction of a second per histogram).
    """
    count = histogram.get_total_count()
    if not count:
        return {name: 0 for name, _ in PERCENTILES} | {"max": 0, "mean": 0.0, "count": 0}
    targets = [(name, max(1, math.ceil(p / 100 * count))) for name, p in PERCENTILES]
    result, seen, pending = {}, 0, iter(targets)
    name, target = next(pending)
    for index, n in enumerate(histogram.counts):
        if not n:
            continue
        seen += n
        while seen >= target:
            result[name] = histogram.get_highest_equivalent_value(histogram.get_value_from_index(index))
            name, target = next(pending, (None, math.inf))
        if name is None:
            break
    result["max"] = histogram.get_max_value()
    result["mean"] = round(histogram.get_mean_value(), 1)
    result["count"] = count
    return result
