"""The demo identity provider: login, refresh-token rotation, the JWKS and key rotation."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest

from upstream_demo.app import create_app
from upstream_demo.idp import KeyRing

ISSUER = "http://issuer.test"
TTL = 300
ROTATION = 3600.0
GRACE = 600.0
ADMIN = {"username": "admin@example.com", "password": "admin"}
VIEWER = {"username": "viewer@example.com", "password": "viewer"}


class FakeClock:
    """A clock tests move by hand; starts at the real time so PyJWT's own checks pass too."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def idp(clock: FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        simulate=False,
        issuer=ISSUER,
        token_ttl=TTL,
        refresh_ttl=3600,
        key_rotation_s=ROTATION,
        key_grace_s=GRACE,
        clock=clock,
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://demo"
    ) as http:
        yield http


async def login(idp: httpx.AsyncClient, user: dict[str, str]) -> dict[str, Any]:
    response = await idp.post("/auth/login", json=user)
    assert response.status_code == 200, response.text
    grant: dict[str, Any] = response.json()
    return grant


async def jwks(idp: httpx.AsyncClient) -> jwt.PyJWKSet:
    response = await idp.get("/.well-known/jwks.json")
    assert response.status_code == 200
    return jwt.PyJWKSet.from_dict(response.json())


def verify(token: str, keys: jwt.PyJWKSet, *, check_time: bool = True) -> dict[str, Any]:
    """Verify like a relying party: pick the key by `kid`, pin the algorithm to the key's.

    `check_time=False` skips exp/nbf/iat, which PyJWT checks against the real clock; tests that
    moved the fake clock check those claims themselves.
    """
    kid = jwt.get_unverified_header(token)["kid"]
    key = keys[kid]
    claims: dict[str, Any] = jwt.decode(
        token,
        key.key,
        algorithms=[key.algorithm_name],
        audience="webplus",
        issuer=ISSUER,
        options={
            "require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"],
            "verify_exp": check_time,
            "verify_nbf": check_time,
            "verify_iat": check_time,
        },
    )
    return claims


@pytest.mark.parametrize(
    ("user", "alg", "scope"),
    [(ADMIN, "RS256", "models:read models:write"), (VIEWER, "ES256", "models:read")],
)
async def test_login_issues_an_access_token_that_verifies_against_the_published_jwks(
    idp: httpx.AsyncClient, clock: FakeClock, user: dict[str, str], alg: str, scope: str
) -> None:
    grant = await login(idp, user)
    assert grant["token_type"] == "Bearer"
    assert grant["expires_in"] == TTL
    assert grant["refresh_token"]
    assert grant["user"]["sub"] == user["username"]
    assert grant["user"]["scopes"] == scope.split()

    header = jwt.get_unverified_header(grant["access_token"])
    assert header["alg"] == alg
    assert header["typ"] == "at+jwt"
    claims = verify(grant["access_token"], await jwks(idp))
    assert claims["sub"] == user["username"]
    assert claims["scope"] == scope
    assert claims["aud"] == "webplus"
    assert claims["iat"] == claims["nbf"] == int(clock())
    assert claims["exp"] == claims["iat"] + TTL


async def test_each_access_token_has_its_own_jti(idp: httpx.AsyncClient) -> None:
    tokens = [(await login(idp, ADMIN))["access_token"] for _ in range(3)]
    jtis = {jwt.decode(t, options={"verify_signature": False})["jti"] for t in tokens}
    assert len(jtis) == 3


async def test_a_token_does_not_verify_with_the_other_algorithms_key(
    idp: httpx.AsyncClient,
) -> None:
    token = (await login(idp, ADMIN))["access_token"]
    keys = await jwks(idp)
    ec_key = next(k for k in keys.keys if k.algorithm_name == "ES256")
    with pytest.raises(jwt.InvalidTokenError):
        jwt.decode(token, ec_key.key, algorithms=["ES256"], audience="webplus")


@pytest.mark.parametrize(
    "credentials",
    [
        {"username": "admin@example.com", "password": "wrong"},
        {"username": "nobody@example.com", "password": "admin"},
        {"username": "viewer@example.com", "password": "admin"},
    ],
)
async def test_login_with_bad_credentials_is_401_json(
    idp: httpx.AsyncClient, credentials: dict[str, str]
) -> None:
    response = await idp.post("/auth/login", json=credentials)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    assert "access_token" not in response.text


async def test_login_with_a_malformed_body_is_refused(idp: httpx.AsyncClient) -> None:
    assert (await idp.post("/auth/login", json={"username": "x"})).status_code == 422
    assert (await idp.post("/auth/login", content=b"user=x")).status_code == 400


async def test_refresh_returns_new_tokens_and_the_used_refresh_token_stops_working(
    idp: httpx.AsyncClient, clock: FakeClock
) -> None:
    first = await login(idp, VIEWER)
    clock.advance(10)
    response = await idp.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert response.status_code == 200
    second = response.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert second["token_type"] == "Bearer"
    assert second["user"]["sub"] == "viewer@example.com"
    claims = verify(second["access_token"], await jwks(idp), check_time=False)
    assert claims["iat"] == int(clock())

    replay = await idp.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert replay.status_code == 401
    assert replay.json()["error"] == "unauthorized"
    third = await idp.post("/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert third.status_code == 200


async def test_refresh_with_an_unknown_or_expired_token_is_401(
    idp: httpx.AsyncClient, clock: FakeClock
) -> None:
    unknown = await idp.post("/auth/refresh", json={"refresh_token": "made-up"})
    assert unknown.status_code == 401
    grant = await login(idp, ADMIN)
    clock.advance(3601)
    expired = await idp.post("/auth/refresh", json={"refresh_token": grant["refresh_token"]})
    assert expired.status_code == 401
    assert (await idp.post("/auth/refresh", json={})).status_code == 422


async def test_jwks_publishes_one_rsa_and_one_ec_key_with_kid_use_alg_and_cache_control(
    idp: httpx.AsyncClient,
) -> None:
    response = await idp.get("/.well-known/jwks.json")
    assert response.headers["cache-control"].startswith("public, max-age=")
    assert int(response.headers["cache-control"].rsplit("=", 1)[1]) > 0
    keys = response.json()["keys"]
    assert sorted((k["kty"], k["alg"]) for k in keys) == [("EC", "ES256"), ("RSA", "RS256")]
    for key in keys:
        assert key["use"] == "sig"
        assert key["kid"]
        assert "d" not in key  # public halves only
        assert not {"p", "q", "dp", "dq", "qi"} & set(key)


async def test_rotation_signs_with_a_new_key_and_keeps_the_old_one_for_the_grace_period(
    idp: httpx.AsyncClient, clock: FakeClock
) -> None:
    old = (await login(idp, ADMIN))["access_token"]
    old_kid = jwt.get_unverified_header(old)["kid"]

    clock.advance(ROTATION)
    new = (await login(idp, ADMIN))["access_token"]
    new_kid = jwt.get_unverified_header(new)["kid"]
    assert new_kid != old_kid

    during_grace = await jwks(idp)
    assert {k.key_id for k in during_grace.keys} >= {old_kid, new_kid}
    assert len(during_grace.keys) == 4  # new and old, for both algorithms
    verify(old, during_grace, check_time=False)
    verify(new, during_grace, check_time=False)

    clock.advance(GRACE - 1)
    assert old_kid in {k.key_id for k in (await jwks(idp)).keys}

    clock.advance(1)
    after_grace = await jwks(idp)
    assert {k.key_id for k in after_grace.keys} == {
        jwt.get_unverified_header(new)["kid"],
        jwt.get_unverified_header((await login(idp, VIEWER))["access_token"])["kid"],
    }
    with pytest.raises(KeyError):
        verify(old, after_grace, check_time=False)
    verify(new, after_grace, check_time=False)


async def test_openid_configuration_names_the_issuer_and_jwks_uri(idp: httpx.AsyncClient) -> None:
    body = (await idp.get("/.well-known/openid-configuration")).json()
    assert body["issuer"] == ISSUER
    assert body["jwks_uri"] == f"{ISSUER}/.well-known/jwks.json"


def test_keyring_does_not_rotate_before_the_interval(clock: FakeClock) -> None:
    ring = KeyRing(rotation_s=100, grace_s=50, clock=clock)
    kid = ring.signing_key("RS256").kid
    clock.advance(99.5)
    assert ring.signing_key("RS256").kid == kid
    clock.advance(0.5)
    assert ring.signing_key("RS256").kid != kid


def test_keyring_rotate_now_retires_every_current_key(clock: FakeClock) -> None:
    ring = KeyRing(rotation_s=100, grace_s=50, clock=clock)
    before = {k["kid"] for k in ring.jwks()["keys"]}
    ring.rotate()
    after = {k["kid"] for k in ring.jwks()["keys"]}
    assert before < after and len(after) == 4
    clock.advance(50)
    assert {k["kid"] for k in ring.jwks()["keys"]}.isdisjoint(before)
