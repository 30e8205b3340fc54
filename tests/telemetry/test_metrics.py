"""The request path's metrics as plain numbers (LoopCounter, LoopHistogram): exported exactly as
prometheus_client's own Counter and Histogram would be, and prometheus_client's own again under
`server.workers` (multiprocess files)."""

from __future__ import annotations

import math

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from proxy.telemetry import metrics as metrics_module
from proxy.telemetry.metrics import LoopCounter, LoopHistogram, Metrics

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# On a bound, between bounds, below the first, beyond the last, zero, negative.
AMOUNTS = (0.001, 0.0004, 0.0031, 0.1, 0.7, 60, 61.5, 0, -1, 1e9, 0.25, 2.5000001)


def _pair(kind: str) -> tuple[CollectorRegistry, CollectorRegistry, object, object]:
    disable_created_metrics()  # type: ignore[no-untyped-call]  # as Metrics() does
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    if kind == "counter":
        a: object = LoopCounter("x_requests", "Help text.", ["route", "status"], registry=ours)
        b: object = Counter("x_requests", "Help text.", ["route", "status"], registry=theirs)
    else:
        a = LoopHistogram("x_seconds", "Help.", ["route"], buckets=BUCKETS, registry=ours)
        b = Histogram("x_seconds", "Help.", ["route"], buckets=BUCKETS, registry=theirs)
    return ours, theirs, a, b


def test_a_loop_counter_is_exported_as_a_counter() -> None:
    ours, theirs, a, b = _pair("counter")
    assert isinstance(a, Counter) and isinstance(b, Counter)
    for route, status, amount in [("r1", "200", 1), ("r2", "404", 1), ("r1", "200", 2.5)]:
        a.labels(route, status).inc(amount)
        b.labels(route, status).inc(amount)
    a.labels("never", "0")
    b.labels("never", "0")
    assert generate_latest(ours) == generate_latest(theirs)
    assert ours.get_sample_value("x_requests_total", {"route": "r1", "status": "200"}) == 3.5


def test_a_loop_counter_refuses_what_a_counter_refuses() -> None:
    _, _, a, _ = _pair("counter")
    assert isinstance(a, Counter)
    with pytest.raises(ValueError):
        a.labels("r", "200").inc(-1)
    with pytest.raises(ValueError):
        a.inc()  # a labelled counter's parent
    child = a.labels("r", "200")
    child.inc(1, exemplar={"trace_id": "abc"})
    assert child._value.get_exemplar() is not None


def test_a_loop_histogram_is_exported_as_a_histogram() -> None:
    ours, theirs, a, b = _pair("histogram")
    assert isinstance(a, Histogram) and isinstance(b, Histogram)
    for i, amount in enumerate(AMOUNTS):
        a.labels(f"r{i % 3}").observe(amount)
        b.labels(f"r{i % 3}").observe(amount)
    assert generate_latest(ours) == generate_latest(theirs)


def test_nan_is_counted_as_a_histogram_counts_it() -> None:
    ours, theirs, a, b = _pair("histogram")
    assert isinstance(a, Histogram) and isinstance(b, Histogram)
    a.labels("r").observe(math.nan)
    b.labels("r").observe(math.nan)
    assert generate_latest(ours) == generate_latest(theirs)


def test_the_request_path_metrics_are_plain_in_one_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(metrics_module.MULTIPROCESS_ENV, raising=False)
    m = Metrics()
    for metric in (m.requests, m.upstream_errors, m.auth, m.jwt_cache):
        assert type(metric) is LoopCounter
    for histogram in (m.request_seconds, m.upstream_seconds):
        assert type(histogram) is LoopHistogram


def test_workers_keep_prometheus_multiprocess_values(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    from prometheus_client import values

    monkeypatch.setenv(metrics_module.MULTIPROCESS_ENV, str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    m = Metrics()
    for metric in (m.requests, m.upstream_errors, m.auth, m.jwt_cache):
        assert type(metric) is Counter
    for histogram in (m.request_seconds, m.upstream_seconds):
        assert type(histogram) is Histogram
    m.requests.labels("r", "200").inc()
    m.request_seconds.labels("r").observe(0.002)
    from prometheus_client.multiprocess import MultiProcessCollector

    group = CollectorRegistry()
    MultiProcessCollector(group, path=str(tmp_path))  # type: ignore[no-untyped-call]
    assert group.get_sample_value("authproxy_requests_total", {"route": "r", "status": "200"}) == 1
    bucket = {"route": "r", "le": "0.0025"}
    assert group.get_sample_value("authproxy_request_duration_seconds_bucket", bucket) == 1


def test_a_loop_histogram_refuses_what_a_histogram_refuses() -> None:
    _, _, a, _ = _pair("histogram")
    assert isinstance(a, Histogram)
    with pytest.raises(ValueError):
        a.observe(1.0)  # a labelled histogram's parent
