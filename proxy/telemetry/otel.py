"""Optional OpenTelemetry export (OTLP over HTTP): a server span per request, with a child span for
the auth stage and one for the upstream exchange. Off unless `[tracing] otlp_endpoint` is set, and
then it needs the `otel` extra (`pip install 'authproxy[otel]'`); nothing here is imported
otherwise.

The request span continues the caller's trace (its `traceparent`) or starts one; the upstream gets
a `traceparent` naming the upstream span, sampled as the sampler decided (parent-based: a caller's
decision is kept, a new trace is sampled at `sample_ratio`). Spans leave in batches from the SDK's
own thread; an unreachable collector costs dropped spans, never a slower request.
"""

from __future__ import annotations

import time
from typing import Any

_NS = 1_000_000_000


class MissingExtra(RuntimeError):
    """The `otel` extra is not installed."""


class Exporter:
    """Builds and exports the spans of the requests; one per process."""

    def __init__(
        self,
        endpoint: str,
        *,
        service_name: str,
        sample_ratio: float,
        export_interval_s: float,
    ) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        except ImportError as exc:
            raise MissingExtra(str(exc)) from None
        self._trace = trace
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        )
        self._provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces", timeout=5),
                schedule_delay_millis=export_interval_s * 1000,
                max_queue_size=8192,  # beyond it spans are dropped, memory stays bounded
            )
        )
        self._tracer = self._provider.get_tracer("authproxy")
        # Perf-counter readings become wall-clock nanoseconds with one offset.
        self._offset_ns = time.time_ns() - int(time.perf_counter() * _NS)

    def wall_ns(self, perf: float) -> int:
        return self._offset_ns + int(perf * _NS)

    def request_span(self, name: str, traceparent: bytes | None, started: float) -> Any:
        """The request's server span, child of the caller's span when it sent a valid context
        (`traceparent` as the sidecar keeps it), else a new trace's root."""
        trace = self._trace
        context = None
        if traceparent is not None:
            parts = traceparent.split(b"-")
            parent = trace.SpanContext(
                trace_id=int(parts[1], 16),
                span_id=int(parts[2], 16),
                is_remote=True,
                trace_flags=trace.TraceFlags(int(parts[3], 16)),
            )
            context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
        return self._tracer.start_span(
            name, context=context, kind=trace.SpanKind.SERVER, start_time=self.wall_ns(started)
        )

    def child_span(self, parent: Any, name: str, started: float, *, client: bool = False) -> Any:
        trace = self._trace
        kind = trace.SpanKind.CLIENT if client else trace.SpanKind.INTERNAL
        return self._tracer.start_span(
            name,
            context=trace.set_span_in_context(parent),
            kind=kind,
            start_time=self.wall_ns(started),
        )

    @staticmethod
    def traceparent(span: Any) -> tuple[str, bytes]:
        """The trace id and the `traceparent` that makes `span` the upstream's parent."""
        c = span.get_span_context()
        trace_id = f"{c.trace_id:032x}"
        return trace_id, f"00-{trace_id}-{c.span_id:016x}-{int(c.trace_flags):02x}".encode()

    def end(self, span: Any, ended: float, attributes: dict[str, Any], error: bool) -> None:
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if error:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
        span.end(end_time=self.wall_ns(ended))

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout), then stop."""
        self._provider.shutdown()
