"""Checks the sidecar's `X-Auth-Signature`, as an upstream behind authproxy should when
`[identity] sign = true`: only then may it trust the `X-Auth-*` headers.

The signature is `v1=` + hex HMAC-SHA256(secret, request_id \\n method \\n subject \\n scopes \\n
issuer), over the header values exactly as received (empty strings when absent).
"""

from __future__ import annotations

import hashlib
import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

SIGNED = (b"x-request-id", b"x-auth-method", b"x-auth-subject", b"x-auth-scopes", b"x-auth-issuer")
# The sidecar fetches the JWKS directly, not through itself: those requests carry no signature.
UNSIGNED_PREFIXES = ("/.well-known/", "/healthz")


def expected_signature(secret: bytes, headers: dict[bytes, bytes]) -> str:
    message = b"\n".join(headers.get(name, b"") for name in SIGNED)
    return "v1=" + hmac.new(secret, message, hashlib.sha256).hexdigest()


class IdentitySignatureCheck:
    """Refuses (401) any request whose identity headers the sidecar did not sign."""

    def __init__(self, app: ASGIApp, secret: bytes) -> None:
        self.app = app
        self.secret = secret

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"].startswith(
            UNSIGNED_PREFIXES
        ):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        presented = headers.get(b"x-auth-signature", b"").decode("latin-1")
        if hmac.compare_digest(presented, expected_signature(self.secret, headers)):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {"error": "unauthorized", "message": "identity headers are not signed by the sidecar"}
        ).encode()
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
