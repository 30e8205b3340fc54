"""The verified-token cache: a repeated token costs a lookup, never outlives its `exp`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.auth import AuthService
from proxy.errors import Unauthorized
from proxy.telemetry.metrics import Metrics

from .conftest import MakeService
from .support import (
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


async def auth(svc: AuthService, tok: str) -> Any:
    return await svc.authenticate(R, svc.extract(bearer_headers(tok), b"", websocket=False))


def cache(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value("authproxy_jwt_cache_total", {"result": result}) or 0


@pytest.fixture
async def svc_metrics(make_service: MakeService, tmp_path: Path) -> tuple[AuthService, Metrics]:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(rsa_key(), "k1")]}))
    metrics = Metrics()
    svc = await make_service(
        make_settings([provider(jwks_file=str(path), leeway_s=0)]), metrics=metrics
    )
    return svc, metrics


async def test_a_repeated_token_is_a_cache_hit_and_skips_the_signature(
    svc_metrics: tuple[AuthService, Metrics], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, metrics = svc_metrics
    tok = mint_pyjwt(rsa_key(), "RS256", claims(), {"kid": "k1"})
    first = await auth(svc, tok)
    assert (cache(metrics, "miss"), cache(metrics, "hit")) == (1, 0)
    provider_obj = svc.jwt.providers[0]

    async def boom(*_: Any) -> Any:
        raise AssertionError("verified again")

    monkeypatch.setattr(provider_obj, "verify", boom)
    assert await auth(svc, tok) is first
    assert (cache(metrics, "miss"), cache(metrics, "hit")) == (1, 1)


async def test_a_cached_token_expires_at_its_exp(
    svc_metrics: tuple[AuthService, Metrics], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, metrics = svc_metrics
    now = time.time()
    tok = mint_pyjwt(rsa_key(), "RS256", claims(exp=int(now) + 100), {"kid": "k1"})
    await auth(svc, tok)
    await auth(svc, tok)
    assert cache(metrics, "hit") == 1
    monkeypatch.setattr(time, "time", lambda: now + 101)
    with pytest.raises(Unauthorized) as info:
        await auth(svc, tok)
    assert info.value.details["reason"] == "token_expired"
    assert cache(metrics, "hit") == 1


async def test_the_cache_is_bounded(make_service: MakeService, tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(rsa_key(), "k1")]}))
    metrics = Metrics()
    from proxy.config import from_dict

    settings = from_dict(
        {
            "auth": {"jwt": {"cache_size": 3, "providers": [provider(jwks_file=str(path))]}},
            "routes": [{"path": "/*", "auth": ["jwt"]}],
        }
    )
    svc = await make_service(settings, metrics=metrics)
    tokens = [mint_pyjwt(rsa_key(), "RS256", claims(sub=f"u{i}"), {"kid": "k1"}) for i in range(5)]
    for tok in tokens:
        await auth(svc, tok)
    assert len(svc.jwt.cache) == 3
    await auth(svc, tokens[0])  # evicted: a miss
    await auth(svc, tokens[4])  # recent: a hit
    assert cache(metrics, "miss") == 6 and cache(metrics, "hit") == 1


async def test_refused_tokens_are_not_cached(svc_metrics: tuple[AuthService, Metrics]) -> None:
    svc, metrics = svc_metrics
    tok = mint_pyjwt(rsa_key("attacker"), "RS256", claims(), {"kid": "k1"})
    for _ in range(3):
        with pytest.raises(Unauthorized):
            await auth(svc, tok)
    assert cache(metrics, "hit") == 0 and cache(metrics, "miss") == 3
