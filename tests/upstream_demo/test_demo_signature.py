"""upstream_demo's identity-signature check against headers the sidecar's own HeaderPolicy made:
the two implementations (and the README's verifier) agree, and a captured set is refused for any
other request line, identity or time."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from proxy import config
from proxy.auth import consumed_headers
from proxy.identity import Identity
from proxy.relay.headers import HeaderPolicy
from upstream_demo.app import create_app

SECRET = "demo-identity-secret"
START = 1_700_000_000.0
ALICE = Identity(
    method="jwt",
    subject="admin@example.com",
    scopes=frozenset({"models:read", "models:write"}),
    issuer="http://127.0.0.1:9000",
)
BOT = Identity(method="api_key", subject="ci-bot", scopes=frozenset({"models:read"}))


class Clock:
    """One clock for the sidecar's stamp and the demo's check, stepped by the test."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def sidecar(monkeypatch: pytest.MonkeyPatch, clock: Clock, scheme: str = "v2") -> HeaderPolicy:
    monkeypatch.setenv("DEMO_ID_SECRET", SECRET)
    settings = config.from_dict(
        {"identity": {"sign": True, "secret_env": "DEMO_ID_SECRET", "signature": scheme}}
    )
    return HeaderPolicy(settings, credential_headers=consumed_headers(settings.auth), clock=clock)


def signed(
    p: HeaderPolicy,
    method: str = "GET",
    path: str = "/api/whoami",
    query: str = "",
    identity: Identity | None = ALICE,
) -> list[tuple[str, str]]:
    out = p.upstream_request(
        [(b"host", b"demo")],
        peer="127.0.0.1",
        scheme="http",
        request_id="req-1",
        identity=identity,
        method=method,
        raw_path=path.encode(),
        query=query.encode(),
    )
    return [(name.decode("latin-1"), value.decode("utf-8")) for name, value in out]


def demo(clock: Callable[[], float], **kwargs: Any) -> Starlette:
    return create_app(simulate=False, clock=clock, identity_secret=SECRET.encode(), **kwargs)


@pytest.fixture
async def client(clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=demo(clock, identity_max_skew_s=30))
    async with httpx.AsyncClient(transport=transport, base_url="http://demo") as http:
        yield http


def reason(response: httpx.Response) -> str:
    assert response.status_code == 401, response.text
    found: str = response.json()["details"]["reason"]
    return found


async def test_what_the_sidecar_signs_passes_the_demos_check(
    monkeypatch: pytest.MonkeyPatch, clock: Clock, client: httpx.AsyncClient
) -> None:
    p = sidecar(monkeypatch, clock)
    r = await client.get("/api/whoami", headers=signed(p))
    assert r.status_code == 200, r.text
    assert r.json()["subject"] == "admin@example.com"
    r = await client.get("/api/whoami?b=2&a=1", headers=signed(p, query="b=2&a=1"))
    assert r.status_code == 200, r.text
    r = await client.get("/api/models", headers=signed(p, path="/api/models", identity=BOT))
    assert r.status_code == 200, r.text
    r = await client.get("/api/whoami", headers=signed(p, identity=None))
    assert r.status_code == 200 and r.json()["subject"] is None


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "/api/models"),
        ("POST", "/api/whoami"),
        ("DELETE", "/api/whoami"),
        ("GET", "/api/whoami?admin=1"),
        ("GET", "/api/%77hoami"),
    ],
)
async def test_a_captured_set_is_refused_on_another_method_path_or_query(
    monkeypatch: pytest.MonkeyPatch, clock: Clock, client: httpx.AsyncClient, method: str, url: str
) -> None:
    captured = signed(sidecar(monkeypatch, clock))
    assert reason(await client.request(method, url, headers=captured)) == "bad_signature"


@pytest.mark.parametrize(("step", "accepted"), [(30, True), (31, False), (-31, False)])
async def test_a_captured_set_is_refused_outside_the_window(
    monkeypatch: pytest.MonkeyPatch,
    clock: Clock,
    client: httpx.AsyncClient,
    step: float,
    accepted: bool,
) -> None:
    captured = signed(sidecar(monkeypatch, clock))
    clock.now += step
    r = await client.get("/api/whoami", headers=captured)
    if accepted:
        assert r.status_code == 200, r.text
    else:
        assert reason(r) == "stale"


def edit(headers: list[tuple[str, str]], name: str, value: str | None) -> list[tuple[str, str]]:
    out = [(n, v) for n, v in headers if n.lower() != name]
    return out if value is None else [*out, (name, value)]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda h: edit(h, "x-auth-subject", "root@example.com"), "bad_signature"),
        (lambda h: edit(h, "x-auth-scopes", "models:read models:write admin"), "bad_signature"),
        (lambda h: edit(h, "x-request-id", "req-2"), "bad_signature"),
        (lambda h: edit(h, "x-auth-timestamp", str(int(START) + 1)), "bad_signature"),
        (lambda h: edit(h, "x-auth-issuer", None), "bad_signature"),
        (lambda h: edit(h, "x-auth-signed-headers", "x-auth-subject"), "unsigned_header"),
        (lambda h: edit(h, "x-auth-signed-headers", None), "unsigned_header"),
        (lambda h: edit(h, "x-auth-timestamp", None), "unsigned"),
        (lambda h: edit(h, "x-auth-signature", "v1=" + "0" * 64), "bad_signature"),
        (lambda h: [*h, ("X-Auth-Tenant", "acme")], "unsigned_header"),
        (lambda h: [*h, ("X-Auth-Subject", "root@example.com")], "duplicate_header"),
        (lambda h: [*h, ("X-Auth-Signature", "v2=" + "0" * 64)], "duplicate_header"),
    ],
)
async def test_a_tampered_set_is_refused(
    monkeypatch: pytest.MonkeyPatch,
    clock: Clock,
    client: httpx.AsyncClient,
    change: Callable[[list[tuple[str, str]]], list[tuple[str, str]]],
    expected: str,
) -> None:
    captured = change(signed(sidecar(monkeypatch, clock)))
    assert reason(await client.get("/api/whoami", headers=captured)) == expected


async def test_an_issuer_added_to_an_api_key_set_is_refused(
    monkeypatch: pytest.MonkeyPatch, clock: Clock, client: httpx.AsyncClient
) -> None:
    captured = signed(sidecar(monkeypatch, clock), identity=BOT)
    r = await client.get("/api/whoami", headers=[*captured, ("X-Auth-Issuer", "https://evil")])
    assert reason(r) == "unsigned_header"


async def test_the_demo_accepts_only_the_scheme_it_is_configured_for(
    monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> None:
    v1 = httpx.ASGITransport(app=demo(clock, identity_signature="v1"))
    async with httpx.AsyncClient(transport=v1, base_url="http://demo") as http:
        r = await http.get("/api/whoami", headers=signed(sidecar(monkeypatch, clock, "v1")))
        assert r.status_code == 200, r.text
        r = await http.get("/api/whoami", headers=signed(sidecar(monkeypatch, clock)))
        assert r.status_code == 401
    v2 = httpx.ASGITransport(app=demo(clock))
    async with httpx.AsyncClient(transport=v2, base_url="http://demo") as http:
        r = await http.get("/api/whoami", headers=signed(sidecar(monkeypatch, clock, "v1")))
        assert reason(r) == "unsigned"


def readme_verifier() -> Callable[..., dict[bytes, bytes]]:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("#### Signed identity") :]
    block = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert block is not None, "the Signed identity section has no Python verifier"
    namespace: dict[str, Any] = {}
    exec(block.group(1), namespace)
    found: Callable[..., dict[bytes, bytes]] = namespace["verify_v2"]
    return found


def test_the_readme_verifier_accepts_the_sidecars_headers_and_refuses_a_replay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    clock.now = time.time()
    verify = readme_verifier()
    identity = Identity(
        method="jwt",
        subject="alice",
        scopes=frozenset({"a"}),
        issuer="https://idp",
        claim_headers=(("X-User-Email", "alice@example.com"),),
    )
    headers = {
        n.lower().encode(): v.encode()
        for n, v in signed(sidecar(monkeypatch, clock), query="q=1", identity=identity)
    }
    trusted = verify(SECRET.encode(), b"GET", b"/api/whoami", b"q=1", headers)
    assert trusted[b"x-user-email"] == b"alice@example.com"
    assert trusted[b"x-auth-subject"] == b"alice"
    with pytest.raises(ValueError, match="bad X-Auth-Signature"):
        verify(SECRET.encode(), b"GET", b"/api/models", b"q=1", headers)
    with pytest.raises(ValueError, match="bad X-Auth-Signature"):
        verify(SECRET.encode(), b"POST", b"/api/whoami", b"q=1", headers)
    with pytest.raises(ValueError, match="not cover"):
        verify(SECRET.encode(), b"GET", b"/api/whoami", b"q=1", {**headers, b"x-auth-x": b"1"})
