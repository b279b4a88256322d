"""Numbers as the report prints them, and ``Finding``: a sentence whose every number comes from data.

A finding is built from a template and named facts (``say``): the facts keep
the exact values (tests compare them with the tables), the text shows them
through ``num``, so a sentence can never state a number the data does not
have. There is no canned text with numbers in it anywhere in the report.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

MISSING = "–"               # what an unmeasured cell shows
INTEGER_LIMIT = 1e15        # whole numbers below this print without decimals (50, not 50.0)


def is_number(value) -> bool:
    """A finite real number, numpy's included (bools are not numbers here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def num(value, digits: int = 3) -> str:
    """A number for people, 3 significant digits: 12,345 / 123 / 12.3 / 1.5 / 0.0123; missing -> "–"."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    if isinstance(value, str):
        return value
    value = float(value)
    if value == 0:
        return "0"
    if value.is_integer() and abs(value) < INTEGER_LIMIT:
        return f"{int(value):,}"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude >= digits - 1:
        return f"{round(value):,}"
    decimals = digits - 1 - magnitude
    return f"{value:,.{decimals}f}".rstrip("0").rstrip(".")        # 2.50 -> 2.5, 34.0 -> 34


def ratio(value) -> str:
    """A ratio, two significant digits at least: 0.57x, 1.0x, 12x."""
    return MISSING if not is_number(value) else f"{num(value, 2)}×"


def ms(us) -> str:
    """Microseconds shown as milliseconds."""
    return MISSING if not is_number(us) else f"{num(us / 1000)} ms"


def mib(kib) -> str:
    return MISSING if not is_number(kib) else f"{num(kib / 1024)} MiB"


@dataclass
class Finding:
    """What a chart or table shows, in words: ``text`` for the page, ``title`` for the chart."""
    title: str
    text: str
    facts: dict = field(default_factory=dict)

    @property
    def numbers(self) -> dict:
        return {k: v for k, v in self.facts.items() if is_number(v)}


def shown(facts: dict) -> dict:
    """Facts as the text shows them: numbers through num(), the rest as they are."""
    return {k: (num(v) if is_number(v) else v) for k, v in facts.items()}


class Builder:
    """A Finding built piece by piece; ``prefix`` keeps the facts of repeated pieces apart."""

    def __init__(self) -> None:
        self.parts: list = []
        self.facts: dict = {}

    def add(self, template: str, prefix: str = "", **facts) -> None:
        self.parts.append(template.format(**shown(facts)))
        self.facts.update({prefix + k: v for k, v in facts.items()})

    def finding(self, title: str, **title_facts) -> Finding:
        self.facts.update(title_facts)
        return Finding(title=title.format(**shown(self.facts)), text=" ".join(self.parts), facts=dict(self.facts))


def say(title: str, text: str, **facts) -> Finding:
    """A one-piece Finding: both templates' {name} fields filled from facts."""
    b = Builder()
    b.add(text, **facts)
    return b.finding(title)


def nothing(what: str) -> Finding:
    """The finding of a chart that has no data."""
    return Finding(title=what, text=what, facts={})
