"""OpenTelemetry span export to a real OTLP/HTTP receiver on a loopback port: the request span
continues the caller's trace, the auth and upstream spans are its children, and the upstream's
`traceparent` names the upstream span."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from proxy.auth.apikeys import hash_key
from tests.support.servers import ROOT, Process, free_port, start_sidecar, start_upstream

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
KEY = "ak_otel_test_key_0123456789abcdef"


class Collector:
    """An OTLP/HTTP trace receiver: every span it was sent, decoded."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                with collector.lock:
                    for resource in request.resource_spans:
                        service = {
                            a.key: a.value.string_value for a in resource.resource.attributes
                        }.get("service.name")
                        for scope in resource.scope_spans:
                            for s in scope.spans:
                                collector.spans.append(
                                    {
                                        "service": service,
                                        "name": s.name,
                                        "trace_id": s.trace_id.hex(),
                                        "span_id": s.span_id.hex(),
                                        "parent": s.parent_span_id.hex(),
                                        "kind": s.kind,
                                        "start": s.start_time_unix_nano,
                                        "end": s.end_time_unix_nano,
                                        "attributes": {a.key: a.value for a in s.attributes},
                                    }
                                )
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of_trace(self, trace_id: str, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = [s for s in self.spans if s["trace_id"] == trace_id]
            if len(found) >= count:
                return found
            assert time.monotonic() < deadline, f"{len(found)} of {count} spans arrived"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


BODY = f"""
[auth.api_keys]
header = "X-API-Key"
[[auth.api_keys.keys]]
id = "otel"
sha256 = "{hash_key(KEY)}"
[[routes]]
path = "/echo/*"
auth = ["api_key"]
[[routes]]
path = "/*"
auth = "public"
"""


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Process]:
    process = start_upstream("tests.support.upstreams:app", tmp_path)
    yield process
    process.stop()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


def tracing(endpoint: str, ratio: float = 1.0) -> str:
    return (
        f'[tracing]\notlp_endpoint = "{endpoint}"\nservice_name = "edge"\n'
        f"sample_ratio = {ratio}\nexport_interval_s = 0.2\n"
    )


def upstream_traceparent(r: httpx.Response) -> str:
    return str(dict(r.json()["headers"])["traceparent"])


def sampled(traceparent: str) -> bool:
    return bool(int(traceparent.rsplit("-", 1)[1], 16) & 1)  # bit 0; bit 1 says "random id"


def test_spans_continue_the_callers_trace_and_name_the_upstream_hop(
    tmp_path: Path, upstream: Process, collector: Collector
) -> None:
    sidecar = start_sidecar(
        tmp_path, upstream.port, BODY + tracing(f"http://127.0.0.1:{collector.port}")
    )
    try:
        r = httpx.get(
            sidecar.url + "/echo/span",
            headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "X-API-Key": KEY},
        )
        assert r.status_code == 200
        spans = {s["name"]: s for s in collector.of_trace(CALLER_TRACE, 3)}
        request = spans["GET /echo/*"]
        auth, hop = spans["authproxy.auth"], spans["authproxy.upstream"]
        assert request["parent"] == CALLER_SPAN and request["service"] == "edge"
        assert auth["parent"] == request["span_id"] and hop["parent"] == request["span_id"]
        assert request["start"] <= auth["start"] <= auth["end"] <= hop["start"]
        assert hop["end"] <= request["end"]
        assert request["attributes"]["http.response.status_code"].int_value == 200
        assert auth["attributes"]["authproxy.auth_method"].string_value == "api_key"
        # The upstream's parent is the upstream span, in the caller's (sampled) trace.
        assert upstream_traceparent(r) == f"00-{CALLER_TRACE}-{hop['span_id']}-01"
        assert KEY not in json.dumps([str(s) for s in collector.spans])
    finally:
        sidecar.stop()


def test_a_trace_the_sidecar_starts_is_sampled_by_ratio(
    tmp_path: Path, upstream: Process, collector: Collector
) -> None:
    kept_all = start_sidecar(
        tmp_path, upstream.port, BODY + tracing(f"http://127.0.0.1:{collector.port}")
    )
    unsampled = start_sidecar(
        tmp_path, upstream.port, BODY + tracing(f"http://127.0.0.1:{collector.port}", 0.0)
    )
    try:
        never = httpx.get(unsampled.url + "/open")
        assert not sampled(upstream_traceparent(never))
        never_trace = upstream_traceparent(never).split("-")[1]
        r = httpx.get(kept_all.url + "/open")
        trace_id = upstream_traceparent(r).split("-")[1]
        assert sampled(upstream_traceparent(r))
        spans = {x["name"]: x for x in collector.of_trace(trace_id, 2)}
        root = spans["GET /*"]
        assert root["parent"] == ""  # a root: nobody sent a context
        assert spans["authproxy.upstream"]["parent"] == root["span_id"]
        assert "authproxy.auth" not in spans  # a public route has no auth stage
        # The access line names the exported trace.
        lines = [json.loads(x) for x in kept_all.output().splitlines() if x.startswith("{")]
        assert any(x.get("trace_id") == trace_id for x in lines)
        # A caller's sampled trace is kept even at ratio 0 (parent-based) ...
        kept = httpx.get(
            unsampled.url + "/open", headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        )
        assert kept.status_code == 200
        collector.of_trace(CALLER_TRACE, 1)
        # ... while the trace it started itself was never exported.
        assert not [s for s in collector.spans if s["trace_id"] == never_trace]
    finally:
        kept_all.stop()
        unsampled.stop()


def test_an_unreachable_collector_never_slows_a_request(tmp_path: Path, upstream: Process) -> None:
    sidecar = start_sidecar(
        tmp_path, upstream.port, BODY + tracing(f"http://127.0.0.1:{free_port()}")
    )
    try:
        started = time.monotonic()
        for _ in range(50):
            assert httpx.get(sidecar.url + "/open").status_code == 200
        assert time.monotonic() - started < 10
        time.sleep(0.5)  # a few failed exports
        assert httpx.get(sidecar.url + "/open").status_code == 200
        assert "Traceback" not in sidecar.output()
    finally:
        assert sidecar.stop() == 0


def test_a_bad_endpoint_is_a_one_line_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(BODY + tracing("collector:4318"))
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "tracing.otlp_endpoint" in line
