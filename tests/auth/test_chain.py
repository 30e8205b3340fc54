"""The route's method chain: order, responsibility, optional auth, 401 vs 403 and challenges."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.auth import AuthService
from proxy.auth.apikeys import hash_key
from proxy.errors import InsufficientScope, Unauthorized
from proxy.telemetry.metrics import Metrics

from .conftest import MakeService
from .support import claims, make_settings, mint_pyjwt, provider, public_jwk, route, rsa_key

KEY = "ak_" + "k" * 40


@pytest.fixture
async def svc(make_service: MakeService, tmp_path: Path) -> AuthService:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(rsa_key(), "k1")]}))
    return await make_service(
        make_settings(
            [provider(jwks_file=str(path))],
            api_keys={"keys": [{"id": "bot", "sha256": hash_key(KEY), "scopes": ["models:read"]}]},
        ),
        metrics=Metrics(),
    )


def good() -> str:
    return mint_pyjwt(rsa_key(), "RS256", claims(scope="models:read models:write"), {"kid": "k1"})


def bad() -> str:
    return mint_pyjwt(rsa_key("attacker"), "RS256", claims(), {"kid": "k1"})


async def run(
    svc: AuthService,
    r: Any,
    *,
    bearer: str | None = None,
    key: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Any:
    h = list(headers or [])
    if bearer:
        h.append((b"authorization", b"Bearer " + bearer.encode()))
    if key:
        h.append((b"x-api-key", key.encode()))
    return await svc.authenticate(r, svc.extract(h, b"", websocket=False))


async def test_a_public_route_needs_nothing_and_ignores_garbage(svc: AuthService) -> None:
    assert await run(svc, route("public")) is None
    assert await run(svc, route("public"), bearer=bad(), key="nope") is None


async def test_missing_credentials_get_an_invalid_token_challenge(svc: AuthService) -> None:
    with pytest.raises(Unauthorized) as info:
        await run(svc, route(["jwt", "api_key"]))
    challenge = info.value.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer error="invalid_token", error_description="missing')
    assert info.value.details == {"reason": "missing_credentials"}
    assert "Bearer token or an API key (X-API-Key)" in info.value.message
    with pytest.raises(Unauthorized) as info:
        await run(svc, route(["api_key"]))
    assert "WWW-Authenticate" not in info.value.headers


async def test_a_non_bearer_authorization_is_mentioned_in_the_401(svc: AuthService) -> None:
    with pytest.raises(Unauthorized) as info:
        await run(svc, route(["jwt"]), headers=[(b"authorization", b"Basic Zm9vOmJhcg==")])
    assert "not a Bearer token" in info.value.message
    assert 'error="invalid_token"' in info.value.headers["WWW-Authenticate"]


async def test_the_first_method_that_finds_its_credential_decides(svc: AuthService) -> None:
    ident = await run(svc, route(["jwt", "api_key"]), key=KEY)
    assert ident.method == "api_key"
    ident = await run(svc, route(["jwt", "api_key"]), bearer=good(), key=KEY)
    assert ident.method == "jwt"
    ident = await run(svc, route(["api_key", "jwt"]), bearer=good(), key=KEY)
    assert ident.method == "api_key"
    # A bad token is a 401 even though a valid API key came along: no silent fallback.
    with pytest.raises(Unauthorized) as info:
        await run(svc, route(["jwt", "api_key"]), bearer=bad(), key=KEY)
    assert info.value.details == {"reason": "bad_signature", "method": "jwt"}
    # The API key is first here and decides.
    assert (await run(svc, route(["api_key", "jwt"]), bearer=bad(), key=KEY)).method == "api_key"


async def test_a_method_the_route_does_not_list_is_never_consulted(svc: AuthService) -> None:
    with pytest.raises(Unauthorized) as info:
        await run(svc, route(["api_key"]), bearer=good())
    assert info.value.details["reason"] == "missing_credentials"
    with pytest.raises(Unauthorized):
        await run(svc, route(["jwt"]), key=KEY)


async def test_auth_optional(svc: AuthService) -> None:
    r = route(["jwt", "api_key"], auth_optional=True)
    assert await run(svc, r) is None
    assert await run(svc, r, headers=[(b"authorization", b"Basic eDp5")]) is None
    assert (await run(svc, r, bearer=good())).subject == "alice"
    with pytest.raises(Unauthorized) as info:
        await run(svc, r, bearer=bad())
    assert info.value.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    with pytest.raises(Unauthorized):
        await run(svc, r, key="ak_wrong")
    with pytest.raises(Unauthorized):
        await run(
            svc, r, headers=[(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")]
        )


async def test_an_ambiguous_bearer_is_a_401_only_where_jwt_is_used(svc: AuthService) -> None:
    two = [(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")]
    with pytest.raises(Unauthorized) as info:
        await run(svc, route(["jwt", "api_key"]), headers=two, key=KEY)
    assert info.value.details["reason"] == "malformed_credentials"
    assert "two bearer tokens" in info.value.message
    assert (await run(svc, route(["api_key"]), headers=two, key=KEY)).subject == "bot"


async def test_missing_scopes_are_a_403_with_the_scope_challenge(svc: AuthService) -> None:
    r = route(["jwt", "api_key"], scopes=["models:read", "models:write"])
    assert (await run(svc, r, bearer=good())).subject == "alice"
    with pytest.raises(InsufficientScope) as info:
        await run(svc, r, key=KEY)
    exc = info.value
    assert exc.status == 403
    assert exc.details == {
        "missing_scopes": ["models:write"],
        "required_scopes": ["models:read", "models:write"],
    }
    assert exc.headers["WWW-Authenticate"] == (
        'Bearer error="insufficient_scope", error_description="missing required scope: '
        'models:write", scope="models:read models:write"'
    )


async def test_an_optional_route_with_scopes_does_not_let_anonymous_through(
    svc: AuthService,
) -> None:
    with pytest.raises(Unauthorized):
        await run(svc, route(["jwt"], auth_optional=True, scopes=["models:read"]))


async def test_outcomes_are_counted(make_service: MakeService, tmp_path: Path) -> None:
    metrics = Metrics()
    s = await make_service(
        make_settings(api_keys={"keys": [{"id": "bot", "sha256": hash_key(KEY)}]}), metrics=metrics
    )
    await run(s, route(["api_key"]), key=KEY)
    for _ in range(2):
        with pytest.raises(Unauthorized):
            await run(s, route(["api_key"]), key="ak_nope")
    with pytest.raises(Unauthorized):
        await run(s, route(["api_key"]))

    def n(method: str, result: str) -> float:
        v = metrics.registry.get_sample_value(
            "authproxy_auth_total", {"method": method, "result": result}
        )
        return v or 0.0

    assert n("api_key", "ok") == 1
    assert n("api_key", "unknown_api_key") == 2
    assert n("none", "missing_credentials") == 1
