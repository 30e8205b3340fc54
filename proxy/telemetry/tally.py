"""Request-path metric updates, compiled: a labelled child bound once, then added to per request.

In one process the children are plain numbers (metrics.py `LoopCounter`, `LoopHistogram`, whose
values are number.py's compiled `Number`): added to here as fields, without a call into their
interpreted methods (a few tenths of a microsecond each, a request updates several). Under
`server.workers` they are prometheus_client's own, memory-mapped values, and updated through
their methods.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from .metrics import LoopCounter, LoopHistogram
from .number import Number


class Tally:
    """A counter's child."""

    def __init__(self, child: Any) -> None:
        self.child = child
        self.number: Number | None = child.plain() if isinstance(child, LoopCounter) else None

    def add(self, amount: float = 1.0) -> None:
        """Count `amount` (never negative)."""
        number = self.number
        if number is not None:
            number.value += amount
        else:
            self.child.inc(amount)


class Observer:
    """A histogram's child."""

    def __init__(self, child: Any) -> None:
        self.child = child
        plain = isinstance(child, LoopHistogram)
        self.sum: Number | None = child.plain_sum() if plain else None
        self.buckets: list[Number] = child.plain_buckets() if plain else []
        self.bounds: list[float] = list(child.upper_bounds()) if plain else []

    def observe(self, amount: float) -> None:
        total = self.sum
        if total is None or amount != amount:  # NaN: counted as the histogram counts it
            self.child.observe(amount)
            return
        total.value += amount
        # The first bucket whose upper bound is >= amount (the last bound is +Inf).
        self.buckets[bisect_left(self.bounds, amount)].value += 1
