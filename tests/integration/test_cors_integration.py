"""CORS through a real sidecar in front of a real upstream that sets CORS headers of its own: what a
cross-origin client gets back, what the upstream never sees, what the operator reads in the log."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from tests.support.rawhttp import raw_request
from tests.support.servers import Process, Sidecar, free_port, start_sidecar

APP = "http://app.test:5173"
EVIL = "https://evil.test"
SECRET = "cors-integration-secret-of-at-least-32-bytes"
ENV = {"TEST_HS_SECRET": SECRET}

CONFIG = """
[websocket]
drain_s = 0  # no session outlives a test; stop at once

[cors]
allow_origins = ["http://app.test:5173", "https://*.example.com"]
allow_credentials = true
allow_methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
allow_headers = ["*"]
expose_headers = ["X-Total-Count", "X-Request-ID"]
max_age_s = 600

[[auth.jwt.providers]]
name = "t"
issuer = "https://idp.test"
audiences = ["api"]
secret_env = "TEST_HS_SECRET"
algorithms = ["HS256"]

[[routes]]
path = "/public/*"
auth = "public"
[routes.cors]
allow_origins = ["*"]
allow_credentials = false

[[routes]]
path = "/pna/*"
auth = "public"
[routes.cors]
allow_private_network = true

[[routes]]
path = "/private/*"
auth = ["jwt"]

[[routes]]
path = "/ws"
auth = "public"

[[routes]]
path = "/echo/*"
auth = "public"

[[routes]]
path = "/cors"
auth = "public"

[[routes]]
path = "/upload"
auth = "public"
"""


def token(sub: str = "alice", ttl: int = 300) -> str:
    now = int(time.time())
    claims = {"iss": "https://idp.test", "aud": "api", "sub": sub, "iat": now, "exp": now + ttl}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, upstream: Process) -> Iterator[Sidecar]:
    s = start_sidecar(
        tmp_path_factory.mktemp("cors"),
        upstream.port,
        CONFIG,
        server="max_body_bytes = 1024",
        env=ENV,
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def orphan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    """The same sidecar in front of a port where nothing listens: anything forwarded is a 502."""
    s = start_sidecar(tmp_path_factory.mktemp("orphan"), free_port(), CONFIG, env=ENV)
    yield s
    s.stop()


def preflight(
    s: Sidecar, path: str, origin: str, method: str = "PUT", **headers: str
) -> httpx.Response:
    return httpx.options(
        s.url + path,
        headers={"Origin": origin, "Access-Control-Request-Method": method, **headers},
    )


def cors_headers(r: httpx.Response) -> list[tuple[str, str]]:
    return [(k, v) for k, v in r.headers.multi_items() if k.startswith("access-control-")]


def log_lines(s: Sidecar, request_id: str, timeout: float = 3.0) -> list[dict[str, Any]]:
    """The sidecar's JSON log lines for `request_id`, once its access line has been written."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [
            json.loads(line)
            for line in s.output().splitlines()
            if line.startswith("{") and request_id in line
        ]
        lines = [line for line in lines if line.get("request_id") == request_id]
        if any(line.get("message") == "request" for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def access_line(s: Sidecar, request_id: str) -> dict[str, Any]:
    [line] = [x for x in log_lines(s, request_id) if x.get("message") == "request"]
    return line


def rid() -> str:
    return "cors-" + uuid.uuid4().hex


# --- preflight -----------------------------------------------------------------------------------


def test_preflight_from_an_allowed_origin_is_answered_by_the_sidecar(sidecar: Sidecar) -> None:
    request_id = rid()
    r = preflight(
        sidecar,
        "/echo/x",
        APP,
        **{"Access-Control-Request-Headers": "Authorization, X-Custom", "X-Request-ID": request_id},
    )
    assert r.status_code == 204 and r.content == b""
    assert r.headers["access-control-allow-origin"] == APP
    assert r.headers["access-control-allow-credentials"] == "true"
    assert "PUT" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "authorization, x-custom"
    assert r.headers["access-control-max-age"] == "600"
    vary = [v.strip() for v in r.headers["vary"].split(",")]
    assert {"Origin", "Access-Control-Request-Method", "Access-Control-Request-Headers"} <= set(
        vary
    )
    entry = access_line(sidecar, request_id)
    assert entry["method"] == "OPTIONS" and entry["status"] == 204
    assert entry["upstream_status"] is None  # answered here, never forwarded


def test_preflight_is_never_forwarded_even_when_the_upstream_is_down(orphan: Sidecar) -> None:
    assert preflight(orphan, "/echo/x", APP).status_code == 204
    assert httpx.get(orphan.url + "/echo/x", headers={"Origin": APP}).status_code == 502


def test_an_options_request_that_is_not_a_preflight_is_forwarded(sidecar: Sidecar) -> None:
    # Proves the upstream's echo would report a forwarded OPTIONS: the preflight above got none.
    r = httpx.options(sidecar.url + "/echo/plain", headers={"Origin": APP})
    assert r.status_code == 200
    assert r.json()["method"] == "OPTIONS"
    assert r.headers["access-control-allow-origin"] == APP


def test_preflight_on_a_jwt_route_asks_for_no_credentials(sidecar: Sidecar) -> None:
    r = preflight(sidecar, "/private/x", APP, **{"Access-Control-Request-Headers": "authorization"})
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == APP
    assert "www-authenticate" not in r.headers


@pytest.mark.parametrize(
    ("origin", "method", "reason"),
    [
        (EVIL, "PUT", "origin"),
        ("https://example.com", "PUT", "origin"),  # the apex is not a subdomain
        ("null", "GET", "origin_malformed"),
        (APP, "TRACE", "method"),
    ],
)
def test_refused_preflight_is_403_json_without_cors_headers(
    sidecar: Sidecar, origin: str, method: str, reason: str
) -> None:
    r = preflight(sidecar, "/echo/x", origin, method)
    assert r.status_code == 403
    body = r.json()
    assert body["error"] == "forbidden" and body["details"]["reason"] == reason
    assert cors_headers(r) == []


def test_private_network_preflight_is_refused_unless_allowed(sidecar: Sidecar) -> None:
    pna = {"Access-Control-Request-Private-Network": "true"}
    refused = preflight(sidecar, "/echo/x", APP, **pna)
    assert refused.status_code == 403
    assert refused.json()["details"]["reason"] == "private_network"
    assert cors_headers(refused) == []

    allowed = preflight(sidecar, "/pna/x", APP, **pna)  # the route sets allow_private_network
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-private-network"] == "true"
    assert allowed.headers["access-control-allow-origin"] == APP
    assert "Access-Control-Request-Private-Network" in allowed.headers["vary"]


# --- actual requests -----------------------------------------------------------------------------


def test_allowed_origin_is_echoed_with_credentials_and_vary_origin(sidecar: Sidecar) -> None:
    r = httpx.get(
        sidecar.url + "/private/me",
        headers={"Origin": APP, "Authorization": f"Bearer {token()}"},
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == APP
    assert r.headers["access-control-allow-credentials"] == "true"
    assert r.headers["access-control-expose-headers"] == "X-Total-Count, X-Request-ID"
    assert r.headers["vary"] == "Origin"
    seen = dict((k.lower(), v) for k, v in r.json()["headers"])
    assert seen["x-auth-subject"] == "alice"


def test_upstream_cors_headers_are_replaced_and_its_vary_is_merged(sidecar: Sidecar) -> None:
    r = httpx.get(sidecar.url + "/cors", headers={"Origin": APP})
    assert r.status_code == 200
    assert cors_headers(r) == [
        ("access-control-allow-origin", APP),
        ("access-control-allow-credentials", "true"),
        ("access-control-expose-headers", "X-Total-Count, X-Request-ID"),
    ]
    assert r.headers.get_list("vary") == ["Accept-Encoding, Origin"]


def test_upstream_cors_headers_never_leak_to_a_request_without_origin(sidecar: Sidecar) -> None:
    r = httpx.get(sidecar.url + "/cors")
    assert r.status_code == 200
    assert cors_headers(r) == []  # the upstream's "*" + credentials is gone
    assert r.headers.get_list("vary") == ["Accept-Encoding, Origin"]


@pytest.mark.parametrize(
    "origin", ["https://a.example.com", "https://a.b.example.com", "https://API.Example.com"]
)
def test_wildcard_subdomain_origin_is_allowed_end_to_end(sidecar: Sidecar, origin: str) -> None:
    assert preflight(sidecar, "/echo/w", origin).headers["access-control-allow-origin"] == origin
    r = httpx.get(sidecar.url + "/echo/w", headers={"Origin": origin})
    assert r.status_code == 200 and r.json()["path"] == "/echo/w"
    assert r.headers["access-control-allow-origin"] == origin


@pytest.mark.parametrize(
    "origin",
    [
        "https://example.com",
        "https://example.com.evil.com",
        "https://aexample.com",
        "http://a.example.com",
        "https://a.example.com:8443",
    ],
)
def test_near_misses_of_the_wildcard_are_refused(sidecar: Sidecar, origin: str) -> None:
    r = httpx.get(sidecar.url + "/echo/w", headers={"Origin": origin})
    assert r.status_code == 403
    assert cors_headers(r) == []


def test_disallowed_origin_is_refused_before_the_upstream(orphan: Sidecar) -> None:
    # Behind a dead upstream, anything forwarded would be 502: the 403 came first.
    r = httpx.post(orphan.url + "/echo/x", headers={"Origin": EVIL}, content=b"{}")
    assert r.status_code == 403
    assert r.json()["error"] == "forbidden"
    assert r.json()["details"] == {"origin": EVIL, "reason": "origin"}
    assert "access-control-allow-origin" not in r.headers


def test_same_origin_request_is_not_refused(sidecar: Sidecar) -> None:
    # httpx sends Host: 127.0.0.1:<port>, so this Origin is the sidecar's own.
    r = httpx.post(sidecar.url + "/echo/same", headers={"Origin": sidecar.url}, content=b"{}")
    assert r.status_code == 200
    assert r.json()["method"] == "POST"
    assert "access-control-allow-origin" not in r.headers


def test_route_cors_override_answers_star_without_credentials(sidecar: Sidecar) -> None:
    pre = preflight(sidecar, "/public/x", EVIL)
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in pre.headers

    r = httpx.get(sidecar.url + "/public/x", headers={"Origin": EVIL})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers
    # the global policy still refuses that origin elsewhere
    assert httpx.get(sidecar.url + "/echo/x", headers={"Origin": EVIL}).status_code == 403


# --- the sidecar's own errors --------------------------------------------------------------------


def assert_readable_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status
    assert r.json()["error"] == code
    assert r.headers["access-control-allow-origin"] == APP
    assert r.headers["access-control-allow-credentials"] == "true"
    assert "Origin" in r.headers["vary"]


def test_sidecar_401_carries_cors_headers_for_an_allowed_origin(sidecar: Sidecar) -> None:
    r = httpx.get(sidecar.url + "/private/x", headers={"Origin": APP})
    assert_readable_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_sidecar_401_for_a_bad_token_carries_cors_headers(sidecar: Sidecar) -> None:
    r = httpx.get(
        sidecar.url + "/private/x",
        headers={"Origin": APP, "Authorization": f"Bearer {token(ttl=-3600)}"},
    )
    assert_readable_error(r, 401, "unauthorized")


def test_sidecar_404_carries_cors_headers_for_an_allowed_origin(sidecar: Sidecar) -> None:
    assert_readable_error(
        httpx.get(sidecar.url + "/nowhere", headers={"Origin": APP}), 404, "not_found"
    )


def test_sidecar_413_carries_cors_headers_for_an_allowed_origin(sidecar: Sidecar) -> None:
    r = httpx.post(sidecar.url + "/upload", headers={"Origin": APP}, content=b"x" * 4096)
    assert_readable_error(r, 413, "payload_too_large")


def test_sidecar_400_for_an_unsafe_path_carries_cors_headers_for_an_allowed_origin(
    sidecar: Sidecar,
) -> None:
    r = raw_request(sidecar.port, b"/echo/../x", headers=[(b"Origin", APP.encode())])
    assert r.status == 400 and r.json()["error"] == "bad_request"
    assert r.header("access-control-allow-origin") == APP


def test_sidecar_502_carries_cors_headers_for_an_allowed_origin(orphan: Sidecar) -> None:
    assert_readable_error(
        httpx.get(orphan.url + "/echo/x", headers={"Origin": APP}), 502, "bad_gateway"
    )


# --- WebSocket handshakes ------------------------------------------------------------------------


def assert_websocket_refused(url: str, origin: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        with connect(url, origin=Origin(origin), open_timeout=5):
            pass
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body or b"{}")["error"] == "forbidden"


def test_websocket_handshake_from_a_disallowed_origin_is_refused(sidecar: Sidecar) -> None:
    assert_websocket_refused(sidecar.ws_url + "/ws", EVIL)
    assert_websocket_refused(sidecar.ws_url + "/ws", "https://example.com.evil.com")


def test_an_oversized_websocket_handshake_is_refused_not_waved_past_the_origin_check(
    sidecar: Sidecar,
) -> None:
    # A page controls part of its handshake's size (cookies, subprotocols): headers the
    # sidecar refuses to read must refuse the handshake, never skip the Origin check.
    padding = [(f"X-Pad-{i}", "a" * 7000) for i in range(10)]
    with pytest.raises(InvalidStatus) as refused:
        with connect(
            sidecar.ws_url + "/ws", origin=Origin(EVIL), additional_headers=padding, open_timeout=5
        ):
            pass
    assert refused.value.response.status_code == 400
    body = json.loads(refused.value.response.body or b"{}")
    assert body["details"]["reason"] == "headers_too_large"


# --- reject_disallowed_origins = false -----------------------------------------------------------


@pytest.fixture(scope="module")
def lenient(tmp_path_factory: pytest.TempPathFactory, upstream: Process) -> Iterator[Sidecar]:
    s = start_sidecar(
        tmp_path_factory.mktemp("lenient"),
        upstream.port,
        CONFIG,
        env={**ENV, "AUTHPROXY__CORS__REJECT_DISALLOWED_ORIGINS": "false"},
    )
    yield s
    s.stop()


def test_disallowed_origin_passes_without_cors_headers_when_not_rejecting(
    lenient: Sidecar,
) -> None:
    r = httpx.get(lenient.url + "/cors", headers={"Origin": EVIL})
    assert r.status_code == 200
    assert cors_headers(r) == []  # neither ours nor the upstream's: the browser will refuse it
    assert r.headers["vary"] == "Accept-Encoding, Origin"
    assert preflight(lenient, "/echo/x", EVIL).status_code == 403  # preflights still refused


def test_websocket_from_a_disallowed_origin_is_refused_even_when_not_rejecting(
    lenient: Sidecar,
) -> None:
    assert_websocket_refused(lenient.ws_url + "/ws", EVIL)


# --- the operator's view -------------------------------------------------------------------------


def test_refusal_log_line_names_origin_rule_and_reason(sidecar: Sidecar) -> None:
    request_id = rid()
    r = httpx.get(
        sidecar.url + "/echo/x",
        headers={"Origin": "https://example.com", "X-Request-ID": request_id},
    )
    assert r.status_code == 403
    [refusal] = [x for x in log_lines(sidecar, request_id) if x.get("event") == "cors_refused"]
    assert refusal["origin"] == "https://example.com"
    assert refusal["rule"] == "global"
    assert refusal["reason"] == "origin"
    assert "subdomains only" in refusal["message"]


def test_refusal_under_a_route_policy_names_that_route(sidecar: Sidecar) -> None:
    request_id = rid()
    r = preflight(sidecar, "/pna/x", EVIL, **{"X-Request-ID": request_id})
    assert r.status_code == 403
    [refusal] = [x for x in log_lines(sidecar, request_id) if x.get("event") == "cors_refused"]
    assert refusal["origin"] == EVIL
    assert refusal["rule"] == "routes[1] /pna/*"
    assert refusal["reason"] == "origin"
    assert access_line(sidecar, request_id)["status"] == 403
