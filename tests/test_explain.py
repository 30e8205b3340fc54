"""`explain` tells an operator, in words, why a request is accepted or refused."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import jwt as pyjwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from proxy.auth import hash_key
from proxy.config import Settings, from_dict
from proxy.explain import explain

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
API_KEY = "ak_" + "e" * 40
ISS = "https://idp.explain.test"


@pytest.fixture
async def jwks() -> AsyncIterator[dict[str, Any]]:
    state: dict[str, Any] = {"down": False}

    async def handle(_: web.Request) -> web.Response:
        if state["down"]:
            return web.Response(status=500)
        jwk = RSAAlgorithm.to_jwk(KEY.public_key(), as_dict=True)
        return web.json_response({"keys": [{**jwk, "kid": "k1"}]})

    app = web.Application()
    app.router.add_get("/jwks", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}/jwks"
    yield state
    await runner.cleanup()


def settings(url: str) -> Settings:
    return from_dict(
        {
            "auth": {
                "jwt": {
                    "providers": [
                        {
                            "name": "demo",
                            "issuer": ISS,
                            "audiences": ["webplus"],
                            "jwks_url": url,
                            "algorithms": ["RS256"],
                            "jwks_timeout_s": 1,
                        }
                    ]
                },
                "api_keys": {
                    "keys": [
                        {"id": "ci-bot", "sha256": hash_key(API_KEY), "scopes": ["models:read"]}
                    ]
                },
            },
            "routes": [
                {"path": "/auth/*", "auth": "public"},
                {"path": "/api/admin/*", "auth": ["jwt", "api_key"], "scopes": ["models:write"]},
                {
                    "path": "/api/tenants/*",
                    "auth": ["jwt"],
                    "require_claims": {"groups": ["ml-admins"], "tenant": "acme"},
                },
                {"path": "/api/*", "auth": ["jwt", "api_key"], "scopes": ["models:read"]},
                {"path": "/ws", "auth": ["jwt", "api_key"]},
            ],
        }
    )


def token(**over: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": ISS,
        "aud": "webplus",
        "sub": "alice@example.com",
        "iat": now,
        "exp": now + 300,
        "scope": "models:read",
        **over,
    }
    return pyjwt.encode(claims, KEY, algorithm="RS256", headers={"kid": "k1"})


async def test_an_accepted_jwt_shows_route_method_and_identity(jwks: dict[str, Any]) -> None:
    tok = token()
    ok, text = await explain(
        settings(jwks["url"]), "get", "/api/models?limit=5", [("Authorization", f"Bearer {tok}")]
    )
    assert ok
    assert "/api/models" in text and "routes[3] '/api/*'" in text
    assert "try jwt:" in text and "ACCEPTED as jwt 'alice@example.com'" in text
    assert "X-Auth-Subject: alice@example.com" in text and "X-Auth-Issuer: " + ISS in text
    assert "provider:" in text and "'demo'" in text
    assert tok not in text and tok.split(".")[2] not in text
    assert "sha256:" in text


async def test_an_expired_token_gives_the_exact_reason(jwks: dict[str, Any]) -> None:
    tok = token(exp=int(time.time()) - 3600)
    ok, text = await explain(
        settings(jwks["url"]), "GET", "/api/models", [("Authorization", f"Bearer {tok}")]
    )
    assert not ok
    assert "REFUSED 401 unauthorized: token expired" in text
    assert 'WWW-Authenticate: Bearer error="invalid_token"' in text
    assert tok not in text


async def test_an_expired_token_shows_exp_how_long_ago_the_leeway_and_the_clock(
    jwks: dict[str, Any],
) -> None:
    exp = int(time.time()) - 3600
    tok = token(exp=exp, iat=exp - 300)
    ok, text = await explain(
        settings(jwks["url"]), "GET", "/api/models", [("Authorization", f"Bearer {tok}")]
    )
    assert not ok
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(exp))
    token_line = next(line for line in text.splitlines() if line.startswith("token:"))
    assert (
        f"exp {stamp}.000Z (60 min 0 s ago)" in token_line
        or f"exp {stamp}.000Z (60 min 1 s ago)" in token_line
    )
    assert f"iss '{ISS}'" in token_line and "iat " in token_line
    clock = next(line for line in text.splitlines() if line.startswith("clock:"))
    assert "leeway 30 s" in clock and time.strftime("%Y-%m-%dT", time.gmtime()) in clock
    assert "expired 60 min" in text and "(refused since exp + leeway, 59 min" in text
    assert tok not in text and tok.split(".")[1] not in text


async def test_a_valid_token_shows_when_it_expires(jwks: dict[str, Any]) -> None:
    ok, text = await explain(
        settings(jwks["url"]), "GET", "/api/models", [("Authorization", f"Bearer {token()}")]
    )
    assert ok
    assert "(in 5 min 0 s)" in text or "(in 4 min 59 s)" in text
    assert "expired" not in text


async def test_an_unknown_issuer_shows_the_tokens_iss_beside_the_configured_ones(
    jwks: dict[str, Any],
) -> None:
    tok = token(iss="https://elsewhere.test")
    ok, text = await explain(
        settings(jwks["url"]), "GET", "/api/models", [("Authorization", f"Bearer {tok}")]
    )
    assert not ok
    assert "the token's iss 'https://elsewhere.test' names no configured provider" in text
    assert f"configured issuers: '{ISS}' (demo)" in text
    assert "REFUSED 401 unauthorized: unknown issuer" in text


async def test_methods_tried_in_order_and_scope_refusal(jwks: dict[str, Any]) -> None:
    ok, text = await explain(
        settings(jwks["url"]), "POST", "/api/admin/reset", [("X-API-Key", API_KEY)]
    )
    assert not ok
    lines = text.splitlines()
    jwt_line = next(i for i, line in enumerate(lines) if line.startswith("try jwt:"))
    key_line = next(i for i, line in enumerate(lines) if line.startswith("try api_key:"))
    assert jwt_line < key_line
    assert "not responsible" in lines[jwt_line]
    assert "accepted" in lines[key_line]
    assert "REFUSED 403 forbidden: missing required scope: models:write" in text
    assert API_KEY not in text


async def test_no_route_and_bad_paths(jwks: dict[str, Any]) -> None:
    ok, text = await explain(settings(jwks["url"]), "GET", "/nowhere", [])
    assert not ok and "no route matches GET /nowhere" in text and "404" in text
    ok, text = await explain(settings(jwks["url"]), "GET", "/auth/../api/models", [])
    assert not ok and "REFUSED 400 bad_request" in text and "dot-segments" in text
    ok, text = await explain(settings(jwks["url"]), "GET", "http://x/auth/login", [])
    assert ok and "ACCEPTED anonymously (public route)" in text


async def test_query_tokens_count_only_on_websocket_handshakes(jwks: dict[str, Any]) -> None:
    tok = token()
    ok, text = await explain(settings(jwks["url"]), "GET", f"/ws?token={tok}&room=1", [])
    assert not ok and "missing credentials" in text and "?room=1" in text
    ok, text = await explain(
        settings(jwks["url"]),
        "GET",
        f"/ws?token={tok}&room=1",
        [("Upgrade", "websocket"), ("Connection", "Upgrade")],
    )
    assert ok and "bearer token from the query" in text and "(WebSocket handshake)" in text
    assert tok not in text


async def test_an_unreachable_jwks_is_reported(jwks: dict[str, Any]) -> None:
    jwks["down"] = True
    ok, text = await explain(
        settings(jwks["url"]), "GET", "/api/models", [("Authorization", f"Bearer {token()}")]
    )
    assert not ok
    assert "NO KEYS" in text and "HTTP 500" in text
    assert "REFUSED 503 service_unavailable" in text


async def test_claim_rules_are_shown_with_what_each_token_makes_of_them(
    jwks: dict[str, Any],
) -> None:
    s = settings(jwks["url"])
    good = token(groups=["users", "ml-admins"], tenant="acme")
    ok, text = await explain(s, "GET", "/api/tenants/1", [("Authorization", f"Bearer {good}")])
    assert ok, text
    assert "claims groups in ['ml-admins'], tenant = 'acme'" in text  # the route line
    assert "claims:       groups in ['ml-admins'], tenant = 'acme' -> all hold" in text
    wrong = token(groups=["ml-admins"], tenant="globex")
    ok, text = await explain(s, "GET", "/api/tenants/1", [("Authorization", f"Bearer {wrong}")])
    assert not ok
    assert "-> claim 'tenant' does not match what this route requires" in text
    assert "REFUSED 403 forbidden: claim 'tenant' does not match" in text
    assert "globex" not in text


async def test_an_ipv6_listen_address_gives_a_valid_host() -> None:
    """The Host explain supplies is `server.listen` as written ([::1]:8000), which the server's
    own Host check accepts; `::1:8000` would be a 400 no real client gets."""
    s = from_dict(
        {
            "server": {"listen": "[::1]:8000"},
            "admin": {"listen": "[::1]:8001"},
            "routes": [{"path": "/*", "auth": "public"}],
        }
    )
    ok, text = await explain(s, "GET", "/x", [])
    assert ok and "ACCEPTED" in text and "invalid_host" not in text
