"""Identity breadth through a real sidecar and a real IdP on loopback ports: OpenID Connect
discovery, a JWKS outage past `max_stale_s` (503 jwks_unavailable, /readyz and /metrics say so,
then recovery)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.support.idp import ThreadedIdp
from tests.support.servers import Process, Sidecar, start_sidecar

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def idp() -> Iterator[ThreadedIdp]:
    jwk = {**RSAAlgorithm.to_jwk(KEY.public_key(), as_dict=True), "kid": "k1"}
    server = ThreadedIdp([jwk]).start()
    yield server
    server.stop()


def token(idp: ThreadedIdp, sub: str = "erin") -> str:
    now = int(time.time())
    claims = {"iss": idp.base, "aud": "api", "sub": sub, "iat": now, "exp": now + 300}
    return jwt.encode(claims, KEY, algorithm="RS256", headers={"kid": "k1"})


def get(sidecar: Sidecar, tok: str) -> httpx.Response:
    return httpx.get(sidecar.url + "/echo/x", headers={"Authorization": f"Bearer {tok}"})


def wait_until(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def sidecar(tmp_path: Path, upstream: Process, idp: ThreadedIdp) -> Iterator[Sidecar]:
    body = f"""
    [[auth.jwt.providers]]
    name = "oidc"
    issuer = "{idp.base}"
    audiences = ["api"]
    algorithms = ["RS256"]
    max_stale_s = 1
    jwks_min_refresh_s = 0

    [[routes]]
    path = "/echo/*"
    auth = ["jwt"]
    """
    s = start_sidecar(tmp_path, upstream.port, body)
    yield s
    s.stop()


def test_discovery_then_an_outage_past_max_stale_is_503_then_service_returns(
    sidecar: Sidecar, idp: ThreadedIdp
) -> None:
    assert httpx.get(sidecar.admin_url + "/readyz").status_code == 200
    ok = get(sidecar, token(idp))
    assert ok.status_code == 200, ok.text
    seen = dict(ok.json()["headers"])
    assert seen["x-auth-subject"] == "erin" and seen["x-auth-issuer"] == idp.base

    idp.jwks_down = True
    # The JWKS answers no-store: the sidecar refetches every second, fails, and after
    # max_stale_s = 1 stops vouching for the provider's tokens.
    wait_until(lambda: "jwks_unavailable" in httpx.get(sidecar.admin_url + "/readyz").json())
    ready = httpx.get(sidecar.admin_url + "/readyz")
    # Said, but not unready: API keys and other providers still work on this replica, and an
    # IdP outage must not take every replica out of its load balancer.
    assert ready.status_code == 200 and ready.json()["jwks_unavailable"] == ["oidc"]
    metrics = httpx.get(sidecar.admin_url + "/metrics").text
    assert 'authproxy_jwks_unavailable{provider="oidc"} 1.0' in metrics

    refused = get(sidecar, token(idp, "frank"))
    assert refused.status_code == 503
    body = refused.json()
    assert body["error"] == "service_unavailable"
    assert body["details"]["reason"] == "jwks_unavailable"
    assert refused.headers["Retry-After"]
    assert "www-authenticate" not in refused.headers  # not a 401: nobody is signed out

    idp.jwks_down = False
    wait_until(lambda: get(sidecar, token(idp, "gina")).status_code == 200)
    assert "jwks_unavailable" not in httpx.get(sidecar.admin_url + "/readyz").json()
    assert "jwks_unavailable" in sidecar.output()  # the one error line naming the reason


OPAQUE = "op_integration_" + "z" * 32


def test_an_opaque_token_is_introspected_and_its_identity_reaches_the_upstream(
    tmp_path: Path, upstream: Process, idp: ThreadedIdp
) -> None:
    now = int(time.time())
    idp.tokens[OPAQUE] = {
        "active": True,
        "sub": "iris",
        "scope": "models:read",
        "exp": now + 300,
        "groups": ["ml-admins"],
    }
    body = f"""
    [[auth.jwt.providers]]
    name = "corp"
    issuer = "{idp.base}"
    audiences = ["api"]
    algorithms = ["RS256"]
    introspection_url = "{idp.base}/introspect"
    introspection_client_id = "{idp.client_id}"
    introspection_secret_env = "CORP_INTROSPECTION_SECRET"

    [[routes]]
    path = "/echo/admin/*"
    auth = ["jwt"]
    require_claims = {{ groups = ["ops"] }}
    [[routes]]
    path = "/echo/*"
    auth = ["jwt"]
    scopes = ["models:read"]
    """
    sidecar = start_sidecar(
        tmp_path, upstream.port, body, env={"CORP_INTROSPECTION_SECRET": idp.client_secret}
    )
    try:
        bearer = {"Authorization": f"Bearer {OPAQUE}"}
        for _ in range(5):
            ok = httpx.get(sidecar.url + "/echo/x", headers=bearer)
            assert ok.status_code == 200, ok.text
        seen = dict(ok.json()["headers"])
        assert seen["x-auth-subject"] == "iris"
        assert seen["x-auth-method"] == "introspection"
        assert seen["x-auth-scopes"] == "models:read"
        assert seen["x-auth-issuer"] == idp.base
        assert "authorization" not in seen
        assert idp.introspections == 1  # four of five answered from the cache

        forbidden = httpx.get(sidecar.url + "/echo/admin/x", headers=bearer)
        assert forbidden.status_code == 403
        assert forbidden.json()["details"]["reason"] == "claim_mismatch"

        dead = httpx.get(sidecar.url + "/echo/x", headers={"Authorization": "Bearer op_dead"})
        assert dead.status_code == 401
        assert dead.json()["details"]["reason"] == "inactive_token"

        idp.introspection_down = True
        down = httpx.get(sidecar.url + "/echo/x", headers={"Authorization": "Bearer op_new"})
        assert down.status_code == 503
        assert down.json()["error"] == "service_unavailable"
        assert down.json()["details"]["reason"] == "introspection_unavailable"

        metrics = httpx.get(sidecar.admin_url + "/metrics").text
        assert 'authproxy_introspection_cache_total{provider="corp",result="hit"} 5.0' in metrics
    finally:
        sidecar.stop()
    log = sidecar.output()
    assert OPAQUE not in log and idp.client_secret not in log
    assert "introspection_unavailable" in log or "introspection for provider" in log
