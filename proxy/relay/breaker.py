"""The circuit breaker in front of the upstream (`[upstream.circuit_breaker]`), as Envoy's outlier
detection and most service meshes do it: after `failure_threshold` consecutive failures (a
connection that could not be made, a timeout, a 5xx answer) the upstream is left alone for
`open_s` and every request gets 503 at once; then one probe request is let through (half-open),
and its answer closes the breaker or opens it again.

Sans-I/O: the forwarder asks `admit()` before an exchange and reports the answer's head (or the
failure) once; the clock is passed in so a test can drive it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from ..errors import ServiceUnavailable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
# The gauge's value per state (authproxy_upstream_circuit_state).
STATE_VALUE = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}


class CircuitBreaker:
    """Consecutive-failure breaker with a single half-open probe."""

    __slots__ = (
        "threshold",
        "open_s",
        "state",
        "failures",
        "opened_at",
        "probing",
        "_clock",
        "_changed",
        "opens",
    )

    def __init__(
        self,
        threshold: int,
        open_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        changed: Callable[[str], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.open_s = open_s
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probing = False
        self.opens = 0
        self._clock = clock
        self._changed = changed

    def admit(self) -> bool:
        """Let a request through (True when it is the half-open probe) or raise the 503."""
        if self.state == CLOSED:
            return False
        if self.state == OPEN:
            left = self.opened_at + self.open_s - self._clock()
            if left > 0:
                raise _refused(left)
            self._set(HALF_OPEN)
        if self.probing:
            raise _refused(1.0)
        self.probing = True
        return True

    def record(self, ok: bool, probe: bool) -> None:
        """The outcome of an admitted exchange: its answer's head, or its failure."""
        if probe:
            self.probing = False
        if ok:
            self.failures = 0
            # Only the probe closes it: an exchange admitted before it opened that ends well
            # now says nothing about the upstream of the last `open_s`.
            if probe and self.state != CLOSED:
                self._set(CLOSED)
            return
        self.failures += 1
        if probe or (self.state == CLOSED and self.failures >= self.threshold):
            self.opened_at = self._clock()
            self.opens += 1
            self._set(OPEN)

    def abandon(self, probe: bool) -> None:
        """An admitted exchange ended with no verdict on the upstream (the client left first)."""
        if probe:
            self.probing = False

    def details(self) -> dict[str, object]:
        """What /readyz shows."""
        out: dict[str, object] = {"state": self.state, "consecutive_failures": self.failures}
        if self.state == OPEN:
            out["retry_in_s"] = round(max(0.0, self.opened_at + self.open_s - self._clock()), 3)
        return out

    def _set(self, state: str) -> None:
        self.state = state
        if self._changed is not None:
            self._changed(state)


def _refused(left: float) -> ServiceUnavailable:
    return ServiceUnavailable(
        "the upstream is failing; requests are held back for a while",
        retry_after_s=max(1, math.ceil(left)),
        details={"reason": "circuit_open"},
    )
