"""Time stamps as RFC 3339 UTC with millisecond precision (log lines, error bodies)."""

from __future__ import annotations

import functools
import time


@functools.lru_cache(maxsize=8)
def _second(second: int) -> str:
    # strftime and gmtime once a second, not once a line.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def rfc3339(when: float) -> str:
    """A Unix time as RFC 3339 UTC with millisecond precision (error bodies and log lines)."""
    second = int(when)
    return f"{_second(second)}.{int((when - second) * 1000):03d}Z"


def rfc3339_now() -> str:
    """The current UTC time as RFC 3339 with millisecond precision."""
    return rfc3339(time.time())
