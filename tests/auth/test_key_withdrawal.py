"""Signing keys that leave a provider's set: the identities they produced are announced (so open
WebSockets can be closed) and their cached verdicts dropped; a failed fetch never withdraws."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from proxy.auth import AuthService
from proxy.auth.keys import load_pem, parse_jwk
from proxy.errors import Unauthorized
from proxy.identity import Identity
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
    public_pem,
    route,
    rsa_key,
)

R = route(["jwt"])
RS256 = frozenset({"RS256"})
Heard = list[tuple[str, frozenset[str]]]


def fingerprint(key_name: str) -> str:
    return parse_jwk(public_jwk(rsa_key(key_name)), RS256).fingerprint


def token(kid: str | None, key: str, sub: str = "alice") -> str:
    return mint_pyjwt(rsa_key(key), "RS256", claims(sub=sub), {"kid": kid} if kid else None)


async def auth(svc: AuthService, tok: str) -> Identity:
    identity = await svc.authenticate(R, svc.extract(bearer_headers(tok), b"", websocket=False))
    assert identity is not None
    return identity


async def reason_of(svc: AuthService, tok: str) -> str:
    with pytest.raises(Unauthorized) as info:
        await auth(svc, tok)
    return str(info.value.details["reason"])


def hits(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("authproxy_jwt_cache_total", {"result": "hit"}) or 0


def listen(svc: AuthService) -> Heard:
    heard: Heard = []
    svc.subscribe_key_withdrawals(lambda name, keys: heard.append((name, keys)))
    return heard


async def two_key_service(
    make_service: MakeService, server: JwksServer, metrics: Metrics | None = None, **over: Any
) -> AuthService:
    server.keys = [public_jwk(rsa_key("main"), "k1"), public_jwk(rsa_key("leaked"), "k2")]
    over.setdefault("jwks_min_refresh_s", 0.3)
    return await make_service(
        make_settings([provider(jwks_url=server.url, **over)]), metrics=metrics
    )


async def test_a_verified_token_names_its_provider_and_the_key_that_verified_it(
    make_service: MakeService, jwks_server: JwksServer
) -> None:
    svc = await two_key_service(make_service, jwks_server)
    one = await auth(svc, token("k1", "main"))
    two = await auth(svc, token("k2", "leaked"))
    assert (one.credential_id, one.signing_key) == ("demo", fingerprint("main"))
    assert (two.credential_id, two.signing_key) == ("demo", fingerprint("leaked"))
    # Without a `kid` the keys are tried in turn: the one that verified is named.
    blind = await auth(svc, token(None, "leaked", sub="bob"))
    assert blind.signing_key == fingerprint("leaked")


async def test_a_key_leaving_the_jwks_is_announced_and_only_its_cached_tokens_are_dropped(
    make_service: MakeService, jwks_server: JwksServer
) -> None:
    metrics = Metrics()
    svc = await two_key_service(make_service, jwks_server, metrics)
    kept, leaked = token("k1", "main"), token("k2", "leaked")
    await auth(svc, kept)
    await auth(svc, leaked)  # both cached now
    heard = listen(svc)
    jwks_server.keys = [public_jwk(rsa_key("main"), "k1")]
    await svc.jwt.jwks[0].refresh()
    assert heard == [("demo", frozenset({fingerprint("leaked")}))]
    before = hits(metrics)
    assert (await auth(svc, kept)).signing_key == fingerprint("main")
    assert hits(metrics) == before + 1  # the remaining key's verdicts are still served
    assert await reason_of(svc, leaked) == "unknown_kid"


async def test_the_background_refresh_announces_a_withdrawal(
    make_service: MakeService, jwks_server: JwksServer
) -> None:
    jwks_server.cache_control = "max-age=1"
    svc = await two_key_service(make_service, jwks_server)
    heard = listen(svc)
    jwks_server.keys = [public_jwk(rsa_key("main"), "k1")]
    for _ in range(60):
        await asyncio.sleep(0.05)
        if heard:
            break
    assert heard == [("demo", frozenset({fingerprint("leaked")}))]


async def test_an_unknown_kid_refresh_announces_a_withdrawal(
    make_service: MakeService, jwks_server: JwksServer
) -> None:
    svc = await two_key_service(make_service, jwks_server)
    heard = listen(svc)
    jwks_server.keys = [public_jwk(rsa_key("main"), "k1"), public_jwk(rsa_key("next"), "k3")]
    await asyncio.sleep(0.35)
    assert (await auth(svc, token("k3", "next"))).subject == "alice"  # fetches the new set
    assert heard == [("demo", frozenset({fingerprint("leaked")}))]


@pytest.mark.parametrize("failure", ["down", "garbage", "empty", "slow"])
async def test_a_failed_fetch_is_never_a_withdrawal(
    make_service: MakeService, jwks_server: JwksServer, failure: str
) -> None:
    svc = await two_key_service(make_service, jwks_server, jwks_timeout_s=0.2)
    kept, other = token("k1", "main"), token("k2", "leaked")
    await auth(svc, kept)
    heard = listen(svc)
    if failure == "slow":
        jwks_server.delay_s = 1.0
    else:
        jwks_server.mode = failure
    await svc.jwt.jwks[0].refresh()
    assert svc.jwt.jwks[0].stale
    assert heard == []
    # Stale keys keep serving, cached or not.
    assert (await auth(svc, kept)).signing_key == fingerprint("main")
    assert (await auth(svc, other)).signing_key == fingerprint("leaked")
    # Recovery with the same set withdraws nothing either.
    jwks_server.mode, jwks_server.delay_s = "ok", 0.0
    await svc.jwt.jwks[0].refresh()
    assert not svc.jwt.jwks[0].stale and heard == []


async def test_adding_a_key_withdraws_nothing(
    make_service: MakeService, jwks_server: JwksServer
) -> None:
    metrics = Metrics()
    svc = await two_key_service(make_service, jwks_server, metrics)
    await auth(svc, token("k1", "main"))
    heard = listen(svc)
    jwks_server.keys.append(public_jwk(rsa_key("next"), "k3"))
    await svc.jwt.jwks[0].refresh()
    assert heard == []
    before = hits(metrics)
    await auth(svc, token("k1", "main"))
    assert hits(metrics) == before + 1


async def test_a_jwks_file_rewritten_without_a_key_announces_it_on_reload(
    make_service: MakeService, tmp_path: Path
) -> None:
    path = tmp_path / "jwks.json"
    both = {"keys": [public_jwk(rsa_key("main"), "k1"), public_jwk(rsa_key("leaked"), "k2")]}
    path.write_text(json.dumps(both))
    svc = await make_service(make_settings([provider(jwks_file=str(path))]))
    leaked = token("k2", "leaked")
    assert (await auth(svc, leaked)).signing_key == fingerprint("leaked")
    heard = listen(svc)
    svc.reload_keys()  # SIGHUP with the file unchanged
    assert heard == []
    path.write_text("not json{")
    svc.reload_keys()  # a bad file keeps the old keys: nothing withdrawn
    assert heard == []
    assert (await auth(svc, leaked)).subject == "alice"
    path.write_text(json.dumps({"keys": [public_jwk(rsa_key("main"), "k1")]}))
    svc.reload_keys()
    assert heard == [("demo", frozenset({fingerprint("leaked")}))]
    assert await reason_of(svc, leaked) == "unknown_kid"


async def test_a_replaced_public_key_file_withdraws_the_old_key(
    make_service: MakeService, tmp_path: Path
) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(public_pem(rsa_key("main")))
    svc = await make_service(make_settings([provider(public_key_file=str(path))]))
    old = token(None, "main")
    assert (await auth(svc, old)).signing_key == load_pem(path.read_bytes(), RS256).fingerprint
    heard = listen(svc)
    path.write_bytes(public_pem(rsa_key("next")))
    svc.reload_keys()
    assert heard == [("demo", frozenset({fingerprint("main")}))]
    assert await reason_of(svc, old) == "bad_signature"
    assert (await auth(svc, token(None, "next"))).signing_key == fingerprint("next")


async def test_a_failing_subscriber_neither_breaks_the_refresh_nor_the_others(
    make_service: MakeService, jwks_server: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    svc = await two_key_service(make_service, jwks_server)

    def broken(_: str, __: frozenset[str]) -> None:
        raise RuntimeError("boom")

    svc.subscribe_key_withdrawals(broken)
    heard = listen(svc)
    jwks_server.keys = [public_jwk(rsa_key("main"), "k1")]
    with caplog.at_level(logging.ERROR, "authproxy.auth"):
        await svc.jwt.jwks[0].refresh()
    assert heard == [("demo", frozenset({fingerprint("leaked")}))]
    assert "withdrawal callback failed" in caplog.text
    assert not svc.jwt.jwks[0].stale


async def test_an_unsubscribed_callback_hears_nothing(
    make_service: MakeService, jwks_server: JwksServer
) -> None:
    svc = await two_key_service(make_service, jwks_server)
    heard: Heard = []
    unsubscribe = svc.subscribe_key_withdrawals(lambda n, k: heard.append((n, k)))
    unsubscribe()
    jwks_server.keys = [public_jwk(rsa_key("main"), "k1")]
    await svc.jwt.jwks[0].refresh()
    assert heard == []
