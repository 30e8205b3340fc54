"""REST forwarding through a real sidecar to a real upstream: what the upstream receives, what the
client gets back."""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from proxy.auth.apikeys import hash_key
from tests.support.rawhttp import raw_request
from tests.support.servers import Process, Sidecar, free_port, start_sidecar
from tests.support.upstreams import _pattern


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, upstream: Process) -> Iterator[Sidecar]:
    s = start_sidecar(
        tmp_path_factory.mktemp("sidecar"), upstream.port, server="max_body_bytes = 1048576"
    )
    yield s
    s.stop()


def received_headers(report: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in report["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


def assert_error(response: httpx.Response | Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status if hasattr(response, "status_code") else True
    body: dict[str, Any] = response.json()
    assert body["error"] == code
    assert set(body) == {"error", "message", "details", "request_id", "timestamp"}
    assert body["timestamp"].endswith("Z") and "T" in body["timestamp"]
    assert body["message"]
    return body


def test_upstream_receives_exact_path_and_query_bytes(sidecar: Sidecar) -> None:
    query = "b=%20x&a=1&c=%2F&d&e=%E2%9C%93&f=a+b&g=%25"
    r = httpx.get(f"{sidecar.url}/echo/models?{query}")
    assert r.status_code == 200
    report = r.json()
    assert report["raw_path"] == "/echo/models"
    assert report["query_string"] == query


def test_path_is_sent_in_the_canonical_form_that_was_judged(sidecar: Sidecar) -> None:
    r = raw_request(sidecar.port, b"/%65cho/%41b%7E?x=%41")
    assert r.status == 200
    report = r.json()
    assert report["raw_path"] == "/echo/Ab~"
    assert report["query_string"] == "x=%41"  # the query is never rewritten


def test_hop_by_hop_and_connection_named_headers_are_removed(sidecar: Sidecar) -> None:
    r = raw_request(
        sidecar.port,
        b"/echo/h",
        headers=[
            (b"Connection", b"keep-alive, X-Private-Hop, X-Auth-Subject"),
            (b"X-Private-Hop", b"secret"),
            (b"Keep-Alive", b"timeout=5"),
            (b"TE", b"trailers"),
            (b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="),
            (b"Trailer", b"X-Checksum"),
            (b"X-Kept", b"yes"),
        ],
    )
    seen = received_headers(r.json())
    for gone in (
        "connection",
        "x-private-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "trailer",
        "x-auth-subject",
    ):
        assert gone not in seen, gone
    assert seen["x-kept"] == ["yes"]


def test_spoofed_identity_and_forwarding_headers_never_reach_the_upstream(sidecar: Sidecar) -> None:
    r = httpx.get(
        f"{sidecar.url}/echo/spoof",
        headers={
            "X-Auth-Subject": "admin@example.com",
            "X-Auth-Method": "jwt",
            "X-Auth-Scopes": "models:write",
            "X-Auth-Issuer": "evil",
            "x-auth-anything": "1",
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example",
            "Forwarded": "for=6.6.6.6",
            "X-Real-IP": "6.6.6.6",
            "True-Client-IP": "6.6.6.6",
            "CF-Connecting-IP": "6.6.6.6",
            "X-Client-IP": "6.6.6.6",
            # what oauth2-proxy, Apache and nginx auth_request set for their upstreams
            "Remote-User": "admin",
            "X-Remote-User": "admin",
            "X-Forwarded-User": "admin",
            "X-Forwarded-Email": "admin@example.com",
            "X-Forwarded-Groups": "admins",
            "X-Forwarded-Preferred-Username": "admin",
            "X-Forwarded-Access-Token": "stolen",
        },
    )
    seen = received_headers(r.json())
    assert not [k for k in seen if k.startswith("x-auth-")]
    for gone in (
        "true-client-ip",
        "cf-connecting-ip",
        "x-client-ip",
        "remote-user",
        "x-remote-user",
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-groups",
        "x-forwarded-preferred-username",
        "x-forwarded-access-token",
    ):
        assert gone not in seen, gone
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == [f"127.0.0.1:{sidecar.port}"]
    assert "forwarded" not in seen and "x-real-ip" not in seen


def test_headers_that_would_reroute_the_request_upstream_are_removed(sidecar: Sidecar) -> None:
    r = httpx.get(
        f"{sidecar.url}/echo/read",
        headers={
            "X-HTTP-Method-Override": "DELETE",
            "X-HTTP-Method": "DELETE",
            "X-Method-Override": "DELETE",
            "X-Original-URL": "/admin",
            "X-Rewrite-URL": "/admin",
            "X-Original-URI": "/admin",
            "X-Forwarded-Uri": "/admin",
            "X-Forwarded-Prefix": "/admin",
            "X-Script-Name": "/admin",
            "X-Forwarded-Method": "DELETE",
        },
    )
    seen = received_headers(r.json())
    for gone in (
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-uri",
        "x-forwarded-uri",
        "x-forwarded-prefix",
        "x-script-name",
        "x-forwarded-method",
        "x-original-url",
        "x-rewrite-url",
    ):
        assert gone not in seen, gone


def test_trusted_proxy_forwarding_headers_are_extended(tmp_path: Path, upstream: Process) -> None:
    s = start_sidecar(tmp_path, upstream.port, server='trusted_proxies = ["127.0.0.0/8"]')
    try:
        r = httpx.get(
            f"{s.url}/echo/t",
            headers={
                "X-Forwarded-For": "203.0.113.7",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "app.example.com",
            },
        )
        seen = received_headers(r.json())
        assert seen["x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
        assert seen["x-forwarded-proto"] == ["https"]
        assert seen["x-forwarded-host"] == ["app.example.com"]
    finally:
        s.stop()


def test_host_is_the_upstreams_and_the_original_goes_in_x_forwarded_host(
    sidecar: Sidecar, upstream: Process
) -> None:
    r = httpx.get(f"{sidecar.url}/echo/host", headers={"Host": "api.example.com"})
    seen = received_headers(r.json())
    assert seen["host"] == [f"127.0.0.1:{upstream.port}"]
    assert seen["x-forwarded-host"] == ["api.example.com"]


def test_sane_request_id_is_kept_and_returned(sidecar: Sidecar) -> None:
    r = httpx.get(f"{sidecar.url}/echo/id", headers={"X-Request-ID": "abc-123.def_9"})
    assert r.headers["x-request-id"] == "abc-123.def_9"
    assert received_headers(r.json())["x-request-id"] == ["abc-123.def_9"]


def test_insane_request_id_is_replaced(sidecar: Sidecar) -> None:
    r = httpx.get(f"{sidecar.url}/echo/id", headers={"X-Request-ID": "x" * 300})
    generated = r.headers["x-request-id"]
    assert generated != "x" * 300 and len(generated) == 32
    assert received_headers(r.json())["x-request-id"] == [generated]


def test_response_hop_by_hop_headers_are_removed(sidecar: Sidecar) -> None:
    r = httpx.get(f"{sidecar.url}/hop")
    assert r.headers["x-total-count"] == "42"
    assert "x-upstream-private" not in r.headers
    assert "keep-alive" not in r.headers


def test_redirects_are_passed_through_not_followed(sidecar: Sidecar) -> None:
    r = httpx.get(f"{sidecar.url}/redirect", follow_redirects=False)
    assert r.status_code == 302
    assert r.headers["location"] == "/echo/target"


def test_head_204_and_304_have_no_body(sidecar: Sidecar) -> None:
    head = raw_request(sidecar.port, b"/download?size=1000", method=b"HEAD")
    assert head.status == 200 and head.header("content-length") == "1000" and head.body == b""
    for status in (204, 304):
        r = raw_request(sidecar.port, b"/status/%d" % status)
        assert r.status == status and r.body == b""
        assert r.header("etag") == '"v1"'


def test_post_body_arrives_intact(sidecar: Sidecar) -> None:
    payload = b'{"name": "llama"}' * 100
    r = httpx.post(f"{sidecar.url}/echo/p", content=payload)
    report = r.json()
    assert report["method"] == "POST"
    assert report["body_sha256"] == hashlib.sha256(payload).hexdigest()


def test_chunked_upstream_response_arrives_intact(sidecar: Sidecar) -> None:
    r = httpx.get(f"{sidecar.url}/download?size=300000&chunked=1")
    assert r.content == _pattern(300000)


def test_server_sent_events_arrive_one_by_one(sidecar: Sidecar) -> None:
    arrivals = []
    with httpx.stream("GET", f"{sidecar.url}/sse?n=4&delay=0.4", timeout=10) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                arrivals.append((time.monotonic(), line))
    assert [line for _, line in arrivals] == ["data: 0", "data: 1", "data: 2", "data: 3"]
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert all(gap > 0.25 for gap in gaps), gaps  # not delivered all at once at the end


def test_upstream_down_is_502(tmp_path: Path) -> None:
    s = start_sidecar(tmp_path, free_port())
    try:
        r = httpx.get(f"{s.url}/anything")
        body = assert_error(r, 502, "bad_gateway")
        assert body["request_id"] == r.headers["x-request-id"]
    finally:
        s.stop()


def test_slow_upstream_is_504(tmp_path: Path, upstream: Process) -> None:
    s = start_sidecar(tmp_path, upstream.port, upstream="read_timeout_s = 0.5")
    try:
        started = time.monotonic()
        r = httpx.get(f"{s.url}/slow?delay=3", timeout=10)
        assert_error(r, 504, "gateway_timeout")
        assert time.monotonic() - started < 2.5
    finally:
        s.stop()


def test_body_over_the_limit_with_content_length_is_413(sidecar: Sidecar) -> None:
    r = httpx.post(f"{sidecar.url}/upload", content=b"x" * (1048576 + 1))
    assert_error(r, 413, "payload_too_large")


def test_chunked_body_over_the_limit_is_413(sidecar: Sidecar) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(f"{sidecar.url}/upload", content=chunks())
    assert_error(r, 413, "payload_too_large")


@pytest.mark.parametrize(
    "target",
    [
        b"/echo/../secret",
        b"/echo/./x",
        b"/echo/%2e%2e/secret",
        b"/echo/%2E%2e/secret",
        b"/echo%2fsecret",
        b"/echo%2Fsecret",
        b"/echo%5csecret",
        b"/echo\\secret",
        b"/echo//secret",
        b"/echo/%00",
        b"/echo/%ff",
        b"/echo/%252e%252e/x",
        b"/echo/..",
        b"/echo/%252fx",
        b"/auth/..;/echo/x",
        b"/echo/x;jsessionid=1",
    ],
)
def test_unsafe_paths_are_refused_with_400(sidecar: Sidecar, target: bytes) -> None:
    r = raw_request(sidecar.port, target)
    assert r.status == 400, (target, r.status, r.body)
    assert r.json()["error"] == "bad_request"


def test_utf8_header_bytes_reach_the_upstream_unchanged(sidecar: Sidecar) -> None:
    r = raw_request(sidecar.port, b"/echo/u", headers=[(b"X-Name", "café".encode())])
    assert r.status == 200
    seen = received_headers(r.json())  # the upstream reports header bytes as latin-1
    assert seen["x-name"] == ["café".encode().decode("latin-1")]


def test_a_header_that_is_not_utf8_is_400_not_re_encoded(sidecar: Sidecar) -> None:
    r = raw_request(sidecar.port, b"/echo/u", headers=[(b"X-Name", b"caf\xe9")])
    assert r.status == 400
    assert r.json()["details"]["reason"] == "header_encoding"


def test_headers_over_the_limit_are_400(sidecar: Sidecar) -> None:
    r = httpx.get(f"{sidecar.url}/echo/x", headers={"X-Big": "a" * 70_000})
    body = assert_error(r, 400, "bad_request")
    assert body["details"]["reason"] == "headers_too_large"
    assert httpx.get(f"{sidecar.url}/echo/x", headers={"X-Big": "a" * 8_000}).status_code == 200


def test_no_matching_route_is_404(tmp_path: Path, upstream: Process) -> None:
    s = start_sidecar(
        tmp_path,
        upstream.port,
        body="""
        [[routes]]
        path = "/api/*"
        auth = "public"
        """,
    )
    try:
        assert httpx.get(f"{s.url}/api/x").status_code == 200
        body = assert_error(httpx.get(f"{s.url}/other"), 404, "not_found")
        assert body["details"]["path"] == "/other"
        # "/api/*" covers what is below /api/, not /api itself
        assert httpx.get(f"{s.url}/api").status_code == 404
    finally:
        s.stop()


def test_route_methods_restrict_the_match(tmp_path: Path, upstream: Process) -> None:
    s = start_sidecar(
        tmp_path,
        upstream.port,
        body="""
        [[routes]]
        path = "/echo/*"
        methods = ["GET"]
        auth = "public"
        """,
    )
    try:
        assert httpx.get(f"{s.url}/echo/x").status_code == 200
        assert httpx.head(f"{s.url}/echo/x").status_code == 200
        assert httpx.delete(f"{s.url}/echo/x").status_code == 404
    finally:
        s.stop()


def sidecar_rss(s: Sidecar) -> int:
    return int(psutil.Process(s.process.proc.pid).memory_info().rss)


@pytest.mark.slow
def test_100_mb_upload_streams_with_flat_memory(tmp_path: Path, upstream: Process) -> None:
    s = start_sidecar(tmp_path, upstream.port, server="max_body_bytes = 209715200")
    try:
        size = 100 * 1024 * 1024
        block = _pattern(1 << 20)
        digest = hashlib.sha256()
        peak = [sidecar_rss(s)]
        before = peak[0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak.append(sidecar_rss(s))
                time.sleep(0.05)

        def body() -> Iterator[bytes]:
            for _ in range(size // len(block)):
                digest.update(block)
                yield block

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            r = httpx.post(
                f"{s.url}/upload", content=body(), headers={"content-length": str(size)}, timeout=60
            )
        finally:
            stop.set()
            sampler.join()
        assert r.status_code == 200
        assert r.json() == {"sha256": digest.hexdigest(), "size": size}
        assert max(peak) - before < 40 * 1024 * 1024, (before, max(peak))
    finally:
        s.stop()


@pytest.mark.slow
def test_100_mb_download_streams_with_flat_memory(sidecar: Sidecar) -> None:
    size = 100 * 1024 * 1024
    before = sidecar_rss(sidecar)
    peak = before
    digest = hashlib.sha256()
    received = 0
    with httpx.stream("GET", f"{sidecar.url}/download?size={size}", timeout=60) as r:
        assert r.headers["content-length"] == str(size)
        for chunk in r.iter_raw(1 << 20):
            digest.update(chunk)
            received += len(chunk)
            if received % (8 << 20) < len(chunk):
                peak = max(peak, sidecar_rss(sidecar))
    assert received == size
    assert digest.hexdigest() == hashlib.sha256(_pattern(size)).hexdigest()
    assert peak - before < 40 * 1024 * 1024, (before, peak)


def test_sigterm_lets_in_flight_requests_finish_and_refuses_new_ones(
    tmp_path: Path, upstream: Process
) -> None:
    s = start_sidecar(tmp_path, upstream.port)
    result: dict[str, Any] = {}

    def slow() -> None:
        result["response"] = httpx.get(f"{s.url}/slow?delay=1.5", timeout=10)

    worker = threading.Thread(target=slow)
    worker.start()
    time.sleep(0.5)
    s.process.signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{s.url}/echo/new", timeout=2)
    worker.join()
    assert result["response"].status_code == 200
    assert result["response"].json() == {"slow": True}
    s.process.proc.wait(10)


def test_sigterm_stops_at_once_with_an_idle_keep_alive_connection_open(
    tmp_path: Path, upstream: Process
) -> None:
    # A keep-alive connection's requests run in one task that waits for the next between them
    # (http11.py): an idle one must neither hold the shutdown back nor be left pending.
    s = start_sidecar(tmp_path, upstream.port)
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
    try:
        conn.request("GET", "/echo/a")
        assert conn.getresponse().read() and conn.sock is not None
        sock = conn.sock
        conn.request("GET", "/echo/b")
        response = conn.getresponse()
        assert response.status == 200 and response.read()
        assert conn.sock is sock  # both on one connection, which stays open
        started = time.monotonic()
        s.process.signal(signal.SIGTERM)
        assert s.process.proc.wait(10) == 0
        assert time.monotonic() - started < 5  # not the keep-alive timeout, nor a hang
    finally:
        conn.close()
    log = s.output()
    assert "Task was destroyed but it is pending" not in log
    assert "Task exception was never retrieved" not in log


def test_each_request_on_a_keep_alive_connection_logs_under_its_own_request_id(
    tmp_path: Path, upstream: Process
) -> None:
    # The connection's requests share one task, and so one log context (http11.py): the second
    # request's refusal must be logged under its own id, never under the first's.
    key = "ak_keep_alive_0123456789"
    body = f"""
    [auth.api_keys]
    [[auth.api_keys.keys]]
    id = "bot"
    sha256 = "{hash_key(key)}"
    [[routes]]
    path = "/*"
    auth = ["api_key"]
    """
    s = start_sidecar(tmp_path, upstream.port, body)
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
    try:
        conn.request("GET", "/echo/a", headers={"X-API-Key": key})
        first = conn.getresponse()
        assert first.status == 200 and first.read() and conn.sock is not None
        sock = conn.sock
        conn.request("GET", "/echo/b", headers={"X-API-Key": key + "x"})
        second = conn.getresponse()
        assert second.status == 401 and second.read()
        assert conn.sock is sock  # one connection
        ids = first.headers["x-request-id"], second.headers["x-request-id"]
        assert ids[0] != ids[1]
        lines = []
        for _ in range(50):
            lines = [json.loads(line) for line in s.output().splitlines() if "auth_refused" in line]
            if lines:
                break
            time.sleep(0.05)
        assert [line.get("request_id") for line in lines] == [ids[1]]
    finally:
        conn.close()
        s.stop()


def test_admin_endpoints_live_on_the_admin_listener_only(sidecar: Sidecar) -> None:
    assert httpx.get(f"{sidecar.admin_url}/healthz").status_code == 200
    ready = httpx.get(f"{sidecar.admin_url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    httpx.get(f"{sidecar.url}/echo/m")
    metrics = httpx.get(f"{sidecar.admin_url}/metrics").text
    assert "authproxy_requests_total" in metrics
    # the public listener forwards these paths like any other: the upstream answers, not admin
    r = httpx.get(f"{sidecar.url}/metrics")
    assert "authproxy_requests_total" not in r.text


def test_access_lines_are_batched_but_written_within_the_flush_interval(
    tmp_path: Path, upstream: Process
) -> None:
    s = start_sidecar(tmp_path, upstream.port, env={"AUTHPROXY__LOGGING__FLUSH_INTERVAL_S": "0.3"})
    try:
        with httpx.Client() as client:
            for i in range(50):
                client.get(f"{s.url}/echo/batch", headers={"X-Request-ID": f"batch-{i}"})
        sent = time.monotonic()
        while True:
            ids = {
                line.get("request_id")
                for line in map(json.loads, filter(None, s.output().splitlines()))
                if line.get("message") == "request"
            }
            if {f"batch-{i}" for i in range(50)} <= ids:
                break
            assert time.monotonic() - sent < 2.0, "access lines were not written in time"
            time.sleep(0.02)
    finally:
        s.stop()


def test_one_json_access_line_per_request_without_credentials(sidecar: Sidecar) -> None:
    httpx.get(
        f"{sidecar.url}/echo/log?token=supersecret&x=1",
        headers={"X-Request-ID": "log-check-1", "Authorization": "Bearer sekret.tok.en"},
    )
    time.sleep(0.2)
    lines = [json.loads(line) for line in sidecar.output().splitlines() if line.startswith("{")]
    access = [
        line
        for line in lines
        if line.get("request_id") == "log-check-1" and line.get("message") == "request"
    ]
    assert len(access) == 1
    entry = access[0]
    assert entry["status"] == 200 and entry["path"] == "/echo/log"
    for key in (
        "method",
        "duration_ms",
        "bytes_in",
        "bytes_out",
        "upstream_status",
        "origin",
        "auth_method",
        "subject",
    ):
        assert key in entry
    assert "supersecret" not in sidecar.output() and "sekret" not in sidecar.output()
