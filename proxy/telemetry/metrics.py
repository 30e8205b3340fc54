"""Prometheus metrics, on a registry owned by the app (no module-level state).

With `server.workers` > 1 each worker starts with `PROMETHEUS_MULTIPROC_DIR` set, so
prometheus_client keeps every value in a memory-mapped file of that directory (about half a
microsecond more per update, measured) and the supervisor's `GroupMetrics` sums them: counters
and histograms over every worker that ever ran (a replaced worker's counts stay), the open
WebSocket gauge over the live ones.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from .number import InFlight, Number

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class LoopCounter(Counter):
    """A `Counter` updated from the event loop's thread only: plain numbers, no lock, no checks
    but the sign. prometheus_client exports it (same names, labels and text as a `Counter`)."""

    def _metric_init(self) -> None:
        self._value = Number()
        self._created = time.time()

    def plain(self) -> Number:
        """A labelled child's value, which code on the loop's thread may add to without a call
        (only ever a non-negative amount)."""
        value: Number = self._value
        return value

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        if amount < 0 or exemplar:
            super().inc(amount, exemplar)  # a negative amount refused as a Counter refuses it
            return
        try:
            self._value.value += amount
        except AttributeError:  # a labelled counter's parent: refused as a Counter refuses it
            super().inc(amount)


class LoopHistogram(Histogram):
    """A `Histogram` updated from the event loop's thread only: plain numbers and a bisection
    instead of a locked value per bucket and a loop over the bounds."""

    def _metric_init(self) -> None:
        self._created = time.time()
        self._sum = Number()
        self._buckets = [Number() for _ in self._upper_bounds]

    def plain_sum(self) -> Number:
        """A labelled child's sum, which code on the loop's thread may add to without a call."""
        value: Number = self._sum
        return value

    def plain_buckets(self) -> list[Number]:
        """A labelled child's bucket counts, one per upper bound (the last: +Inf)."""
        buckets: list[Number] = self._buckets
        return buckets

    def upper_bounds(self) -> list[float]:
        bounds: list[float] = self._upper_bounds
        return bounds

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar or amount != amount:  # NaN: in no bucket, as a Histogram counts it
            super().observe(amount, exemplar)
            return
        try:
            self._sum.value += amount
        except AttributeError:  # a labelled histogram's parent: refused as a Histogram does
            super().observe(amount)
            return
        # The first bucket whose upper bound is >= amount (the last bound is +Inf).
        bucket = self._buckets[bisect_left(self._upper_bounds, amount)]
        bucket.value += 1


class Metrics:
    """Every metric the sidecar exports; one instance per app."""

    def __init__(self) -> None:
        # No `*_created` series: one per labelled child, a timestamp no dashboard reads, and a
        # doubling of what every scrape carries. (prometheus_client's switch is process-wide.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The request path's metrics (updated on the event loop's thread only) as plain numbers;
        # under `server.workers`, prometheus_client's memory-mapped values (the supervisor sums
        # the files).
        shared = MULTIPROCESS_ENV in os.environ
        counter = Counter if shared else LoopCounter
        histogram = Histogram if shared else LoopHistogram
        self.requests = counter(
            "authproxy_requests",
            "Requests answered, by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.request_seconds = histogram(
            "authproxy_request_duration_seconds",
            "Time from request to response end.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = histogram(
            "authproxy_upstream_duration_seconds",
            "Upstream time to the answer's head, from the request's head written, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight_gauge = Gauge(
            "authproxy_requests_in_flight",
            "HTTP requests being answered now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.in_flight = InFlight(self.in_flight_gauge, shared)
        self.websocket_reauths = Counter(
            "authproxy_websocket_reauths",
            "In-band WebSocket re-authentications, by result: ok, refused, subject_changed.",
            ["result"],
            registry=r,
        )
        self.websocket_messages = counter(
            "authproxy_websocket_messages",
            "WebSocket messages relayed, by direction (in: client to upstream).",
            ["direction"],
            registry=r,
        )
        self.websocket_bytes = counter(
            "authproxy_websocket_bytes",
            "WebSocket payload bytes relayed, by direction (in: client to upstream).",
            ["direction"],
            registry=r,
        )
        self.upstream_errors = counter(
            "authproxy_upstream_errors",
            "Upstream failures, by kind.",
            ["kind"],
            registry=r,
        )
        self.auth = counter(
            "authproxy_auth",
            "Authentication outcomes, by method and result.",
            ["method", "result"],
            registry=r,
        )
        self.jwt_cache = counter(
            "authproxy_jwt_cache",
            "Verified-token cache lookups.",
            ["result"],
            registry=r,
        )
        self.jwks_fetches = Counter(
            "authproxy_jwks_fetches",
            "JWKS fetches, by provider and result.",
            ["provider", "result"],
            registry=r,
        )
        self.jwks_stale = Gauge(
            "authproxy_jwks_stale",
            "1 while a provider's keys are served stale after a failed refresh.",
            ["provider"],
            registry=r,
            multiprocess_mode="livemax",  # workers: 1 while any of them serves stale keys
        )
        self.jwks_stale_since = Gauge(
            "authproxy_jwks_stale_since_seconds",
            "Unix time a provider's JWKS fetches began failing (0 while fresh).",
            ["provider"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.jwks_unavailable = Gauge(
            "authproxy_jwks_unavailable",
            "1 once a provider's keys are staler than max_stale_s: its tokens get 503.",
            ["provider"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.introspections = Counter(
            "authproxy_introspections",
            "RFC 7662 introspection calls, by provider and result (active, inactive, error).",
            ["provider", "result"],
            registry=r,
        )
        self.introspection_cache = Counter(
            "authproxy_introspection_cache",
            "Introspection verdict cache lookups, by provider and result (hit, miss).",
            ["provider", "result"],
            registry=r,
        )
        self.api_key_reloads = Counter(
            "authproxy_api_key_reloads",
            "API key set reloads, by result.",
            ["result"],
            registry=r,
        )
        self.config_reloads = Counter(
            "authproxy_config_reloads",
            "Whole-config reloads (SIGHUP), by result: ok, unchanged, error.",
            ["result"],
            registry=r,
        )
        self.tls_reloads = Counter(
            "authproxy_tls_reloads",
            "Public listener certificate reloads (SIGHUP), by result.",
            ["result"],
            registry=r,
        )
        self.cors_refusals = Counter(
            "authproxy_cors_refusals",
            "Requests refused for CORS, by reason.",
            ["reason"],
            registry=r,
        )
        self.websockets_open = Gauge(
            "authproxy_websockets_open",
            "WebSocket sessions open now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.websocket_closes = Counter(
            "authproxy_websocket_closes",
            "WebSocket sessions ended, by close code.",
            ["code"],
            registry=r,
        )

        # Protecting the upstream (circuit breaker, load shedding, retries) and compression.
        self.circuit_state = Gauge(
            "authproxy_upstream_circuit_state",
            "The upstream circuit breaker: 0 closed, 1 open, 2 half-open.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.circuit_opens = Counter(
            "authproxy_upstream_circuit_opens",
            "Times the upstream circuit breaker opened.",
            registry=r,
        )
        self.shed = Counter(
            "authproxy_upstream_shed",
            "Requests answered 503 to protect the upstream, by reason.",
            ["reason"],
            registry=r,
        )
        self.retries = Counter(
            "authproxy_upstream_retries",
            "Requests re-sent to the upstream, by reason.",
            ["reason"],
            registry=r,
        )
        self.compressed = Counter(
            "authproxy_compressed_responses",
            "Responses compressed by the sidecar, by encoding.",
            ["encoding"],
            registry=r,
        )
        self.compression_bytes = Counter(
            "authproxy_compression_bytes",
            "Bytes of compressed responses, before ('in') and after ('out') compression.",
            ["direction"],
            registry=r,
        )
        self.rate_limited = Counter(
            "authproxy_rate_limited",
            "Requests and WebSocket handshakes refused by a [[rate_limits]] rule, by rule.",
            ["rule", "kind"],
            registry=r,
        )
        self.state_errors = Counter(
            "authproxy_state_errors",
            "Shared-state (Redis) operations that failed, by operation.",
            ["op"],
            registry=r,
        )
        self.state_fallbacks = Counter(
            "authproxy_state_fallbacks",
            "Requests decided by state.on_error because the shared state did not answer.",
            ["outcome"],
            registry=r,
        )
        self.revocations = Counter(
            "authproxy_revocations",
            "Revocations received (API key ids, JWT ids).",
            ["kind"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class GroupMetrics:
    """Every worker's metrics, read from the multiprocess directory: the supervisor's /metrics."""

    def __init__(self, directory: str) -> None:
        self._directory = directory
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=directory)  # type: ignore[no-untyped-call]

    def forget(self, pid: int) -> None:
        """A worker exited: its live gauges (open WebSockets) stop counting."""
        mark_process_dead(pid, self._directory)  # type: ignore[no-untyped-call]

    def render(self) -> bytes:
        return generate_latest(self.registry)
