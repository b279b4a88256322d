"""Latency histograms: HDR (hdrhistogram) in microseconds, recorded in batches, merged exactly.

``HdrHistogram.record_value`` is pure Python, too slow to call once per
request at the rates the generator drives (docs/performance.md has its cost). The hot loop therefore appends each
latency, an int of microseconds, to an ``array.array`` of 64-bit ints
(``Recorder.values``: an append costs what a list's does); once per tick
``fold()`` reads that buffer as a numpy array without a copy and adds it to
the histogram's counts (the bucket index of every value computed at once, then
one ``bincount``). Every latency is recorded; only the bookkeeping is batched, and
a fold costs about the same whether the values are few and alike or many and
spread out (a lagging generator's): it is not a pause in the loop that drives
the load, which folding value by value was (milliseconds every few ticks).

Processes hand their histograms over encoded (the HdrHistogram V2 text form)
and ``merge`` adds the counts, so percentiles of a multi-process run are those
of all its requests, never an average of per-process percentiles.
"""
from __future__ import annotations

import math
from array import array

import numpy as np
from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000          # one hour; anything slower is clamped (and counted)
SIGNIFICANT_FIGURES = 3             # 0.1% value resolution
SUB_BUCKET_BITS = 11                # with 3 figures and a lowest of 1: 2048 sub-buckets, values below 2048 exact
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9), ("p9999", 99.99))


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def counts_index(values: np.ndarray) -> np.ndarray:
    """HdrHistogram's counts index of each value (its ``_counts_index_for``, for every value at once).

    A value's bucket is its bit length beyond the sub-bucket bits (0 below 2048), its sub-bucket the value
    shifted right by the bucket; the bit length comes from ``frexp``, exact for values below 2**53.
    """
    _, bits = np.frexp((values | ((1 << SUB_BUCKET_BITS) - 1)).astype(np.float64))
    bucket = bits.astype(np.int64) - SUB_BUCKET_BITS
    half = SUB_BUCKET_BITS - 1
    return ((bucket + 1) << half) + (values >> bucket) - (1 << half)


class Recorder:
    """A histogram fed in batches: the hot path only does ``values.append(us)``."""

    __slots__ = ("clamped", "histogram", "values")

    def __init__(self) -> None:
        self.histogram = new_histogram()
        self.values = array("q")         # the hot loop binds values.append: never rebind this array
        self.clamped = 0

    def fold(self) -> int:
        """Move the pending values into the histogram; return how many there were.

        A value over HIGHEST_US is recorded as HIGHEST_US and counted in ``clamped``; a negative one (a
        reply stamped a microsecond before its send, clock pairing) as 0.
        """
        values = self.values
        if not values:
            return 0
        pending = np.frombuffer(values, dtype=np.int64).clip(0)    # a copy: the buffer is emptied next
        del values[:]
        over = pending > HIGHEST_US
        if over.any():
            self.clamped += int(over.sum())
            pending[over] = HIGHEST_US
        histogram = self.histogram
        found = np.bincount(counts_index(pending))               # up to the highest index seen, no further
        counts = np.ctypeslib.as_array(histogram.counts)[:len(found)]
        counts += found.view(np.uint64)
        histogram.total_count += len(pending)
        histogram.min_value = min(histogram.min_value, int(pending.min()))
        histogram.max_value = max(histogram.max_value, int(pending.max()))
        return len(pending)

    @property
    def count(self) -> int:
        return self.histogram.get_total_count() + len(self.values)

    def reset(self) -> None:
        """Forget everything recorded so far (the end of the warm-up)."""
        del self.values[:]
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
