"""OpenID Connect discovery against a real IdP on a loopback port: a provider configured with
its issuer alone finds its keys; a document naming another issuer, or a plain-http jwks_uri
elsewhere, is refused; a moved jwks_uri is followed on refresh."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from proxy.auth import AuthService
from proxy.errors import ServiceUnavailable

from .conftest import MakeService
from .support import bearer_headers, make_settings, mint_pyjwt, public_jwk, route, rsa_key

R = route(["jwt"])


class Idp:
    """An issuer serving its discovery document and two JWKS paths (old and new)."""

    def __init__(self) -> None:
        self.base = ""
        self.doc_issuer: str | None = None  # None: its own base URL
        self.jwks_path = "/keys"
        self.jwks_uri: str | None = None  # overrides the advertised jwks_uri
        self.discoveries = 0
        self.keys: dict[str, list[dict[str, Any]]] = {
            "/keys": [public_jwk(rsa_key(), "k1")],
            "/keys-v2": [public_jwk(rsa_key("next"), "k2")],
        }
        self._runner: web.AppRunner | None = None

    async def _discovery(self, _: web.Request) -> web.Response:
        self.discoveries += 1
        return web.json_response(
            {
                "issuer": self.doc_issuer if self.doc_issuer is not None else self.base,
                "jwks_uri": self.jwks_uri or self.base + self.jwks_path,
                "authorization_endpoint": self.base + "/authorize",
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": self.keys[request.path]})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/keys", self._jwks)
        app.router.add_get("/keys-v2", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.base = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def idp() -> AsyncIterator[Idp]:
    server = Idp()
    await server.start()
    yield server
    await server.stop()


def discovering(idp: Idp) -> dict[str, Any]:
    # No jwks_url, jwks_file, public_key_file or secret_env: discovery.
    return {
        "name": "oidc",
        "issuer": idp.base,
        "audiences": ["webplus"],
        "algorithms": ["RS256"],
        "jwks_min_refresh_s": 0,
        "jwks_timeout_s": 2,
    }


def token(idp: Idp, key: str = "main", kid: str = "k1", sub: str = "carol") -> str:
    now = int(time.time())
    payload = {"iss": idp.base, "aud": "webplus", "sub": sub, "iat": now, "exp": now + 300}
    return mint_pyjwt(rsa_key(key), "RS256", payload, {"kid": kid})


async def auth(svc: AuthService, tok: str) -> Any:
    return await svc.authenticate(R, svc.extract(bearer_headers(tok), b"", websocket=False))


async def test_an_issuer_alone_finds_its_keys_through_discovery(
    make_service: MakeService, idp: Idp
) -> None:
    svc = await make_service(make_settings([discovering(idp)]))
    assert svc.ready and idp.discoveries == 1
    assert svc.jwt.jwks[0].url == idp.base + "/keys"
    identity = await auth(svc, token(idp))
    assert identity.subject == "carol" and identity.issuer == idp.base


async def test_a_document_naming_another_issuer_is_refused(
    make_service: MakeService, idp: Idp
) -> None:
    idp.doc_issuer = "https://evil.example"
    svc = await make_service(make_settings([discovering(idp)]))
    cache = svc.jwt.jwks[0]
    assert not svc.ready and cache.current() is None
    assert cache.last_error is not None and "'https://evil.example'" in cache.last_error
    assert "not the configured issuer" in cache.last_error
    with pytest.raises(ServiceUnavailable) as info:
        await auth(svc, token(idp))
    assert info.value.details["reason"] == "keys_unavailable"


async def test_an_issuer_with_a_trailing_slash_must_match_exactly(
    make_service: MakeService, idp: Idp
) -> None:
    idp.doc_issuer = idp.base + "/"
    svc = await make_service(make_settings([discovering(idp)]))
    assert not svc.ready


async def test_a_plain_http_jwks_uri_off_loopback_is_refused(
    make_service: MakeService, idp: Idp
) -> None:
    idp.jwks_uri = "http://keys.example.com/jwks.json"
    svc = await make_service(make_settings([discovering(idp)]))
    cache = svc.jwt.jwks[0]
    assert cache.current() is None
    assert cache.last_error is not None and "must be https" in cache.last_error


async def test_a_moved_jwks_uri_is_followed_on_refresh(make_service: MakeService, idp: Idp) -> None:
    svc = await make_service(make_settings([discovering(idp)]))
    assert (await auth(svc, token(idp))).subject == "carol"
    idp.jwks_path = "/keys-v2"
    # A token signed by the new key names an unknown kid: the refetch rediscovers.
    identity = await auth(svc, token(idp, key="next", kid="k2"))
    assert identity.subject == "carol"
    assert svc.jwt.jwks[0].url == idp.base + "/keys-v2" and idp.discoveries == 2


async def test_a_failing_discovery_keeps_the_last_good_keys(
    make_service: MakeService, idp: Idp
) -> None:
    svc = await make_service(make_settings([discovering(idp)]))
    idp.doc_issuer = "https://evil.example"
    await svc.jwt.jwks[0].refresh()
    assert svc.jwt.jwks[0].stale
    # A token never seen before (no cached verdict): verified with the kept keys.
    assert (await auth(svc, token(idp, sub="dave"))).subject == "dave"
