"""Authentication and identity through a real sidecar: what the client gets, what the upstream sees,
and every way a client could try to impersonate someone."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from websockets.sync.client import connect

from tests.support.servers import (
    ROOT,
    Process,
    Sidecar,
    free_port,
    spawn,
    start_sidecar,
    wait_for_port,
)

SECRET = "integration-secret-integration-secret!"
ISSUER = "https://idp.test"
READ_KEY = "ak_read_0123456789"
WRITE_KEY = "ak_write_0123456789"
ENV = {"TEST_HS_SECRET": SECRET, "TEST_IDENTITY_SECRET": "identity-shared-secret"}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


CONFIG = f"""
[[auth.jwt.providers]]
name = "test"
issuer = "{ISSUER}"
audiences = ["api"]
secret_env = "TEST_HS_SECRET"
algorithms = ["HS256"]
leeway_s = 0
claim_headers = {{ "X-User-Email" = "email" }}

[auth.api_keys]
header = "X-API-Key"
[[auth.api_keys.keys]]
id = "reader"
sha256 = "{sha(READ_KEY)}"
scopes = ["models:read"]
[[auth.api_keys.keys]]
id = "writer"
sha256 = "{sha(WRITE_KEY)}"
scopes = ["models:read", "models:write"]

[[routes]]
path = "/echo/write/*"
auth = ["jwt", "api_key"]
scopes = ["models:write"]
[[routes]]
path = "/echo/optional/*"
auth = ["jwt"]
auth_optional = true
[[routes]]
path = "/echo/*"
auth = ["jwt", "api_key"]
[[routes]]
path = "/public/*"
auth = "public"
"""


def token(**claims: Any) -> str:
    now = int(time.time())
    payload = {
        "sub": "alice@example.com",
        "iss": ISSUER,
        "aud": "api",
        "exp": now + 300,
        "iat": now,
        "scope": "models:read",
        "email": "alice@example.com",
        **claims,
    }
    return jwt.encode(payload, SECRET, algorithm="HS256")


def bearer(t: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {t}"}


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, upstream: Process) -> Iterator[Sidecar]:
    s = start_sidecar(tmp_path_factory.mktemp("auth"), upstream.port, CONFIG, env=ENV)
    yield s
    s.stop()


def seen(response: httpx.Response) -> dict[str, list[str]]:
    assert response.status_code == 200, response.text
    out: dict[str, list[str]] = {}
    for k, v in response.json()["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


def test_missing_credentials_is_401_with_an_invalid_token_challenge(sidecar: Sidecar) -> None:
    r = httpx.get(f"{sidecar.url}/echo/x")
    assert r.status_code == 401
    assert r.json()["error"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert "missing credentials" in r.headers["www-authenticate"]


@pytest.mark.parametrize(
    ("bad", "reason_word"),
    [
        ("not-a-jwt", ""),
        (token(exp=int(time.time()) - 10), "expired"),
        (token(aud="other"), "audience"),
        (token(iss="https://evil.test"), "issuer"),
        (
            jwt.encode(
                {"sub": "x", "iss": ISSUER, "aud": "api", "exp": int(time.time()) + 60},
                "wrong-secret-wrong-secret-wrong-secret",
                algorithm="HS256",
            ),
            "signature",
        ),
    ],
)
def test_bad_tokens_are_401_invalid_token_with_a_reason(
    sidecar: Sidecar, bad: str, reason_word: str
) -> None:
    r = httpx.get(f"{sidecar.url}/echo/x", headers=bearer(bad))
    assert r.status_code == 401
    body = r.json()
    assert body["error"] == "unauthorized"
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert reason_word in body["message"].lower()
    assert bad not in r.text  # the token is never echoed


def test_missing_scope_is_403_insufficient_scope(sidecar: Sidecar) -> None:
    r = httpx.post(f"{sidecar.url}/echo/write/x", headers=bearer(token()))
    assert r.status_code == 403
    assert r.json()["error"] == "forbidden"
    challenge = r.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge and 'scope="models:write"' in challenge
    ok = httpx.post(
        f"{sidecar.url}/echo/write/x", headers=bearer(token(scope="models:read models:write"))
    )
    assert ok.status_code == 200


def test_a_valid_jwt_tells_the_upstream_who_called_and_keeps_the_token_to_itself(
    sidecar: Sidecar,
) -> None:
    t = token(scope="models:read extra")
    h = seen(httpx.get(f"{sidecar.url}/echo/x?token={t}&keep=1", headers=bearer(t)))
    assert h["x-auth-subject"] == ["alice@example.com"]
    assert h["x-auth-method"] == ["jwt"]
    assert h["x-auth-scopes"] == ["extra models:read"]
    assert h["x-auth-issuer"] == [ISSUER]
    assert h["x-user-email"] == ["alice@example.com"]
    assert "authorization" not in h
    r = httpx.get(f"{sidecar.url}/echo/x?token={t}&keep=1", headers=bearer(t))
    assert r.json()["query_string"] == "keep=1"


def test_api_key_identity_and_the_key_header_is_not_forwarded(sidecar: Sidecar) -> None:
    h = seen(httpx.get(f"{sidecar.url}/echo/x", headers={"X-API-Key": READ_KEY}))
    assert h["x-auth-subject"] == ["reader"]
    assert h["x-auth-method"] == ["api_key"]
    assert h["x-auth-scopes"] == ["models:read"]
    assert "x-api-key" not in h and "x-auth-issuer" not in h
    assert (
        httpx.get(f"{sidecar.url}/echo/x", headers={"X-API-Key": "ak_unknown"}).status_code == 401
    )


@pytest.mark.parametrize(
    "spoof",
    [
        {"X-Auth-Subject": "admin@example.com"},
        {"x-auth-subject": "admin@example.com", "X-Auth-Scopes": "models:write"},
        {"X-AUTH-METHOD": "api_key", "X-Auth-Issuer": "https://evil.test"},
        {"X-User-Email": "admin@example.com"},
        {"Connection": "X-Auth-Subject, X-User-Email", "X-Auth-Subject": "admin@example.com"},
        {"X-Auth-Signature": "v1=00"},
        {"X_Auth_Subject": "admin@example.com", "X-Auth_Scopes": "models:write"},
        {"x_user_email": "admin@example.com", "X_Forwarded_For": "6.6.6.6"},
    ],
)
def test_identity_headers_cannot_be_spoofed(sidecar: Sidecar, spoof: dict[str, str]) -> None:
    h = seen(httpx.get(f"{sidecar.url}/echo/x", headers={**bearer(token()), **spoof}))
    assert h["x-auth-subject"] == ["alice@example.com"]
    assert h["x-auth-method"] == ["jwt"]
    assert h["x-auth-scopes"] == ["models:read"]
    assert h["x-auth-issuer"] == [ISSUER]
    assert h["x-user-email"] == ["alice@example.com"]
    assert "x-auth-signature" not in h
    # No variant a CGI/WSGI upstream would read as the same header (underscores for dashes).
    names = [k.replace("_", "-") for k in h for _ in h[k]]
    assert sorted(n for n in names if n.startswith("x-auth-")) == [
        "x-auth-issuer",
        "x-auth-method",
        "x-auth-scopes",
        "x-auth-subject",
    ]
    assert names.count("x-user-email") == 1 and names.count("x-forwarded-for") == 1


def test_spoofed_identity_on_a_public_route_is_stripped(sidecar: Sidecar) -> None:
    h = seen(httpx.get(f"{sidecar.url}/public/x", headers={"X-Auth-Subject": "admin"}))
    assert not [k for k in h if k.startswith("x-auth-")]


def test_auth_optional_passes_anonymous_but_refuses_a_bad_token(sidecar: Sidecar) -> None:
    h = seen(httpx.get(f"{sidecar.url}/echo/optional/x", headers={"X-Auth-Subject": "admin"}))
    assert "x-auth-subject" not in h
    assert httpx.get(f"{sidecar.url}/echo/optional/x", headers=bearer("garbage")).status_code == 401
    h = seen(httpx.get(f"{sidecar.url}/echo/optional/x", headers=bearer(token())))
    assert h["x-auth-subject"] == ["alice@example.com"]


def test_query_tokens_are_not_credentials_on_rest(sidecar: Sidecar) -> None:
    r = httpx.get(f"{sidecar.url}/echo/x?access_token={token()}")
    assert r.status_code == 401


def test_credentials_are_forwarded_only_when_configured(tmp_path: Path, upstream: Process) -> None:
    s = start_sidecar(
        tmp_path, upstream.port, CONFIG + "\n[auth]\nforward_credentials = true\n", env=ENV
    )
    try:
        t = token()
        h = seen(httpx.get(f"{s.url}/echo/x", headers={**bearer(t), "X-API-Key": READ_KEY}))
        assert h["authorization"] == [f"Bearer {t}"]
    finally:
        s.stop()


def test_the_sidecar_never_logs_tokens_or_keys(sidecar: Sidecar) -> None:
    t = token(sub="logcheck")
    httpx.get(f"{sidecar.url}/echo/x", headers=bearer(t))
    httpx.get(f"{sidecar.url}/echo/x", headers={"X-API-Key": READ_KEY})
    httpx.get(f"{sidecar.url}/echo/x", headers=bearer(t + "tampered"))
    time.sleep(0.3)
    output = sidecar.output()
    assert '"subject":"logcheck"' in output
    signature_part = t.rsplit(".", 1)[1]
    assert signature_part not in output and READ_KEY not in output and SECRET not in output


def test_keys_file_reload_on_sighup_revokes_and_adds_keys(
    tmp_path: Path, upstream: Process
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[keys]]\nid = "rotating"\nsha256 = "{sha("ak_old_key")}"\n')
    body = f"""
        [auth.api_keys]
        keys_file = "{keys}"
        watch_interval_s = 0
        [[routes]]
        path = "/*"
        auth = ["api_key"]
        """
    s = start_sidecar(tmp_path, upstream.port, body)
    try:
        assert httpx.get(f"{s.url}/echo/x", headers={"X-API-Key": "ak_old_key"}).status_code == 200
        keys.write_text(
            f'[[keys]]\nid = "rotating"\nsha256 = "{sha("ak_old_key")}"\n'
            f"disabled = true\n"
            f'[[keys]]\nid = "next"\nsha256 = "{sha("ak_new_key")}"\n'
        )
        s.process.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while httpx.get(f"{s.url}/echo/x", headers={"X-API-Key": "ak_old_key"}).status_code != 401:
            assert time.monotonic() < deadline, "the disabled key still works after SIGHUP"
            time.sleep(0.1)
        r = httpx.get(f"{s.url}/echo/x", headers={"X-API-Key": "ak_new_key"})
        assert r.status_code == 200
        keys.write_text("[[keys]\nbroken")  # a bad file keeps the last good set
        s.process.signal(signal.SIGHUP)
        time.sleep(0.5)
        assert httpx.get(f"{s.url}/echo/x", headers={"X-API-Key": "ak_new_key"}).status_code == 200
        assert s.process.proc.poll() is None
    finally:
        s.stop()


def test_signed_identity_is_checked_by_upstream_demo(tmp_path: Path) -> None:
    port = free_port()
    with open(tmp_path / "demo.log", "wb") as log:
        demo = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "upstream_demo",
                "--port",
                str(port),
                "--web-port",
                "0",
                "--event-interval",
                "0",
                "--identity-secret-env",
                "TEST_IDENTITY_SECRET",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **ENV},
        )
    try:
        wait_for_port(port, demo)  # type: ignore[arg-type]
        body = CONFIG + '\n[identity]\nsign = true\nsecret_env = "TEST_IDENTITY_SECRET"\n'
        s = start_sidecar(
            tmp_path, port, body.replace('path = "/echo/*"', 'path = "/api/*"'), env=ENV
        )
        try:
            r = httpx.get(f"{s.url}/api/whoami", headers=bearer(token()))
            assert r.status_code == 200, r.text
            assert r.json()["subject"] == "alice@example.com"
            # Straight to the upstream with forged identity headers: refused.
            forged = httpx.get(
                f"http://127.0.0.1:{port}/api/whoami",
                headers={
                    "X-Auth-Subject": "admin@example.com",
                    "X-Auth-Method": "jwt",
                    "X-Auth-Signature": "v1=" + "0" * 64,
                },
            )
            assert forged.status_code == 401
        finally:
            s.stop()
        wrong = start_sidecar(
            tmp_path,
            port,
            body.replace('path = "/echo/*"', 'path = "/api/*"'),
            env={**ENV, "TEST_IDENTITY_SECRET": "another-secret"},
        )
        try:
            r = httpx.get(f"{wrong.url}/api/whoami", headers=bearer(token()))
            assert r.status_code == 401
        finally:
            wrong.stop()
    finally:
        demo.terminate()
        demo.wait(10)


def start_demo(tmp_path: Path, *args: str) -> Process:
    port = free_port()
    return spawn(
        [
            sys.executable,
            "-m",
            "upstream_demo",
            "--port",
            str(port),
            "--web-port",
            "0",
            "--event-interval",
            "0",
            "--identity-secret-env",
            "TEST_IDENTITY_SECRET",
            *args,
        ],
        tmp_path / f"demo-{port}.log",
        port,
        env=ENV,
    )


def test_a_v2_signed_set_passes_the_demo_only_for_its_own_request_and_window(
    tmp_path: Path,
) -> None:
    skew = 2
    demo = start_demo(tmp_path, "--identity-max-skew-s", str(skew))
    body = CONFIG.replace('path = "/echo/*"', 'path = "/api/*"') + (
        '[[routes]]\npath = "/ws"\nauth = ["jwt"]\n'
        '\n[identity]\nsign = true\nsecret_env = "TEST_IDENTITY_SECRET"\n'
        f'signature = "v2"\nmax_skew_s = {skew}\n'
    )
    s = start_sidecar(tmp_path, demo.port, body, env=ENV)
    try:
        # The credential in the query is removed before signing: the demo checks the query it got.
        r = httpx.get(f"{s.url}/api/whoami?view=full&access_token=junk", headers=bearer(token()))
        assert r.status_code == 200, r.text
        assert r.json()["subject"] == "alice@example.com"
        assert r.json()["query"] == "view=full"
        received = r.json()["headers"]
        assert received["x-auth-signature"].startswith("v2=")
        assert received["x-auth-signed-headers"] == (
            "x-auth-subject,x-auth-method,x-auth-scopes,x-auth-issuer,x-user-email"
        )
        signed = {"x-request-id", *received["x-auth-signed-headers"].split(",")}
        captured = {k: v for k, v in received.items() if k.startswith("x-auth-") or k in signed}
        assert captured["x-user-email"] == "alice@example.com"
        demo_url = f"http://127.0.0.1:{demo.port}"

        # Replayed straight to the upstream: the same request line passes within the window
        # (the capture is faithful), any other is refused by the demo's checker.
        same = httpx.get(f"{demo_url}/api/whoami?view=full", headers=captured)
        assert same.status_code == 200, same.text
        for method, url in [
            ("GET", "/api/models"),
            ("POST", "/api/models"),
            ("DELETE", "/api/whoami?view=full"),
            ("GET", "/api/whoami"),
            ("GET", "/api/whoami?view=full&admin=1"),
        ]:
            replay = httpx.request(method, demo_url + url, headers=captured)
            assert replay.status_code == 401, (method, url, replay.text)
            assert replay.json()["details"]["reason"] == "bad_signature"
        forged = {**captured, "X-Auth-Subject": "admin@example.com"}
        assert httpx.get(f"{demo_url}/api/whoami?view=full", headers=forged).status_code == 401

        # The WebSocket handshake is signed too (GET, path, query without the token).
        with connect(f"ws://127.0.0.1:{s.port}/ws?x=1&token={token()}") as ws:
            ws.send(json.dumps({"type": "subscribe", "topics": ["models"]}))
            assert json.loads(ws.recv(timeout=5))["type"] == "subscribed"

        time.sleep(skew + 1.5)
        late = httpx.get(f"{demo_url}/api/whoami?view=full", headers=captured)
        assert late.status_code == 401 and late.json()["details"]["reason"] == "stale"
        # The sidecar stamps each request afresh: it still passes.
        r = httpx.get(f"{s.url}/api/whoami", headers=bearer(token()))
        assert r.status_code == 200, r.text
    finally:
        s.stop()
        demo.stop()
