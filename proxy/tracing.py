"""W3C Trace Context (`traceparent`, `tracestate`): a valid context from the caller is kept and
passed upstream, a missing or invalid one is replaced by a new trace, so every request the upstream
receives carries one and every access line names its trace.

The sidecar records no spans of its own (it exports none), so a kept context goes upstream
unchanged: the caller's span stays the upstream's parent, as the specification asks of a
participant that does not trace. A started trace reuses the request id as its trace id when that
is one of the sidecar's own (32 hex digits), so the two correlate at a glance, and is marked not
sampled: the sidecar took no sampling decision.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# version-traceid-parentid-flags, lowercase hex (https://www.w3.org/TR/trace-context/#traceparent-header)
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = b"0" * 32
_ZERO_PARENT = b"0" * 16
MAX_TRACESTATE_BYTES = 512  # the specification's floor for what must be passed on
_TRACESTATE_CHARS = re.compile(rb"[\x20-\x7e]*")


class Trace:
    """A request's trace: its id (for the access line) and the headers the upstream gets."""

    # A class of this compiled module, not a NamedTuple or a dataclass: one is made per request,
    # and theirs is built by interpreted code.
    __slots__ = ("trace_id", "traceparent", "tracestate", "started")

    def __init__(
        self,
        trace_id: str,
        traceparent: bytes,
        tracestate: bytes | None = None,
        started: bool = False,  # the sidecar began it (the caller sent none, or an invalid one)
    ) -> None:
        self.trace_id = trace_id
        self.traceparent = traceparent
        self.tracestate = tracestate
        self.started = started

    def __repr__(self) -> str:
        return (
            f"Trace(trace_id={self.trace_id!r}, traceparent={self.traceparent!r}, "
            f"tracestate={self.tracestate!r}, started={self.started!r})"
        )


def trace_of(
    traceparent: bytes | None,
    tracestate: bytes | None,
    own_id: str | None,
    new_id: Callable[[], str],
    new_span: Callable[[], str],
) -> Trace:
    """The trace of a request that arrived with these headers (None: absent; b"": sent twice,
    which the specification makes invalid). `own_id`: the request id when the sidecar made it
    (32 random hex digits, a fine trace id), None when the client sent its own. `new_id` and
    `new_span`: 32 and 16 random hex digits, the span id never all zero (`proxy.ids`)."""
    if traceparent:
        m = _TRACEPARENT.match(traceparent)
        # Version ff is invalid; version 00 is exactly 55 characters; a later version may add
        # fields after a "-", and its first four are read as version 00's.
        if m is not None and (
            (m[1] == b"00" and len(traceparent) == 55)
            or (m[1] not in (b"00", b"ff") and traceparent[55:56] in (b"", b"-"))
        ):
            trace_id, parent, flags = m[2], m[3], m[4]
            if trace_id != _ZERO_TRACE and parent != _ZERO_PARENT:
                header = b"00-" + trace_id + b"-" + parent + b"-" + flags
                return Trace(trace_id.decode(), header, _tracestate(tracestate))
    # A new trace; the caller's tracestate goes with its invalid traceparent.
    trace = own_id or new_id()
    return Trace(trace, f"00-{trace}-{new_span()}-00".encode(), None, True)


def _tracestate(value: bytes | None) -> bytes | None:
    """What of the caller's tracestate is passed on: all of it, unless it is longer than the
    specification obliges anyone to carry or holds bytes it cannot (then none)."""
    if not value or len(value) > MAX_TRACESTATE_BYTES or not _TRACESTATE_CHARS.fullmatch(value):
        return None
    return value
