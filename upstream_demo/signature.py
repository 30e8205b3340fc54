"""Checks the sidecar's `X-Auth-Signature`, as an upstream behind authproxy should when
`[identity] sign = true`: only then may it trust the `X-Auth-*` headers.

Written from the README's "Signed identity" section alone (it imports nothing of the sidecar), so
it also shows that the documented form is enough to verify in another codebase.

`v2=` (the default): hex HMAC-SHA256(secret, canonical), where canonical is the netstrings
(`<decimal length>:<bytes>,`) of `authproxy-identity-v2`, `X-Auth-Timestamp`, the method, the raw
path, the raw query, `X-Request-ID`, then name and value of each header `X-Auth-Signed-Headers`
lists, in its order. The timestamp must be within `max_skew_s` of this clock, every `X-Auth-*`
header received must be signed, and none of them may come twice.

`v1=` (`--identity-signature v1`, the old scheme): hex HMAC-SHA256(secret, request_id \\n method
\\n subject \\n scopes \\n issuer), over the header values exactly as received (empty when absent).
It binds no path, method or time: a captured set replays anywhere, forever.

Only the configured scheme is accepted: accepting v1 beside v2 would let a captured v1 set
through the stricter check.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from typing import Literal
from urllib.parse import quote

from starlette.types import ASGIApp, Receive, Scope, Send

V1_SIGNED = (
    b"x-request-id",
    b"x-auth-method",
    b"x-auth-subject",
    b"x-auth-scopes",
    b"x-auth-issuer",
)
V2_TAG = b"authproxy-identity-v2"
SIGNATURE = b"x-auth-signature"
TIMESTAMP = b"x-auth-timestamp"
SIGNED_HEADERS = b"x-auth-signed-headers"
# The sidecar fetches the JWKS directly, not through itself: those requests carry no signature.
UNSIGNED_PREFIXES = ("/.well-known/", "/healthz")

_V2_VALUE = re.compile(rb"v2=[0-9a-f]{64}")
_TIMESTAMP = re.compile(rb"[0-9]{1,15}")
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")

Scheme = Literal["v1", "v2"]


class Refused(Exception):
    """The request's identity headers are not the sidecar's; the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def expected_signature(secret: bytes, headers: dict[bytes, bytes]) -> str:
    """The `v1=` signature of these headers."""
    message = b"\n".join(headers.get(name, b"") for name in V1_SIGNED)
    return "v1=" + hmac.new(secret, message, hashlib.sha256).hexdigest()


def canonical_v2(
    timestamp: bytes,
    method: bytes,
    path: bytes,
    query: bytes,
    request_id: bytes,
    headers: list[tuple[bytes, bytes]],
) -> bytes:
    """The bytes a `v2=` signature covers (see the module docstring)."""
    fields = [V2_TAG, timestamp, method, path, query, request_id]
    for name, value in headers:
        fields += (name, value)
    return b"".join(b"%d:%s," % (len(field), field) for field in fields)


def _one(grouped: dict[bytes, list[bytes]], name: bytes) -> bytes | None:
    values = grouped.get(name)
    if values is None:
        return None
    if len(values) > 1:
        # Frameworks disagree on which of two copies they read: never guess.
        raise Refused("duplicate_header", f"{name.decode()} is sent more than once")
    return values[0]


def _target(scope: Scope) -> tuple[bytes, bytes, bytes]:
    """Method, path and query exactly as they arrived on the request line."""
    method = b"GET" if scope["type"] == "websocket" else scope["method"].encode("ascii")
    raw_path = scope.get("raw_path")
    if raw_path is None:
        raw_path = quote(scope["path"]).encode("ascii")
    # Some ASGI servers and test transports leave the query on raw_path; a path has no `?`.
    return method, raw_path.partition(b"?")[0], scope.get("query_string", b"")


def check_v2(
    secret: bytes, scope: Scope, now: float, max_skew_s: float
) -> list[tuple[bytes, bytes]]:
    """The signed identity headers of this request, or `Refused`."""
    grouped: dict[bytes, list[bytes]] = {}
    for name, value in scope["headers"]:
        grouped.setdefault(name.lower(), []).append(value)
    signature = _one(grouped, SIGNATURE)
    timestamp = _one(grouped, TIMESTAMP)
    if signature is None or timestamp is None:
        raise Refused("unsigned", "the identity headers are not signed by the sidecar")
    if not _V2_VALUE.fullmatch(signature):
        raise Refused("bad_signature", "X-Auth-Signature is not a v2 signature")
    if not _TIMESTAMP.fullmatch(timestamp) or abs(now - int(timestamp)) > max_skew_s:
        raise Refused("stale", "X-Auth-Timestamp is outside the accepted window")
    listed = _one(grouped, SIGNED_HEADERS)
    names = listed.split(b",") if listed else []
    if len(set(names)) != len(names) or not all(_NAME.fullmatch(n) for n in names):
        raise Refused("bad_signature", "X-Auth-Signed-Headers is malformed")
    if {SIGNATURE, TIMESTAMP, SIGNED_HEADERS} & set(names):
        raise Refused("bad_signature", "X-Auth-Signed-Headers lists a signature header")
    # An identity header the signature does not cover was not set by the sidecar.
    for name in grouped:
        # `X_Auth_Foo` is `X-Auth-Foo` to a CGI/WSGI framework: judged as dashes.
        if name.replace(b"_", b"-").startswith(b"x-auth-") and name not in names:
            if name not in (SIGNATURE, TIMESTAMP, SIGNED_HEADERS):
                raise Refused("unsigned_header", f"{name.decode()} is not signed")
    signed = []
    for name in names:
        value = _one(grouped, name)
        if value is None:
            raise Refused("bad_signature", f"signed header {name.decode()} is missing")
        signed.append((name, value))
    method, path, query = _target(scope)
    request_id = _one(grouped, b"x-request-id") or b""
    message = canonical_v2(timestamp, method, path, query, request_id, signed)
    expected = b"v2=" + hmac.new(secret, message, hashlib.sha256).hexdigest().encode()
    if not hmac.compare_digest(signature, expected):
        raise Refused("bad_signature", "the identity headers are not signed by the sidecar")
    return signed


def check_v1(secret: bytes, scope: Scope) -> None:
    headers = dict(scope["headers"])
    presented = headers.get(SIGNATURE, b"").decode("latin-1")
    if not hmac.compare_digest(presented, expected_signature(secret, headers)):
        raise Refused("bad_signature", "the identity headers are not signed by the sidecar")


class IdentitySignatureCheck:
    """Refuses (401; 1008 on a WebSocket) any request whose identity headers the sidecar did not
    sign for this method, path and query, or signed longer than `max_skew_s` ago."""

    def __init__(
        self,
        app: ASGIApp,
        secret: bytes,
        scheme: Scheme = "v2",
        max_skew_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.secret = secret
        self.scheme = scheme
        self.max_skew_s = max_skew_s
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"].startswith(
            UNSIGNED_PREFIXES
        ):
            await self.app(scope, receive, send)
            return
        try:
            if self.scheme == "v2":
                check_v2(self.secret, scope, self.clock(), self.max_skew_s)
            else:
                check_v1(self.secret, scope)
        except Refused as exc:
            await self._refuse(scope, send, exc)
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, exc: Refused) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps(
            {"error": "unauthorized", "message": str(exc), "details": {"reason": exc.reason}}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
