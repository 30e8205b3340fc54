"""A metric's value as a plain float, compiled (telemetry/tally.py adds to it on the request path).

prometheus_client's value takes a lock per update (for threads), ~0.7 µs of the ~1 µs an increment
cost; the request path's metrics are only ever updated on the event loop's thread. Compiled, its
`value` is a C double in the object: an update from compiled code is a field's addition, where an
interpreted object's attribute cost a lookup and a new float each time.
"""

from __future__ import annotations

from typing import Any


class Number:
    """prometheus_client's value interface (`inc`, `set`, `get`, exemplars), without a lock."""

    def __init__(self) -> None:
        self.value = 0.0
        self.exemplar: Any = None

    def inc(self, amount: float) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = value

    def get(self) -> float:
        return self.value

    def set_exemplar(self, exemplar: Any) -> None:
        self.exemplar = exemplar

    def get_exemplar(self) -> Any:
        return self.exemplar


class InFlight:
    """Requests being answered (entered and left by every request, compiled here with `Number`).
    In one process a plain int the gauge reads when scraped (no lock per request); under
    `server.workers` the gauge itself, since prometheus' multiprocess files cannot call back into
    a process."""

    def __init__(self, gauge: Any, shared: bool) -> None:
        self.now = 0
        self._gauge = gauge
        self._shared = shared  # metrics.py: prometheus_client's multiprocess mode
        if not shared:
            gauge.set_function(self.read)

    def read(self) -> int:
        return self.now

    def enter(self) -> None:
        if self._shared:
            self._gauge.inc()
        else:
            self.now += 1

    def leave(self) -> None:
        if self._shared:
            self._gauge.dec()
        else:
            self.now -= 1
