"""One access record per request or WebSocket session, emitted through one function to the log and
the metrics, so a field means the same thing on every line and every answer is counted once.

- `path` is the judged, decoded path (what the route matched), on request and session lines alike;
  `method` is on both (a WebSocket handshake is a GET).
- `duration_ms` and the request-duration histogram cover every answer: forwarded requests,
  preflights, the sidecar's own refusals, handshakes refused and sessions relayed.
- `authproxy_upstream_errors` counts the upstream's failures only (connect, timeout, disconnect,
  an invalid or aborted answer), never the sidecar's own 503s (draining, no keys yet, capacity).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from . import logs
from .metrics import Metrics

# The `reason`s that are the upstream's failure (relay/upstream.py, relay/http.py).
UPSTREAM_FAILURES = frozenset(
    {
        "connect_failed",
        "connect_timeout",
        "pool_timeout",
        "read_timeout",
        "upstream_disconnected",
        "upstream_error",
        "aborted_mid_response",
    }
)


@dataclass(slots=True)
class AccessRecord:
    """What happened to one request (or WebSocket session), filled in as it goes."""

    request_id: str
    method: str
    started: float = field(default_factory=time.perf_counter)
    path: str = ""
    query: str = ""
    route: str = "-"
    status: int = 0
    upstream_status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    auth_method: str | None = None
    subject: str | None = None
    origin: str | None = None
    client: str | None = None
    error: str | None = None
    reason: str | None = None
    websocket: bool = False
    trace_id: str | None = None  # W3C trace id (kept from the caller or started: tracing.py)
    upstream_seconds: float | None = None  # request head written -> answer head read
    # Kind-specific fields (preflight, client_gone, a session's messages and close codes).
    extra: dict[str, Any] = field(default_factory=dict)


class AccessLog:
    """Writes access records: the JSON line and the metrics, together."""

    def __init__(self, metrics: Metrics, *, log_lines: bool = True) -> None:
        self.metrics = metrics
        self.log_lines = log_lines
        # Metric children by (route, status): labels() per request costs more than the increment.
        self._series: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._upstream_errors: dict[str, Any] = {}
        self._upstream_seconds: dict[str, Any] = {}

    def emit(self, record: AccessRecord) -> None:
        duration = time.perf_counter() - record.started
        series = self._series.get((record.route, record.status))
        if series is None:
            series = self._series[(record.route, record.status)] = (
                self.metrics.requests.labels(record.route, str(record.status)),
                self.metrics.request_seconds.labels(record.route),
            )
        series[0].inc()
        series[1].observe(duration)
        if record.upstream_seconds is not None:
            upstream = self._upstream_seconds.get(record.route)
            if upstream is None:
                upstream = self._upstream_seconds[record.route] = (
                    self.metrics.upstream_seconds.labels(record.route)
                )
            upstream.observe(record.upstream_seconds)
        if record.reason in UPSTREAM_FAILURES:
            counter = self._upstream_errors.get(record.reason)
            if counter is None:
                counter = self._upstream_errors[record.reason] = (
                    self.metrics.upstream_errors.labels(record.reason)
                )
            counter.inc()
        if not self.log_lines:
            return
        # The whole line in one dict, in its order: `logs.access_line` stamps the time.
        line: dict[str, Any] = {
            "time": "",
            "level": "info",
            "logger": logs.ACCESS_LOGGER,
            "message": "websocket" if record.websocket and "end" in record.extra else "request",
            "request_id": record.request_id,
            "method": record.method,
            "path": record.path,
            "query": record.query,
            "status": record.status,
            "duration_ms": round(duration * 1000, 3),
            "bytes_in": record.bytes_in,
            "bytes_out": record.bytes_out,
            "auth_method": record.auth_method,
            "subject": record.subject,
            "origin": record.origin,
            "upstream_status": record.upstream_status,
            "route": record.route,
            "client": record.client,
            "trace_id": record.trace_id,
        }
        if record.upstream_seconds is not None:
            line["upstream_ms"] = round(record.upstream_seconds * 1000, 3)
        if record.error is not None:
            line["error"] = record.error
            line["reason"] = record.reason
        if record.extra:
            line.update(record.extra)
        logs.access_line(line)
