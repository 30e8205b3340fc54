"""Issue 11's attacks on the edge, replayed against a real sidecar and the reporting upstream:
headers other gateways set, chunked trailers, `;` in the query, and the Host header."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.rawhttp import RawResponse, raw_exchange, raw_request
from tests.support.servers import Process, Sidecar, start_sidecar

API_KEY = "ak_edge_0123456789"
SECRET_TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.c2VjcmV0LXNpZ25hdHVyZQ"

CONFIG = f"""
[auth.api_keys]
header = "X-API-Key"
[[auth.api_keys.keys]]
id = "edge"
sha256 = "{hashlib.sha256(API_KEY.encode()).hexdigest()}"

[[routes]]
path = "/keyed/*"
auth = ["api_key"]
[[routes]]
path = "/*"
auth = "public"
"""


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, upstream: Process) -> Iterator[Sidecar]:
    s = start_sidecar(tmp_path_factory.mktemp("edge"), upstream.port, CONFIG)
    yield s
    s.stop()


def seen(report: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in report["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


def head(port: int, target: bytes, *lines: bytes, version: bytes = b"HTTP/1.1") -> RawResponse:
    """A request whose head is exactly these lines (no Host added)."""
    request_line = b"GET " + target + b" " + version
    return raw_exchange(port, b"\r\n".join([request_line, *lines, b"Connection: close", b"", b""]))


# --- finding 3: identity and forwarding headers of other gateways ---------------------------------

GATEWAY_HEADERS = [
    b"X-WEBAUTH-USER",
    b"X-Amzn-Oidc-Identity",
    b"X-Amzn-Oidc-Data",
    b"X-Goog-Authenticated-User-Email",
    b"X-Goog-Iap-Jwt-Assertion",
    b"Cf-Access-Authenticated-User-Email",
    b"Cf-Access-Jwt-Assertion",
    b"X-MS-CLIENT-PRINCIPAL-NAME",
    b"X-MS-CLIENT-PRINCIPAL",
    b"X-Consumer-Username",
    b"X-Authenticated-Userid",
    b"X-Pomerium-Jwt-Assertion",
    b"OIDC-Claim-Email",
    b"Client-IP",
    b"X-Cluster-Client-IP",
    b"X-Forwarded",
    b"Forwarded-For",
    b"X-Originating-IP",
    b"Fastly-Client-IP",
    b"X-Forwarded-Ssl",
    b"X-Forwarded-Scheme",
    b"Front-End-Https",
    b"X-Url-Scheme",
    b"X-Forwarded-Server",
    b"X-Original-Host",
    b"X-Host",
    b"X-HTTP-Host-Override",
]


def test_identity_and_forwarding_headers_of_other_gateways_never_reach_the_upstream(
    sidecar: Sidecar,
) -> None:
    sent = [(name, b"admin@example.com") for name in GATEWAY_HEADERS]
    r = raw_request(sidecar.port, b"/echo/gw", headers=[*sent, (b"X-Kept", b"1")])
    assert r.status == 200
    received = seen(r.json())
    leaked = [n.decode() for n in GATEWAY_HEADERS if n.decode().lower() in received]
    assert leaked == []
    assert received["x-kept"] == ["1"]
    assert received["x-forwarded-for"] == ["127.0.0.1"]


def test_with_forward_headers_the_upstream_receives_only_the_listed_headers(
    tmp_path_factory: pytest.TempPathFactory, upstream: Process
) -> None:
    s = start_sidecar(
        tmp_path_factory.mktemp("allow"),
        upstream.port,
        upstream='forward_headers = ["Content-Type", "Accept"]',
    )
    try:
        body = b'{"name": "llama"}' * 100
        r = httpx.post(
            f"{s.url}/echo/allow",
            content=body,
            headers={
                "Content-Type": "application/json",
                "X-Custom": "1",
                "X-WebAuth-User": "admin",
                "Cookie": "session=1",
            },
        )
        assert r.status_code == 200
        report = r.json()
        assert report["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert set(seen(report)) == {
            "host",
            "content-type",
            "accept",
            "content-length",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-request-id",
            "traceparent",  # the sidecar's own (kept or started: tracing.py)
        }
    finally:
        s.stop()


# --- finding 6: chunked trailers ------------------------------------------------------------------


def chunked(port: int, target: bytes, trailers: bytes, *extra: bytes) -> RawResponse:
    """A chunked POST whose trailer section arrives in the same packet as the head."""
    lines = [b"POST " + target + b" HTTP/1.1", b"Host: app.test", *extra]
    lines += [b"Transfer-Encoding: chunked", b"Connection: close", b"", b""]
    return raw_exchange(port, b"\r\n".join(lines) + b"5\r\nhello\r\n0\r\n" + trailers + b"\r\n")


def test_an_api_key_sent_only_as_a_trailer_authenticates_nothing(sidecar: Sidecar) -> None:
    r = chunked(sidecar.port, b"/keyed/x", b"X-API-Key: " + API_KEY.encode() + b"\r\n")
    assert r.status == 401, r.body
    # The head's key still works on the same kind of request.
    ok = chunked(sidecar.port, b"/keyed/x", b"", b"X-API-Key: " + API_KEY.encode())
    assert ok.status == 200 and ok.json()["body_size"] == 5


def test_trailer_fields_never_become_headers_the_upstream_receives(sidecar: Sidecar) -> None:
    r = chunked(
        sidecar.port,
        b"/echo/t",
        b"Host: evil.test\r\nX-Trailer-Field: 1\r\nX-Request-ID: from-trailer\r\n",
    )
    assert r.status == 200, r.body
    received = seen(r.json())
    assert received["x-forwarded-host"] == ["app.test"]
    assert "x-trailer-field" not in received
    assert received["x-request-id"] != ["from-trailer"]


# --- finding 9: `;` in the query ------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        b"a=1;access_token=" + SECRET_TOKEN.encode(),
        b"a=1;token=" + SECRET_TOKEN.encode() + b"&b=2",
        b"b=2&a=1;API_KEY=" + SECRET_TOKEN.encode(),
        b"a=1;%61ccess_token=" + SECRET_TOKEN.encode(),
    ],
)
def test_a_credential_after_a_semicolon_is_refused_and_never_logged(
    sidecar: Sidecar, query: bytes
) -> None:
    r = raw_request(sidecar.port, b"/echo/q?" + query)
    assert r.status == 400
    assert r.json()["details"]["reason"] == "credential_in_query"
    assert SECRET_TOKEN not in r.body.decode()
    assert SECRET_TOKEN not in sidecar.output()


def test_a_semicolon_without_a_credential_name_passes_unchanged(sidecar: Sidecar) -> None:
    r = raw_request(sidecar.port, b"/echo/q?a=1;b=2&tokenize=1;x")
    assert r.status == 200
    assert r.json()["query_string"] == "a=1;b=2&tokenize=1;x"


# --- finding 10: Host -----------------------------------------------------------------------------


def test_two_host_headers_are_refused(sidecar: Sidecar) -> None:
    r = head(sidecar.port, b"/echo/h", b"Host: app.test", b"Host: evil.test")
    assert r.status == 400
    assert r.json()["details"]["reason"] == "invalid_host"


def test_a_missing_host_is_refused_on_http_1_1_but_not_on_http_1_0(sidecar: Sidecar) -> None:
    assert head(sidecar.port, b"/echo/h").status == 400
    r = head(sidecar.port, b"/echo/h", version=b"HTTP/1.0")
    assert r.status == 200
    assert "x-forwarded-host" not in seen(r.json())


@pytest.mark.parametrize(
    "host",
    [
        b"",
        b"evil.test/path",
        b"user@app.test",
        b"app.test,evil.test",
        b"app.test evil.test",
        b"app.test:",
        b"app.test:99999",
        b"app.test:8o",
        b"[::1",
        b"[fe80::1%25eth0]",
        b"[not-an-address]",
        b"app..test",
        b"app.test\\evil",
        b"%61pp.test",
        b"\xc3\xa4pp.test",
    ],
)
def test_a_host_that_is_not_a_host_is_refused(sidecar: Sidecar, host: bytes) -> None:
    r = head(sidecar.port, b"/echo/h", b"Host: " + host)
    assert r.status == 400, (host, r.body)


@pytest.mark.parametrize(
    "host", [b"app.test", b"App.Test:8080", b"127.0.0.1:8000", b"[::1]:8000", b"svc_1.local."]
)
def test_a_valid_host_becomes_x_forwarded_host_unchanged(sidecar: Sidecar, host: bytes) -> None:
    r = head(sidecar.port, b"/echo/h", b"Host: " + host)
    assert r.status == 200, r.body
    assert seen(r.json())["x-forwarded-host"] == [host.decode()]


def test_an_absolute_form_target_naming_another_authority_is_refused(sidecar: Sidecar) -> None:
    r = head(sidecar.port, b"http://evil.test/echo/h", b"Host: app.test")
    assert r.status == 400
    assert r.json()["details"]["reason"] == "invalid_host"
    r = head(sidecar.port, b"http://user@app.test/echo/h", b"Host: app.test")
    assert r.status == 400


def test_an_absolute_form_target_naming_the_host_is_served_as_its_path(sidecar: Sidecar) -> None:
    r = head(sidecar.port, b"http://APP.test:8080/echo/h?x=1", b"Host: app.test:8080")
    assert r.status == 200, r.body
    report = r.json()
    assert (report["raw_path"], report["query_string"]) == ("/echo/h", "x=1")
    assert seen(report)["x-forwarded-host"] == ["app.test:8080"]


# --- request smuggling through Connection ---------------------------------------------------


def test_a_connection_header_naming_content_length_cannot_smuggle_a_second_request(
    sidecar: Sidecar,
) -> None:
    # Headers a client's Connection names are removed; if that removed the body's framing, the
    # body would reach the upstream as a second request that no route or auth ever judged.
    smuggled = b"GET /echo/smuggled HTTP/1.1\r\nHost: u\r\nX-Auth-Subject: admin\r\n\r\n"
    answer = raw_exchange(
        sidecar.port,
        b"POST /echo/posted HTTP/1.1\r\nHost: a\r\nConnection: close, content-length\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(smuggled), smuggled),
    )
    assert answer.status == 200
    report = answer.json()
    assert report["path"] == "/echo/posted"
    assert report["body_size"] == len(smuggled)
    assert report["body_sha256"] == hashlib.sha256(smuggled).hexdigest()
    # The pooled connection carries the next request cleanly: no stray answer is waiting on it.
    for _ in range(3):
        r = httpx.get(f"{sidecar.url}/echo/next")
        assert r.status_code == 200 and r.json()["path"] == "/echo/next"
