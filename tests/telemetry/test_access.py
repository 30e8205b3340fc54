"""One access record, one writer: the same fields on every line, every answer counted once, and
only the upstream's failures counted as upstream errors."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from proxy.telemetry import logs
from proxy.telemetry.access import AccessLog, AccessRecord
from proxy.telemetry.metrics import Metrics


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logs.JsonLinesHandler(stream, flush_interval_s=0)
    access = logging.getLogger("authproxy.access")
    saved = (access.handlers[:], access.propagate, access.level)
    access.handlers[:] = [handler]
    access.propagate = False
    access.setLevel(logging.INFO)
    yield stream
    handler.drain()
    access.handlers[:], access.propagate, access.level = saved


def written(
    stream: io.StringIO, handler_owner: logging.Logger | None = None
) -> list[dict[str, object]]:
    handler = logging.getLogger("authproxy.access").handlers[0]
    assert isinstance(handler, logs.JsonLinesHandler)
    assert handler.drain()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def test_a_request_and_a_session_line_share_every_common_field(lines: io.StringIO) -> None:
    log = AccessLog(Metrics())
    log.emit(AccessRecord("r1", "GET", path="/api/✓", route="routes[0] /api/*", status=200))
    log.emit(
        AccessRecord(
            "r2",
            "GET",
            path="/ws/✓",
            route="routes[1] /ws/*",
            status=101,
            websocket=True,
            extra={"end": "client_closed"},
        )
    )
    request, session = written(lines)
    assert request["message"] == "request" and session["message"] == "websocket"
    common = set(request) - {"message", "time"}
    assert common <= set(session), common - set(session)
    assert session["method"] == "GET" and session["path"] == "/ws/✓"  # decoded, like requests


def test_only_the_upstreams_failures_count_as_upstream_errors(lines: io.StringIO) -> None:
    metrics = Metrics()
    log = AccessLog(metrics)
    for reason in ("connect_failed", "read_timeout", "aborted_mid_response"):
        log.emit(AccessRecord("r", "GET", status=502, error="bad_gateway", reason=reason))
    for reason in (None, "websocket_capacity", "keys_not_loaded", "client_concurrency"):
        log.emit(AccessRecord("r", "GET", status=503, error="service_unavailable", reason=reason))
    assert sample(metrics, "authproxy_upstream_errors_total", kind="connect_failed") == 1
    assert sample(metrics, "authproxy_upstream_errors_total", kind="aborted_mid_response") == 1
    assert sample(metrics, "authproxy_upstream_errors_total", kind="websocket_capacity") == 0
    assert sample(metrics, "authproxy_requests_total", route="-", status="503") == 4
    assert sample(metrics, "authproxy_request_duration_seconds_count", route="-") == 7


def test_records_are_counted_even_with_access_lines_off(lines: io.StringIO) -> None:
    metrics = Metrics()
    AccessLog(metrics, log_lines=False).emit(AccessRecord("r", "GET", status=204))
    assert sample(metrics, "authproxy_requests_total", route="-", status="204") == 1
    assert written(lines) == []
