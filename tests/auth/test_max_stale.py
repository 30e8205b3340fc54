"""`max_stale_s`: keys keep serving while the JWKS endpoint fails, up to the bound; beyond it the
provider's tokens get 503 jwks_unavailable (never 401), cached verdicts included, readiness and
metrics say so; when the endpoint answers again, tokens are accepted again."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.auth import AuthService
from proxy.errors import ServiceUnavailable
from proxy.telemetry.metrics import Metrics

from .conftest import MakeService
from .support import (
    JwksServer,
    bearer_headers,
    claims,
    make_settings,
    mint_pyjwt,
    provider,
    public_jwk,
    route,
    rsa_key,
)

R = route(["jwt"])


def token(sub: str = "alice") -> str:
    return str(mint_pyjwt(rsa_key(), "RS256", claims(sub=sub), {"kid": "k1"}))


async def auth(svc: AuthService, tok: str) -> Any:
    return await svc.authenticate(R, svc.extract(bearer_headers(tok), b"", websocket=False))


def sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name, {"provider": "demo"}) or 0.0


async def started(
    make_service: MakeService, server: JwksServer, metrics: Metrics, max_stale_s: float
) -> AuthService:
    server.keys = [public_jwk(rsa_key(), "k1")]
    settings = make_settings(
        [provider(jwks_url=server.url, jwks_min_refresh_s=0.2, max_stale_s=max_stale_s)]
    )
    return await make_service(settings, metrics=metrics)


async def test_keys_serve_within_the_bound_then_503_beyond_it_then_recover(
    make_service: MakeService, jwks_server: JwksServer
) -> None:
    metrics = Metrics()
    svc = await started(make_service, jwks_server, metrics, max_stale_s=0.6)
    cached = token("cached")
    assert (await auth(svc, cached)).subject == "cached"

    jwks_server.mode = "down"
    await svc.jwt.jwks[0].refresh()
    assert svc.jwt.jwks[0].stale
    # Within the bound: a stale key still verifies a new token.
    assert (await auth(svc, token("within"))).subject == "within"
    assert sample(metrics, "authproxy_jwks_stale_since_seconds") > 0
    assert svc.jwt.unavailable == []

    await asyncio.sleep(0.8)
    assert svc.jwt.unavailable == ["demo"]
    assert sample(metrics, "authproxy_jwks_unavailable") == 1
    fetches = jwks_server.fetches
    for tok in (token("beyond"), cached):  # a cached verdict is not honoured either
        with pytest.raises(ServiceUnavailable) as info:
            await auth(svc, tok)
        assert info.value.status == 503 and info.value.code == "service_unavailable"
        assert info.value.details == {"reason": "jwks_unavailable", "provider": "demo"}
        assert "Retry-After" in info.value.headers
    # Each refused token asked for a refetch, rate-limited: at most one for the two.
    assert jwks_server.fetches - fetches <= 1

    jwks_server.mode = "ok"
    await asyncio.sleep(0.3)  # past jwks_min_refresh_s: the next token may refetch
    assert (await auth(svc, token("back"))).subject == "back"
    assert svc.jwt.unavailable == [] and not svc.jwt.jwks[0].stale
    assert sample(metrics, "authproxy_jwks_unavailable") == 0
    assert sample(metrics, "authproxy_jwks_stale_since_seconds") == 0


async def test_a_recovery_before_the_bound_cancels_it(
    make_service: MakeService, jwks_server: JwksServer
) -> None:
    metrics = Metrics()
    svc = await started(make_service, jwks_server, metrics, max_stale_s=0.5)
    jwks_server.mode = "down"
    await svc.jwt.jwks[0].refresh()
    jwks_server.mode = "ok"
    await svc.jwt.jwks[0].refresh()
    await asyncio.sleep(0.7)
    assert svc.jwt.unavailable == []
    assert (await auth(svc, token())).subject == "alice"


async def test_a_provider_that_never_had_keys_is_503_keys_unavailable_not_jwks_unavailable(
    make_service: MakeService, jwks_server: JwksServer
) -> None:
    jwks_server.mode = "down"
    svc = await make_service(
        make_settings([provider(jwks_url=jwks_server.url, max_stale_s=0)]), metrics=Metrics()
    )
    with pytest.raises(ServiceUnavailable) as info:
        await auth(svc, token())
    assert info.value.details["reason"] == "keys_unavailable"


def test_max_stale_defaults_to_a_day() -> None:
    settings = make_settings([provider(jwks_url="https://idp.example.test/jwks")])
    assert settings.auth.jwt.providers[0].max_stale_s == 86400
