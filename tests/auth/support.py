"""Keys, token minting (PyJWT and joserfc), settings builders and a real local JWKS server."""

from __future__ import annotations

import asyncio
import functools
import time
import warnings
from collections.abc import Callable
from typing import Any

import jwt as pyjwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc import jwt as jose_jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from proxy.config import RouteSettings, Settings, from_dict

ISS = "https://idp.example.test"
AUD = "webplus"
HS_SECRET = "s" * 64
HS_ENV = "AUTHPROXY_TEST_HS_SECRET"

PrivateKey = Any


def rsa_key(name: str = "main") -> rsa.RSAPrivateKey:
    return _rsa(name)


def ec_key(curve: str = "P-256", name: str = "main") -> ec.EllipticCurvePrivateKey:
    return _ec(curve, name)


def ed_key(name: str = "main") -> ed25519.Ed25519PrivateKey:
    return _ed(name)


@functools.cache
def _rsa(name: str) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def _ec(curve: str, name: str) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key({"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}[curve])


@functools.cache
def _ed(name: str) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def public_pem(private: PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_pem(private: PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_jwk(private: PrivateKey, kid: str | None = "k1", **extra: Any) -> dict[str, Any]:
    pub = private.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(pub, as_dict=True)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(pub, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(pub, as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(extra)
    return jwk


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "alice",
        "iat": now,
        "exp": now + 300,
        "scope": "models:read models:write",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def mint_pyjwt(
    private: PrivateKey | str | bytes,
    alg: str,
    payload: dict[str, Any],
    headers: dict[str, Any] | None = None,
) -> str:
    return pyjwt.encode(payload, private, algorithm=alg, headers=headers)


def mint_joserfc(
    private: PrivateKey | str | bytes,
    alg: str,
    payload: dict[str, Any],
    headers: dict[str, Any] | None = None,
) -> str:
    if isinstance(private, str | bytes):
        key: Any = OctKey.import_key(private if isinstance(private, bytes) else private.encode())
    elif isinstance(private, rsa.RSAPrivateKey):
        key = RSAKey.import_key(private_pem(private))
    elif isinstance(private, ec.EllipticCurvePrivateKey):
        key = ECKey.import_key(private_pem(private))
    else:
        key = OKPKey.import_key(private_pem(private))
    header = {"alg": alg, **(headers or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)  # joserfc calls "EdDSA" deprecated
        return jose_jwt.encode(header, payload, key, algorithms=[alg])


MINTERS: list[Callable[..., str]] = [mint_pyjwt, mint_joserfc]


def provider(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "demo",
        "issuer": ISS,
        "audiences": [AUD, "other"],
        "algorithms": ["RS256"],
        "leeway_s": 30,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def make_settings(
    providers: list[dict[str, Any]] | None = None,
    api_keys: dict[str, Any] | None = None,
    routes: list[dict[str, Any]] | None = None,
    **auth: Any,
) -> Settings:
    doc: dict[str, Any] = {
        "auth": {"jwt": {"providers": providers or []}, "api_keys": api_keys or {}, **auth},
        "routes": routes or [{"path": "/*", "auth": ["jwt", "api_key"]}],
    }
    if not providers:
        doc["routes"] = routes or [{"path": "/*", "auth": ["api_key"]}]
    return from_dict(doc)


def route(auth: Any = ("jwt", "api_key"), **over: Any) -> RouteSettings:
    return RouteSettings.model_validate(
        {"path": "/api/*", "auth": list(auth) if not isinstance(auth, str) else auth, **over}
    )


def bearer_headers(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + token.encode())]


class JwksServer:
    """A real HTTP JWKS endpoint on 127.0.0.1 whose keys rotate, go down or return garbage."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.mode = "ok"  # ok | down | garbage | empty | slow
        self.cache_control: str | None = None
        self.fetches = 0
        self.delay_s = 0.0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.mode == "down":
            return web.Response(status=503, text="maintenance")
        if self.mode == "garbage":
            return web.Response(status=200, text="<html>not json{", content_type="text/html")
        if self.mode == "empty":
            return web.json_response({"keys": []})
        headers = {"Cache-Control": self.cache_control} if self.cache_control else None
        return web.json_response({"keys": self.keys}, headers=headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def sign_raw(private: rsa.RSAPrivateKey, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """RS256-sign any header and payload, including what JOSE libraries refuse to produce."""
    import base64
    import json

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(sig)}"
