"""Property-based: random and mutated tokens and headers always end in a clean 401 (or, for the
untouched token, its identity) — never another exception, never a 500."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.auth import AuthService
from proxy.auth.apikeys import hash_key
from proxy.errors import Unauthorized
from proxy.identity import Identity
from proxy.telemetry.metrics import Metrics

from .support import (
    claims,
    make_settings,
    mint_pyjwt,
    provider,
    public_jwk,
    route,
    rsa_key,
    sign_raw,
)

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUTES = [
    route(["jwt", "api_key"]),
    route(["api_key", "jwt"]),
    route(["jwt"]),
    route(["jwt", "api_key"], auth_optional=True),
]
KEY = "ak_" + "p" * 40

json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        path = tmp / "jwks.json"
        path.write_text(json.dumps({"keys": [public_jwk(rsa_key(), "k1")]}))
        self.settings = make_settings(
            [
                provider(
                    jwks_file=str(path),
                    algorithms=["RS256", "PS256"],
                    claim_headers={"X-User-Email": "email"},
                )
            ],
            api_keys={"keys": [{"id": "bot", "sha256": hash_key(KEY)}]},
            token_cookie="at",
        )
        self.svc: AuthService = self.loop.run_until_complete(self._build())

    async def _build(self) -> AuthService:
        self.session = aiohttp.ClientSession()
        svc = AuthService(self.settings, Metrics(), self.session)
        await svc.start()
        return svc

    def judge(
        self, headers: list[tuple[bytes, bytes]], query: bytes, websocket: bool, r: Any
    ) -> Identity | None:
        async def go() -> Identity | None:
            creds = self.svc.extract(headers, query, websocket=websocket)
            try:
                return await self.svc.authenticate(r, creds)
            except Unauthorized as exc:
                # a clean, renderable 401
                assert exc.status == 401 and exc.message and "reason" in exc.details
                exc.headers.get("WWW-Authenticate", "").encode("latin-1")
                return None

        return self.loop.run_until_complete(go())

    def close(self) -> None:
        self.loop.run_until_complete(self.svc.stop())
        self.loop.run_until_complete(self.session.close())
        self.loop.close()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("props"))
    yield h
    h.close()


GOOD = mint_pyjwt(rsa_key(), "RS256", claims(exp=4102444800), {"kid": "k1"})


def test_random_authorization_and_api_key_values(harness: Harness) -> None:
    @SETTINGS
    @given(st.binary(max_size=300), st.binary(max_size=60), st.sampled_from(ROUTES), st.booleans())
    def check(auth: bytes, key: bytes, r: Any, ws: bool) -> None:
        headers = [(b"authorization", auth), (b"x-api-key", key)]
        assert harness.judge(headers, b"", ws, r) is None

    check()


def test_random_websocket_sources(harness: Harness) -> None:
    @SETTINGS
    @given(
        st.binary(max_size=200),
        st.binary(max_size=200),
        st.binary(max_size=200),
        st.sampled_from(ROUTES),
    )
    def check(query: bytes, protocols: bytes, cookie: bytes, r: Any) -> None:
        headers = [(b"sec-websocket-protocol", protocols), (b"cookie", b"at=" + cookie)]
        harness.judge(headers, b"token=" + query + b"&api_key=" + query, True, r)

    check()


@st.composite
def mutated(draw: st.DrawFn) -> str:
    token = GOOD
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "swap", "dup"]))
        i = draw(st.integers(0, max(len(token) - 1, 0)))
        if kind == "flip":
            c = draw(st.sampled_from("AZaz09-_.=+/~"))
            token = token[:i] + c + token[i + 1 :]
        elif kind == "delete":
            token = token[:i] + token[i + 1 :]
        elif kind == "insert":
            token = token[:i] + draw(st.text(min_size=1, max_size=3)) + token[i:]
        elif kind == "truncate":
            token = token[:i]
        elif kind == "swap":
            parts = token.split(".")
            draw(st.randoms()).shuffle(parts)
            token = ".".join(parts)
        else:
            parts = token.split(".")
            token = token + "." + parts[draw(st.integers(0, len(parts) - 1))]
    return token


def test_mutated_tokens_are_refused_and_the_original_is_accepted(harness: Harness) -> None:
    ident = harness.judge([(b"authorization", b"Bearer " + GOOD.encode())], b"", False, ROUTES[0])
    assert ident is not None and ident.subject == "alice"

    @SETTINGS
    @given(mutated(), st.sampled_from(ROUTES), st.booleans())
    def check(token: str, r: Any, ws: bool) -> None:
        raw = token.encode("utf-8", "surrogatepass")
        result = harness.judge([(b"authorization", b"Bearer " + raw)], b"", ws, r)
        if token == GOOD:
            assert result is not None and result.subject == "alice"
        else:
            assert result is None

    check()


def test_correctly_signed_tokens_with_random_headers_and_claims(harness: Harness) -> None:
    header_keys = st.sampled_from(
        ["alg", "kid", "typ", "cty", "crit", "jku", "jwk", "x5c", "b64", "zip", "x"]
    )
    claim_keys = st.sampled_from(
        ["iss", "aud", "sub", "exp", "nbf", "iat", "scope", "scp", "scopes", "email", "x"]
    )

    @SETTINGS
    @given(
        st.dictionaries(header_keys, json_value, max_size=4),
        st.dictionaries(claim_keys, json_value, max_size=4),
        st.sampled_from(ROUTES),
    )
    def check(extra_header: dict[str, Any], extra_claims: dict[str, Any], r: Any) -> None:
        header = {"alg": "RS256", "kid": "k1", **extra_header}
        payload = {**claims(exp=4102444800), **extra_claims}
        token = sign_raw(rsa_key(), header, payload)
        result = harness.judge([(b"authorization", b"Bearer " + token.encode())], b"", False, r)
        if result is not None:
            assert result.subject == payload["sub"]
            for _name, value in result.claim_headers:
                assert "\r" not in value and "\n" not in value and "\x00" not in value

    check()
