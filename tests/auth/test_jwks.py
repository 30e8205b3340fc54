"""The JWKS cache against a real local endpoint that rotates keys, goes down and returns garbage."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from proxy.auth import AuthService
from proxy.auth.jwks import refresh_delay
from proxy.config import JwtProviderSettings
from proxy.errors import Unauthorized
from proxy.telemetry.metrics import Metrics

from .conftest import MakeService
from .support import (
    JwksServer,
    bearer_headers,
    claims,
    make_settings,
    mint_joserfc,
    mint_pyjwt,
    provider,
    public_jwk,
    route,
    rsa_key,
)

R = route(["jwt"])


def token(kid: str, key: str = "main", mint: Any = mint_pyjwt) -> str:
    return str(mint(rsa_key(key), "RS256", claims(), {"kid": kid}))


async def auth(svc: AuthService, tok: str) -> Any:
    return await svc.authenticate(R, svc.extract(bearer_headers(tok), b"", websocket=False))


async def reason_of(svc: AuthService, tok: str) -> str:
    with pytest.raises(Unauthorized) as info:
        await auth(svc, tok)
    return str(info.value.details["reason"])


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def started(
    make_service: MakeService, server: JwksServer, metrics: Metrics | None = None, **over: Any
) -> AuthService:
    over.setdefault("jwks_min_refresh_s", 0.3)
    return await make_service(
        make_settings([provider(jwks_url=server.url, **over)]), metrics=metrics
    )


async def test_keys_are_fetched_at_start_and_readiness_waits_for_them(
    make_service: MakeService, jwks_server: JwksServer
) -> None:
    jwks_server.keys = [public_jwk(rsa_key(), "k1")]
    svc = await started(make_service, jwks_server)
    assert svc.ready and jwks_server.fetches == 1
    for mint in (mint_pyjwt, mint_joserfc):
        assert (await auth(svc, token("k1", mint=mint))).subject == "alice"
    assert jwks_server.fetches == 1


async def test_an_endpoint_down_at_start_is_not_fatal_and_is_retried(
    make_service: MakeService, jwks_server: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    jwks_server.mode = "down"
    with caplog.at_level(logging.WARNING, "authproxy.auth"):
        svc = await started(make_service, jwks_server)
    assert not svc.ready
    assert "no keys yet" in caplog.text
    jwks_server.mode = "ok"
    jwks_server.keys = [public_jwk(rsa_key(), "k1")]
    for _ in range(40):  # the first retry comes after about a second
        if svc.ready:
            break
        await asyncio.sleep(0.1)
    assert svc.ready
    assert (await auth(svc, token("k1"))).subject == "alice"


async def test_a_slow_endpoint_times_out(
    make_service: MakeService, jwks_server: JwksServer
) -> None:
    jwks_server.keys = [public_jwk(rsa_key(), "k1")]
    jwks_server.delay_s = 0.8
    t0 = time.monotonic()
    svc = await started(make_service, jwks_server, jwks_timeout_s=0.2)
    assert time.monotonic() - t0 < 1.5
    assert not svc.ready
    assert "timed out" in (svc.jwt.jwks[0].last_error or "")


async def test_rotation_is_picked_up_on_an_unknown_kid(
    make_service: MakeService, jwks_server: JwksServer
) -> None:
    jwks_server.keys = [public_jwk(rsa_key(), "k1")]
    svc = await started(make_service, jwks_server)
    await auth(svc, token("k1"))
    # The IdP rotates: k2 appears (k1 stays for overlap), but too soon after the last fetch.
    jwks_server.keys = [public_jwk(rsa_key(), "k1"), public_jwk(rsa_key("next"), "k2")]
    await asyncio.sleep(0.35)
    assert (await auth(svc, token("k2", "next", mint_joserfc))).subject == "alice"
    assert jwks_server.fetches == 2
    # Another unknown kid right away does not refetch (at most once per min interval).
    assert await reason_of(svc, token("k3", "attacker")) == "unknown_kid"
    assert jwks_server.fetches == 2


async def test_unknown_kid_refetch_is_rate_limited_by_the_min_interval(
    make_service: MakeService, jwks_server: JwksServer
) -> None:
    jwks_server.keys = [public_jwk(rsa_key(), "k1")]
    svc = await started(make_service, jwks_server, jwks_min_refresh_s=30)
    jwks_server.keys = [public_jwk(rsa_key("next"), "k2")]
    for _ in range(20):
        assert await reason_of(svc, token("k2", "next")) == "unknown_kid"
    assert jwks_server.fetches == 1


async def test_a_burst_of_1000_bogus_kids_triggers_at_most_one_fetch(
    make_service: MakeService, jwks_server: JwksServer
) -> None:
    jwks_server.keys = [public_jwk(rsa_key(), "k1")]
    svc = await started(make_service, jwks_server)
    await asyncio.sleep(0.35)
    jwks_server.delay_s = 0.2  # the fetch is still running while the burst arrives
    before = jwks_server.fetches
    tokens = [token(f"bogus-{i}", "attacker") for i in range(20)]
    results = await asyncio.gather(
        *(auth(svc, tokens[i % 20]) for i in range(1000)), return_exceptions=True
    )
    assert jwks_server.fetches - before == 1
    assert all(
        isinstance(r, Unauthorized) and r.details["reason"] == "unknown_kid" for r in results
    )
    assert (await auth(svc, token("k1"))).subject == "alice"


@pytest.mark.parametrize("failure", ["down", "garbage", "empty"])
async def test_the_last_good_keys_are_kept_when_the_endpoint_fails(
    make_service: MakeService,
    jwks_server: JwksServer,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    metrics = Metrics()
    jwks_server.keys = [public_jwk(rsa_key(), "k1")]
    svc = await started(make_service, jwks_server, metrics=metrics)
    jwks_server.mode = failure
    await asyncio.sleep(0.35)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "authproxy.auth"):
        assert await reason_of(svc, token("k9", "attacker")) == "unknown_kid"  # forces a fetch
    assert jwks_server.fetches == 2
    lines = [r for r in caplog.records if "serving the last good keys" in r.getMessage()]
    assert len(lines) == 1
    assert sample(metrics, "authproxy_jwks_stale", provider="demo") == 1
    result = "error" if failure == "down" else "invalid"
    assert sample(metrics, "authproxy_jwks_fetches_total", provider="demo", result=result) == 1
    assert svc.ready
    assert (await auth(svc, token("k1"))).subject == "alice"  # stale keys still serve
    # Recovery clears the stale flag.
    jwks_server.mode = "ok"
    jwks_server.keys = [public_jwk(rsa_key(), "k1"), public_jwk(rsa_key("next"), "k2")]
    await asyncio.sleep(0.35)
    assert (await auth(svc, token("k2", "next"))).subject == "alice"
    assert sample(metrics, "authproxy_jwks_stale", provider="demo") == 0
    assert sample(metrics, "authproxy_jwks_fetches_total", provider="demo", result="ok") == 2


async def test_unusable_jwks_entries_are_skipped_without_failing_the_set(
    make_service: MakeService, jwks_server: JwksServer
) -> None:
    jwks_server.keys = [
        {"kty": "RSA", "kid": "bad", "n": 5},
        public_jwk(rsa_key("enc"), "enc", use="enc"),
        public_jwk(rsa_key(), "k1"),
    ]
    svc = await started(make_service, jwks_server)
    assert svc.ready
    assert (await auth(svc, token("k1"))).subject == "alice"
    assert await reason_of(svc, token("enc", "enc")) == "unknown_kid"


async def test_the_background_refresh_honours_max_age(
    make_service: MakeService, jwks_server: JwksServer
) -> None:
    jwks_server.keys = [public_jwk(rsa_key(), "k1")]
    jwks_server.cache_control = "public, max-age=1"
    svc = await started(make_service, jwks_server)
    assert svc.ready and jwks_server.fetches == 1
    await asyncio.sleep(1.5)
    assert jwks_server.fetches == 2


def test_max_age_is_clamped_to_the_provider_bounds() -> None:
    p = JwtProviderSettings.model_validate(
        {
            "name": "p",
            "issuer": "i",
            "audiences": ["a"],
            "jwks_url": "http://x/j",
            "algorithms": ["RS256"],
            "jwks_min_refresh_s": 30,
            "jwks_refresh_s": 300,
        }
    )
    assert refresh_delay(None, p) == 300
    assert refresh_delay("max-age=60", p) == 60
    assert refresh_delay("public, max-age=5", p) == 30
    assert refresh_delay("max-age=86400, must-revalidate", p) == 300
    assert refresh_delay("no-store", p) == 30
    assert refresh_delay("garbage", p) == 300


async def test_a_key_removed_from_the_jwks_evicts_cached_tokens(
    make_service: MakeService, jwks_server: JwksServer
) -> None:
    jwks_server.keys = [public_jwk(rsa_key(), "k1"), public_jwk(rsa_key("leaked"), "k2")]
    svc = await started(make_service, jwks_server)
    leaked = token("k2", "leaked")
    assert (await auth(svc, leaked)).subject == "alice"  # now cached
    jwks_server.keys = [public_jwk(rsa_key(), "k1")]
    await asyncio.sleep(0.35)
    await reason_of(svc, token("k7", "attacker"))  # an unknown kid triggers the refetch
    assert await reason_of(svc, leaked) == "unknown_kid"
