"""The JWT check an nginx user would write for `auth_request`: a tiny ASGI app with PyJWT.

nginx sends it the client's request headers (no body) for every request; it answers 204 with
`X-Auth-Subject` when the bearer token verifies (RS256, issuer, audience, `exp`), else 401. The key
is loaded once at start; every token's signature is checked, with no cache, because that is what
the usual recipe does. Configured through the environment: BENCH_JWT_PUBLIC_KEY (a PEM file),
BENCH_JWT_ISSUER, BENCH_JWT_AUDIENCE.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

UNAUTHORIZED = [(b"www-authenticate", b'Bearer error="invalid_token"'), (b"content-length", b"0")]


class JwtCheck:
    """Answers nginx's auth subrequests."""

    def __init__(self, public_pem: Path, issuer: str, audience: str) -> None:
        self.key = load_pem_public_key(public_pem.read_bytes())
        self.issuer = issuer
        self.audience = audience

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        status, headers = 401, UNAUTHORIZED
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                try:
                    claims = jwt.decode(
                        value[7:].decode("ascii"),
                        self.key,  # type: ignore[arg-type]
                        algorithms=["RS256"],
                        audience=self.audience,
                        issuer=self.issuer,
                        options={"require": ["exp", "iss", "aud", "sub"]},
                    )
                except (jwt.InvalidTokenError, UnicodeDecodeError):
                    break
                status = 204
                headers = [(b"x-auth-subject", str(claims["sub"]).encode())]
                break
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


def create() -> JwtCheck:
    return JwtCheck(
        Path(os.environ["BENCH_JWT_PUBLIC_KEY"]),
        os.environ["BENCH_JWT_ISSUER"],
        os.environ["BENCH_JWT_AUDIENCE"],
    )
