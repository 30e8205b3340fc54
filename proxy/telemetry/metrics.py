"""Prometheus metrics, on a registry owned by the app (no module-level state).

With `server.workers` > 1 each worker starts with `PROMETHEUS_MULTIPROC_DIR` set, so
prometheus_client keeps every value in a memory-mapped file of that directory (about half a
microsecond more per update, measured) and the supervisor's `GroupMetrics` sums them: counters
and histograms over every worker that ever ran (a replaced worker's counts stay), the open
WebSocket gauge over the live ones.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Every metric the sidecar exports; one instance per app."""

    def __init__(self) -> None:
        # No `*_created` series: one per labelled child, a timestamp no dashboard reads, and a
        # doubling of what every scrape carries. (prometheus_client's switch is process-wide.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "authproxy_requests",
            "Requests answered, by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "authproxy_request_duration_seconds",
            "Time from request to response end.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "authproxy_upstream_errors",
            "Upstream failures, by kind.",
            ["kind"],
            registry=r,
        )
        self.auth = Counter(
            "authproxy_auth",
            "Authentication outcomes, by method and result.",
            ["method", "result"],
            registry=r,
        )
        self.jwt_cache = Counter(
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
        self.api_key_reloads = Counter(
            "authproxy_api_key_reloads",
            "API key set reloads, by result.",
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
