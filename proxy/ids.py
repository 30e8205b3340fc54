"""Request ids: 32 hex digits, unique in practice, without a system call per request.

A Mersenne Twister seeded from the OS once per process (and again in a forked child) costs a
fraction of a microsecond an id (128 random bits as little-endian bytes, in hex: what
`randbytes(16).hex()` gives) against ~0.7 µs for `os.urandom` under load; ids are correlation
handles, not secrets, and unlike a counter they say nothing about how busy the sidecar is.
"""

from __future__ import annotations

import os
import random


class RequestIds:
    """A source of request ids; one per process."""

    def __init__(self) -> None:
        self._random = random.Random(os.urandom(32))
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._random.seed(os.urandom(32))

    # `getrandbits(n).to_bytes(...)` is what `Random.randbytes` does, without its interpreted
    # frame (this module is compiled).
    def new(self) -> str:
        """32 hex digits."""
        return self._random.getrandbits(128).to_bytes(16, "little").hex()

    def span(self) -> str:
        """16 hex digits, never all zero (a W3C span id)."""
        span = self._random.getrandbits(64).to_bytes(8, "little").hex()
        return span if span != _ZERO_SPAN else "1" + span[1:]


_ZERO_SPAN = "0" * 16
_IDS = RequestIds()
new_request_id = _IDS.new
new_span_id = _IDS.span
