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

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Final

import orjson

from . import clock, logs
from .lines import LineBatch
from .metrics import Metrics
from .tally import Observer, Tally

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


@dataclass(slots=True, init=False)  # its own __init__: compiled (decision.Facts says why)
class AccessRecord:
    """What happened to one request (or WebSocket session), filled in as it goes."""

    request_id: str
    method: str
    started: float
    path: str
    query: str
    route: str
    status: int
    upstream_status: int | None
    bytes_in: int
    bytes_out: int
    auth_method: str | None
    subject: str | None
    origin: str | None
    client: str | None
    error: str | None
    reason: str | None
    websocket: bool
    trace_id: str | None  # W3C trace id (kept from the caller or started: tracing.py)
    upstream_seconds: float | None  # request head written -> answer head read
    # Kind-specific fields (preflight, client_gone, a session's messages and close codes).
    extra: dict[str, Any]

    def __init__(
        self,
        request_id: str,
        method: str,
        started: float | None = None,
        path: str = "",
        query: str = "",
        route: str = "-",
        status: int = 0,
        upstream_status: int | None = None,
        bytes_in: int = 0,
        bytes_out: int = 0,
        auth_method: str | None = None,
        subject: str | None = None,
        origin: str | None = None,
        client: str | None = None,
        error: str | None = None,
        reason: str | None = None,
        websocket: bool = False,
        trace_id: str | None = None,
        upstream_seconds: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.request_id = request_id
        self.method = method
        self.started = time.perf_counter() if started is None else started
        self.path = path
        self.query = query
        self.route = route
        self.status = status
        self.upstream_status = upstream_status
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.auth_method = auth_method
        self.subject = subject
        self.origin = origin
        self.client = client
        self.error = error
        self.reason = reason
        self.websocket = websocket
        self.trace_id = trace_id
        self.upstream_seconds = upstream_seconds
        self.extra = {} if extra is None else extra


class AccessLog:
    """Writes access records: the JSON line and the metrics, together."""

    def __init__(self, metrics: Metrics, *, log_lines: bool = True) -> None:
        self.metrics = metrics
        self.log_lines = log_lines
        # Metric children by (route, status): labels() per request costs more than the increment.
        self._series: dict[tuple[str, int], tuple[Tally, Observer]] = {}
        self._upstream_errors: dict[str, Any] = {}
        self._upstream_seconds: dict[str, Observer] = {}

    def emit(self, record: AccessRecord) -> None:
        duration = time.perf_counter() - record.started
        series = self._series.get((record.route, record.status))
        if series is None:
            series = self._series[(record.route, record.status)] = (
                Tally(self.metrics.requests.labels(record.route, str(record.status))),
                Observer(self.metrics.request_seconds.labels(record.route)),
            )
        series[0].add(1.0)
        series[1].observe(duration)
        if record.upstream_seconds is not None:
            upstream = self._upstream_seconds.get(record.route)
            if upstream is None:
                upstream = self._upstream_seconds[record.route] = Observer(
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
        # The whole line in one dict, in its order: `access_line` stamps the time.
        line: dict[str, Any] = {
            "time": "",
            "level": "info",
            "logger": _ACCESS_LOGGER,
            "message": "websocket" if record.websocket and "end" in record.extra else "request",
            "request_id": record.request_id,
            "method": record.method,
            "path": record.path,
            "query": record.query,
            "status": record.status,
            "duration_ms": _ms(duration),
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
            line["upstream_ms"] = _ms(record.upstream_seconds)
        if record.error is not None:
            line["error"] = record.error
            line["reason"] = record.reason
        if record.extra:
            line.update(record.extra)
        access_line(line)


def _ms(seconds: float) -> float:
    """Milliseconds to three decimals (`round(x * 1000, 3)`, without its decimal conversion: a
    microsecond of a request's CPU)."""
    if seconds < 0:  # never for a perf_counter difference; kept exact if it were
        return round(seconds * 1000, 3)
    return int(seconds * 1_000_000.0 + 0.5) / 1000


# Access lines are stamped to the millisecond: the second's text is made once a second.
_MILLIS = tuple(f".{n:03d}Z" for n in range(1000))


class _Stamp:
    def __init__(self) -> None:
        self.second = -1
        self.text = ""

    def now(self) -> str:
        """`clock.rfc3339_now()`, compiled, its second's text made once a second."""
        when = time.time()
        second = int(when)
        if second != self.second:
            self.text = clock.rfc3339(float(second))[:-5]  # "...T12:00:00" without ".000Z"
            self.second = second
        return self.text + _MILLIS[min(int((when - second) * 1000), 999)]


_STAMP = _Stamp()


# Read once: a module's attribute, read from compiled code, is a dictionary lookup each time.
_ACCESS: Final = logs.ACCESS
_ACCESS_LOGGER: Final = logs.ACCESS_LOGGER
_INFO: Final = logging.INFO
_DUMPS: Final = orjson.dumps
_APPEND_NEWLINE: Final = orjson.OPT_APPEND_NEWLINE


def access_line(line: dict[str, Any]) -> None:
    """Write one access-log line, given whole: `time` (stamped here), `level`, `logger` and
    `message` first, as `AccessLog.emit` builds it.

    Straight to the configured handler's batch (telemetry/lines.py), all compiled: per request,
    the logging module's record machinery (record, caller lookup, locks) cost more CPU than
    everything else in the line, and even its one-line calls (`isEnabledFor`, the handler's
    `add_line`), interpreted, cost a request 0.7 µs in a profile under load. orjson: 0.4 µs a
    line against 3.8 µs for the standard encoder, and the bytes it makes are written as they are.
    """
    logger = _ACCESS
    if not _info_enabled(logger):
        return
    handlers = logger.handlers
    # handler_of's first step inline: it is interpreted (logs.py), and the access logger has its
    # handler once logging is configured; otherwise it walks up to the one that logs.
    handler = handlers[0] if handlers else logs.handler_of(logger)
    if not isinstance(handler, logs.JsonLinesHandler):
        fields = dict(itertools.islice(line.items(), 4, None))
        logger.info(line["message"], extra={"fields": fields})
        return
    line["time"] = _STAMP.now()
    try:
        data = _DUMPS(line, default=str, option=_APPEND_NEWLINE)
    except orjson.JSONEncodeError:  # e.g. a lone surrogate: the standard encoder escapes it
        data = (logs.encode(line) + "\n").encode()
    batch: LineBatch = handler.batch
    batch.add(data)


def _info_enabled(logger: logging.Logger) -> bool:
    """`logger.isEnabledFor(logging.INFO)`, from the answer the logging module keeps for it
    (`Logger._cache`, cleared by `setLevel` and `logging.disable`); the method itself, which
    fills it, when there is none."""
    if logger.disabled:
        return False
    cache: Any = getattr(logger, "_cache", None)
    known = cache.get(_INFO) if cache is not None else None
    if known is None:
        return logger.isEnabledFor(_INFO)
    return bool(known)
