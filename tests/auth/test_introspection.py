"""RFC 7662 introspection of opaque bearer tokens against a real IdP on a loopback port:
active, inactive, expired and unreachable answers, the verdict cache and its hit rate, client
authentication, claim rules, and nothing secret in the logs."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.auth import AuthService
from proxy.config import from_dict
from proxy.errors import ConfigError, Forbidden, ServiceUnavailable, Unauthorized
from proxy.telemetry.metrics import Metrics
from tests.support.idp import ThreadedIdp

from .conftest import MakeService
from .support import bearer_headers, make_settings, mint_pyjwt, public_jwk, route, rsa_key

SECRET_ENV = "AUTHPROXY_TEST_INTROSPECTION_SECRET"
OPAQUE = "op_" + "t" * 40  # not a JWT: no dots
R = route(["jwt"])


@pytest.fixture
def idp(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadedIdp]:
    server = ThreadedIdp([public_jwk(rsa_key(), "k1")]).start()
    monkeypatch.setenv(SECRET_ENV, server.client_secret)
    yield server
    server.stop()


def introspecting(idp: ThreadedIdp, **over: Any) -> dict[str, Any]:
    base = {
        "name": "corp",
        "issuer": idp.base,  # no key source: discovery finds the JWKS
        "audiences": ["api"],
        "algorithms": ["RS256"],
        "introspection_url": idp.base + "/introspect",
        "introspection_client_id": idp.client_id,
        "introspection_secret_env": SECRET_ENV,
        "claim_headers": {"X-User-Email": "email"},
    }
    return {**base, **over}


def active(idp: ThreadedIdp, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    answer = {
        "active": True,
        "sub": "hana",
        "scope": "models:read models:write",
        "client_id": "webapp",
        "iss": idp.base,
        "exp": now + 300,
        "email": "hana@example.com",
    }
    return {k: v for k, v in {**answer, **over}.items() if v is not None}


async def started(
    make_service: MakeService, idp: ThreadedIdp, metrics: Metrics | None = None, **over: Any
) -> AuthService:
    return await make_service(make_settings([introspecting(idp, **over)]), metrics=metrics)


async def auth(svc: AuthService, tok: str, r: Any = R) -> Any:
    return await svc.authenticate(r, svc.extract(bearer_headers(tok), b"", websocket=False))


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {"provider": "corp", **labels}) or 0.0


async def test_an_active_token_becomes_an_identity_with_the_jwt_headers(
    make_service: MakeService, idp: ThreadedIdp
) -> None:
    idp.tokens[OPAQUE] = active(idp)
    svc = await started(make_service, idp)
    identity = await auth(svc, OPAQUE)
    assert identity.method == "introspection"
    assert identity.subject == "hana" and identity.issuer == idp.base
    assert identity.scopes == {"models:read", "models:write"}
    assert identity.claim_headers == (("X-User-Email", "hana@example.com"),)
    assert identity.valid_until == idp.tokens[OPAQUE]["exp"] + 30
    assert idp.bad_client_auth == 0  # HTTP Basic with the configured client
    assert idp.last_form == {"token": [OPAQUE], "token_type_hint": ["access_token"]}


async def test_an_answer_without_exp_vouches_for_introspection_cache_s_not_for_ever(
    make_service: MakeService, idp: ThreadedIdp
) -> None:
    """Without `exp` a session or stream opened with the token still ends (and a new request asks
    again): after introspection_cache_s. The provider's required_claims hold here too."""
    idp.tokens[OPAQUE] = active(idp, exp=None, jti="op-7")
    svc = await started(make_service, idp, introspection_cache_s=20)
    identity = await auth(svc, OPAQUE)
    assert identity.expires_at is not None
    assert 19 <= identity.expires_at - time.time() <= 20
    assert identity.token_id == "op-7"  # what `authproxy revoke --jti` names
    idp.tokens[OPAQUE + "x"] = active(idp)  # no tenant claim
    strict = await started(make_service, idp, required_claims=["tenant"])
    with pytest.raises(Unauthorized) as refused:
        await auth(strict, OPAQUE + "x")
    assert refused.value.details["reason"] == "missing_claim"
    idp.tokens[OPAQUE + "y"] = {**active(idp), "tenant": None}  # present but null: as for a JWT
    with pytest.raises(Unauthorized) as null:
        await auth(strict, OPAQUE + "y")
    assert null.value.details["reason"] == "missing_claim"


async def test_a_client_credentials_token_without_sub_is_named_by_its_client_id(
    make_service: MakeService, idp: ThreadedIdp
) -> None:
    idp.tokens[OPAQUE] = active(idp, sub=None, client_id="batch-job")
    svc = await started(make_service, idp)
    assert (await auth(svc, OPAQUE)).subject == "batch-job"


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({"active": False}, "inactive_token"),
        ({"exp": int(time.time()) - 3600}, "token_expired"),
        ({"iss": "https://other.example"}, "wrong_issuer"),
        ({"aud": ["someone-else"]}, "wrong_audience"),
        ({"sub": None, "client_id": None}, "missing_sub"),
    ],
)
async def test_inactive_expired_or_foreign_tokens_are_401(
    make_service: MakeService, idp: ThreadedIdp, answer: dict[str, Any], reason: str
) -> None:
    idp.tokens[OPAQUE] = {"active": False} if answer == {"active": False} else active(idp, **answer)
    svc = await started(make_service, idp)
    with pytest.raises(Unauthorized) as info:
        await auth(svc, OPAQUE)
    assert info.value.details["reason"] == reason
    assert info.value.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')


async def test_an_unknown_token_is_inactive_and_401(
    make_service: MakeService, idp: ThreadedIdp
) -> None:
    svc = await started(make_service, idp)
    with pytest.raises(Unauthorized) as info:
        await auth(svc, "never-issued-token")
    assert info.value.details["reason"] == "inactive_token"


async def test_an_endpoint_that_is_down_is_503_never_401(
    make_service: MakeService, idp: ThreadedIdp
) -> None:
    idp.tokens[OPAQUE] = active(idp)
    idp.introspection_down = True
    metrics = Metrics()
    svc = await started(make_service, idp, metrics)
    with pytest.raises(ServiceUnavailable) as info:
        await auth(svc, OPAQUE)
    assert info.value.status == 503
    assert info.value.details == {"reason": "introspection_unavailable", "provider": "corp"}
    assert sample(metrics, "authproxy_introspections_total", result="error") == 1
    # Not cached: once the endpoint is back, the same token is accepted.
    idp.introspection_down = False
    assert (await auth(svc, OPAQUE)).subject == "hana"


async def test_an_unreachable_endpoint_is_503(make_service: MakeService, idp: ThreadedIdp) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens once closed
    svc = await started(
        make_service, idp, introspection_url=f"http://127.0.0.1:{closed}/introspect"
    )
    with pytest.raises(ServiceUnavailable) as info:
        await auth(svc, OPAQUE)
    assert info.value.details["reason"] == "introspection_unavailable"


async def test_refused_client_credentials_are_503_and_the_log_says_which_keys(
    make_service: MakeService,
    idp: ThreadedIdp,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(SECRET_ENV, "the-wrong-secret")
    idp.tokens[OPAQUE] = active(idp)
    svc = await started(make_service, idp)
    with caplog.at_level(logging.INFO), pytest.raises(ServiceUnavailable):
        await auth(svc, OPAQUE)
    assert idp.bad_client_auth == 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "HTTP 401 (check introspection_client_id/_secret_env)" in text
    assert OPAQUE not in text and "the-wrong-secret" not in text


async def test_the_cache_answers_repeats_and_concurrent_requests_share_one_call(
    make_service: MakeService, idp: ThreadedIdp
) -> None:
    idp.tokens[OPAQUE] = active(idp)
    metrics = Metrics()
    svc = await started(make_service, idp, metrics)
    results = await asyncio.gather(*(auth(svc, OPAQUE) for _ in range(10)))
    assert {r.subject for r in results} == {"hana"}
    assert idp.introspections == 1
    for _ in range(90):
        await auth(svc, OPAQUE)
    assert idp.introspections == 1
    hits = sample(metrics, "authproxy_introspection_cache_total", result="hit")
    misses = sample(metrics, "authproxy_introspection_cache_total", result="miss")
    assert hits + misses == 100
    assert hits / (hits + misses) >= 0.9  # the ten concurrent first lookups all missed
    assert sample(metrics, "authproxy_introspections_total", result="active") == 1


async def test_a_cached_verdict_lasts_at_most_introspection_cache_s(
    make_service: MakeService, idp: ThreadedIdp
) -> None:
    idp.tokens[OPAQUE] = active(idp)
    svc = await started(make_service, idp, introspection_cache_s=0.3)
    await auth(svc, OPAQUE)
    idp.tokens[OPAQUE] = {"active": False}  # revoked at the IdP
    await auth(svc, OPAQUE)  # still cached
    await asyncio.sleep(0.4)
    with pytest.raises(Unauthorized):
        await auth(svc, OPAQUE)
    assert idp.introspections == 2


async def test_a_cached_verdict_ends_at_the_tokens_exp(
    make_service: MakeService, idp: ThreadedIdp
) -> None:
    idp.tokens[OPAQUE] = active(idp, exp=time.time() + 0.5)
    svc = await started(make_service, idp, leeway_s=0)
    await auth(svc, OPAQUE)
    await asyncio.sleep(0.6)
    with pytest.raises(Unauthorized) as info:
        await auth(svc, OPAQUE)
    assert info.value.details["reason"] == "token_expired"
    assert idp.introspections == 2


async def test_refusals_are_cached_too(make_service: MakeService, idp: ThreadedIdp) -> None:
    svc = await started(make_service, idp)
    for _ in range(5):
        with pytest.raises(Unauthorized):
            await auth(svc, "dead-token")
    assert idp.introspections == 1


async def test_jwts_are_still_verified_locally(make_service: MakeService, idp: ThreadedIdp) -> None:
    svc = await started(make_service, idp)
    now = int(time.time())
    claims = {"iss": idp.base, "aud": "api", "sub": "ivan", "iat": now, "exp": now + 60}
    jwt = mint_pyjwt(rsa_key(), "RS256", claims, {"kid": "k1"})
    identity = await auth(svc, jwt)
    assert identity.method == "jwt" and identity.subject == "ivan"
    assert idp.introspections == 0


async def test_claim_rules_judge_the_introspection_answer(
    make_service: MakeService, idp: ThreadedIdp
) -> None:
    idp.tokens[OPAQUE] = active(idp, groups=["ml-admins"])
    idp.tokens["op_other"] = active(idp, groups=["users"])
    svc = await started(make_service, idp)
    r = route(["jwt"], require_claims={"groups": ["ml-admins"]})
    assert (await auth(svc, OPAQUE, r)).subject == "hana"
    with pytest.raises(Forbidden) as info:
        await auth(svc, "op_other", r)
    assert info.value.details["reason"] == "claim_mismatch"


async def test_a_missing_secret_is_a_config_error_naming_the_key(
    make_service: MakeService, idp: ThreadedIdp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_ENV)
    with pytest.raises(ConfigError) as info:
        await make_service(make_settings([introspecting(idp)]), start=False)
    assert str(info.value).startswith("auth.jwt.providers[0].introspection_secret_env:")


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"introspection_client_id": None}, "introspection_url needs introspection_client_id"),
        (
            {"introspection_url": "http://idp.example.com/introspect"},
            "introspection_url: must be https",
        ),
    ],
)
def test_bad_introspection_settings_are_one_line_errors(
    idp: ThreadedIdp, over: dict[str, Any], message: str
) -> None:
    provider = {k: v for k, v in {**introspecting(idp), **over}.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        from_dict({"auth": {"jwt": {"providers": [provider]}}})


async def test_explain_says_an_opaque_token_was_introspected(idp: ThreadedIdp) -> None:
    from proxy.explain import explain

    idp.tokens[OPAQUE] = active(idp)
    settings = make_settings([introspecting(idp)])
    ok, text = await explain(settings, "GET", "/x", [("Authorization", f"Bearer {OPAQUE}")])
    assert ok, text
    assert "opaque token: introspected by 'corp'" in text
    assert "ACCEPTED as introspection 'hana'" in text and "X-Auth-Method: introspection" in text
    assert OPAQUE not in text


def test_what_counts_as_opaque() -> None:
    from proxy.auth.jwt import opaque

    assert opaque(b"op_abcdef")
    assert opaque(b"a.b")
    assert opaque(b"a.b.c.d.e")  # a JWE: only its issuer can read it
    assert opaque(b"abc.def.ghi")  # three segments, but no JSON header
    assert not opaque(b"eyJhbGciOiJSUzI1NiJ9.e30.c2ln")
    assert not opaque(b"e30.e30.c2ln")  # '{}' without the usual prefix: decoded to be sure
