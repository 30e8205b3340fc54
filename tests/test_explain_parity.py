"""`authproxy explain` and the server give the same answer to the same request: the app is driven
in-process and explain is asked about identical inputs (paths, methods, origins, preflights,
credentials, WebSocket handshakes), and their statuses are compared."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import config
from proxy.app import App
from proxy.explain import explain
from proxy.types import Message

SECRET = "parity-secret-parity-secret-parity-secret!"
ISS = "https://issuer.parity"
API_KEY = "ak_parity_0123456789"
ALLOWED = "https://app.example.com"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once the socket is closed


def make_settings() -> config.Settings:
    return config.from_dict(
        {
            "server": {"listen": "127.0.0.1:8000"},
            "upstream": {"url": f"http://127.0.0.1:{closed_port()}", "connect_timeout_s": 1},
            "cors": {"allow_origins": [ALLOWED], "allow_credentials": True},
            "auth": {
                "jwt": {
                    "providers": [
                        {
                            "name": "p",
                            "issuer": ISS,
                            "audiences": ["parity"],
                            "secret_env": "PARITY_SECRET",
                            "algorithms": ["HS256"],
                        }
                    ]
                },
                "api_keys": {
                    "keys": [
                        {
                            "id": "bot",
                            "sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
                            "scopes": ["models:read"],
                        }
                    ]
                },
            },
            "routes": [
                {"path": "/public/*", "auth": "public"},
                {"path": "/api/*", "auth": ["jwt", "api_key"], "methods": ["GET", "POST"]},
                {"path": "/admin/*", "auth": ["jwt", "api_key"], "scopes": ["admin"]},
                {"path": "/tenant/*", "auth": ["jwt", "api_key"], "require_claims": {"t": "a"}},
                {"path": "/ws", "auth": ["jwt", "api_key"]},
            ],
        }
    )


def token(**claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISS, "aud": "parity", "sub": "alice", "iat": now, "exp": now + 300}
    return jwt.encode({**payload, **claims}, SECRET, algorithm="HS256")


@pytest.fixture
async def app(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[App, config.Settings]]:
    monkeypatch.setenv("PARITY_SECRET", SECRET)
    s = make_settings()
    a = App(s)
    await a.startup()
    yield a, s
    await a.shutdown()


async def served_status(
    app: App, method: str, path: str, query: str, headers: list[tuple[str, str]]
) -> tuple[int, dict[str, Any] | None]:
    """The status the in-process server answers (and its JSON body when it is the sidecar's)."""
    raw = [(k.lower().encode(), v.encode()) for k, v in headers]
    raw.append((b"host", b"127.0.0.1:8000"))
    websocket = any(k == b"upgrade" for k, _ in raw)
    sent: list[Message] = []
    scope = {
        "type": "websocket" if websocket else "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": raw,
        "scheme": "ws" if websocket else "http",
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8000),
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
        "extensions": {"websocket.http.response": {}},
    }
    messages: list[Message] = (
        [{"type": "websocket.connect"}]
        if websocket
        else [{"type": "http.request", "body": b"", "more_body": False}]
    )

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"].endswith("response.start"))
    body = b"".join(m.get("body", b"") for m in sent if m["type"].endswith("response.body"))
    return start["status"], json.loads(body) if body else None


def explained_status(ok: bool, text: str) -> int:
    """The status explain predicts: the sidecar's own (204, a refusal), or 0 for 'forwarded'."""
    result = next(line for line in text.splitlines() if line.startswith("result:"))
    if "REFUSED" in result:
        return int(result.split("REFUSED", 1)[1].split()[0])
    if "ANSWERED 204" in result:
        return 204
    assert ok and "ACCEPTED" in result, text
    return 0


async def compare(
    app: App, s: config.Settings, method: str, path: str, query: str, h: list[tuple[str, str]]
) -> None:
    status, body = await served_status(app, method, path, query, h)
    target = path + ("?" + query if query else "")
    ok, text = await explain(s, method, target, h)
    predicted = explained_status(ok, text)
    if predicted == 0:
        # Forwarded: the answer is the upstream's; here none listens, so the sidecar's 502 says
        # the request got past every stage.
        assert status == 502 and body is not None, (status, body, text)
        assert body["details"]["reason"] == "connect_failed", (body, text)
    else:
        assert status == predicted, (method, target, h, status, body, text)


CASES: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    # A CORS preflight the server answers 204 (explain used to report 404).
    (
        "OPTIONS",
        "/api/models",
        "",
        [("Origin", ALLOWED), ("Access-Control-Request-Method", "POST")],
    ),
    # A GET from a disallowed origin the server refuses (explain used to accept it).
    ("GET", "/api/models", "", [("Origin", "https://evil.example"), ("X-API-Key", API_KEY)]),
    ("GET", "/api/models", "", [("X-API-Key", API_KEY)]),
    ("GET", "/api/models", "", []),
    ("DELETE", "/api/models", "", [("X-API-Key", API_KEY)]),
    ("GET", "/api/../admin/x", "", [("X-API-Key", API_KEY)]),
    ("GET", "/nowhere", "", []),
    ("GET", "/admin/x", "", [("X-API-Key", API_KEY)]),
    ("GET", "/public/x", "", [("Origin", ALLOWED)]),
    ("GET", "/tenant/x", "", [("X-API-Key", API_KEY)]),  # the key carries no claims: 403
    ("GET", "/ws", "", [("Upgrade", "websocket"), ("Origin", "https://evil.example")]),
    ("GET", "/ws", "", [("Upgrade", "websocket"), ("Origin", ALLOWED)]),
]


@pytest.mark.parametrize(("method", "path", "query", "headers"), CASES)
async def test_explain_and_the_server_agree(
    app: tuple[App, config.Settings],
    method: str,
    path: str,
    query: str,
    headers: list[tuple[str, str]],
) -> None:
    await compare(*app, method, path, query, headers)


async def test_explain_and_the_server_agree_on_bearer_tokens(
    app: tuple[App, config.Settings],
) -> None:
    for tok in (token(), token(exp=int(time.time()) - 600), token(aud="other"), "not.a.jwt"):
        await compare(*app, "GET", "/api/x", "", [("Authorization", f"Bearer {tok}")])
    for tok in (token(t="a"), token(t="b"), token(t=["a"]), token()):
        await compare(*app, "GET", "/tenant/x", "", [("Authorization", f"Bearer {tok}")])


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "OPTIONS", "HEAD"]),
    path=st.sampled_from(["/api/m", "/public/p", "/admin/a", "/x", "/api/%2e%2e/a", "/api//a"]),
    origin=st.sampled_from([None, ALLOWED, "https://evil.example", "null"]),
    acr=st.sampled_from([None, "GET", "DELETE"]),
    credential=st.sampled_from([None, "key", "bad-key", "jwt", "bad-jwt"]),
)
async def test_explain_and_the_server_agree_on_any_mix(
    app: tuple[App, config.Settings],
    method: str,
    path: str,
    origin: str | None,
    acr: str | None,
    credential: str | None,
) -> None:
    headers: list[tuple[str, str]] = []
    if origin:
        headers.append(("Origin", origin))
    if acr:
        headers.append(("Access-Control-Request-Method", acr))
    if credential == "key":
        headers.append(("X-API-Key", API_KEY))
    elif credential == "bad-key":
        headers.append(("X-API-Key", "ak_wrong_0123456789"))
    elif credential == "jwt":
        headers.append(("Authorization", f"Bearer {token()}"))
    elif credential == "bad-jwt":
        headers.append(("Authorization", f"Bearer {token(iss='https://stranger')}"))
    await compare(*app, method, path, "", headers)
