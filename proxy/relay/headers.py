"""What crosses the hop: request headers to the upstream, response headers to the client.

Removed both ways: hop-by-hop headers (RFC 9110 7.6.1) and every header the `Connection` header
names. Removed from requests: whatever a client could use to impersonate someone to the upstream
(`X-Auth-*`, the configured claim headers, forwarding headers from untrusted peers) and credentials
unless `auth.forward_credentials`. Then the sidecar adds its own.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable

from ..config import Settings
from ..errors import BadRequest, ConfigError
from ..identity import Identity
from ..types import Scope

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"http2-settings",
    }
)
_FORWARDING = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"forwarded",
        b"x-real-ip",
        b"x-client-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
    }
)
# Headers some frameworks use to route or dispatch by something other than the request line
# (Symfony/IIS X-Original-URL, method overrides): the upstream would run another path or method
# than the one the policy judged.
_REROUTING = frozenset(
    {
        b"x-original-url",
        b"x-rewrite-url",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-original-uri",
        b"x-original-method",
        b"x-forwarded-uri",
        b"x-forwarded-method",
        b"x-forwarded-prefix",
        b"x-script-name",
    }
)
# Identity headers other auth proxies set (oauth2-proxy, Apache, nginx auth_request): an upstream
# moved behind authproxy may still trust them, so a client must never be able to send them.
_FOREIGN_IDENTITY = frozenset(
    {
        b"remote-user",
        b"x-remote-user",
        b"x-forwarded-user",
        b"x-forwarded-email",
        b"x-forwarded-preferred-username",
        b"x-forwarded-groups",
        b"x-forwarded-access-token",
    }
)
# Handshake headers that belong to one WebSocket hop; the tunnel negotiates its own upstream.
WEBSOCKET_HANDSHAKE = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)
SIGNATURE_HEADER = "X-Auth-Signature"


def peer(scope: Scope) -> str | None:
    """The address of the TCP peer (the client, or the proxy in front of us)."""
    client = scope.get("client")
    return client[0] if client else None


def _latin1(value: bytes) -> str:
    return value.decode("latin-1")


def _utf8(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(
            "a request header is neither ASCII nor UTF-8", details={"reason": "header_encoding"}
        ) from None


def _wire(value: str) -> bytes:
    """A value the sidecar made, as header bytes: UTF-8, and never able to end the header line
    (identity values are checked where they are made; this is the last line of defence)."""
    data = value.encode("utf-8")
    if b"\r" in data or b"\n" in data or b"\0" in data:
        raise BadRequest(
            "an identity value cannot be sent as a header", details={"reason": "identity_value"}
        )
    return data


def connection_named(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names listed in any `Connection` header, lower-cased."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(
                t.strip().lower().replace(b"_", b"-") for t in value.split(b",") if t.strip()
            )
    return named


def without_cookie(header: bytes, name: bytes) -> bytes:
    """A `Cookie` header value without the cookie called `name`."""
    kept = [pair for pair in header.split(b";") if pair.strip().partition(b"=")[0].strip() != name]
    return b";".join(kept).strip()


def identity_signature(secret: bytes, request_id: str, identity: Identity | None) -> str:
    """HMAC-SHA256 over the identity headers and request id, hex; see README "Signed identity"."""
    if identity is None:
        fields = [request_id, "", "", "", ""]
    else:
        fields = [
            request_id,
            identity.method,
            identity.subject,
            " ".join(sorted(identity.scopes)),
            identity.issuer or "",
        ]
    message = "\n".join(fields).encode("utf-8")
    return "v1=" + hmac.new(secret, message, hashlib.sha256).hexdigest()


class HeaderPolicy:
    """The header rules, compiled once from the settings."""

    def __init__(self, settings: Settings) -> None:
        self._trusted = settings.server.trusted_networks()
        self._preserve_host = settings.server.preserve_host
        drop = set(HOP_BY_HOP) | _FORWARDING | _REROUTING | _FOREIGN_IDENTITY
        drop |= {b"host", b"x-request-id", b"expect"}
        if not settings.auth.forward_credentials:
            drop |= {b"authorization", settings.auth.api_keys.header.lower().encode()}
        for provider in settings.auth.jwt.providers:
            drop |= {h.lower().encode() for h in provider.claim_headers}
        self._drop = frozenset(drop)
        # The cookie a WebSocket handshake may carry its token in stays with the sidecar too.
        cookie = settings.auth.token_cookie
        self._token_cookie = (
            cookie.encode() if cookie and not settings.auth.forward_credentials else None
        )
        self._drop_ws = self._drop | WEBSOCKET_HANDSHAKE
        self._secret: bytes | None = None
        if settings.identity.sign:
            env = settings.identity.secret_env or ""
            secret = os.environ.get(env)
            if not secret:
                raise ConfigError("identity.secret_env", f"environment variable {env} is not set")
            self._secret = secret.encode()

    def trusted(self, peer: str | None) -> bool:
        if not self._trusted or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self._trusted)

    def upstream_request(
        self,
        headers: list[tuple[bytes, bytes]],
        *,
        peer: str | None,
        scheme: str,
        request_id: str,
        identity: Identity | None,
    ) -> list[tuple[bytes, bytes]]:
        """The headers sent upstream on the REST hop, as the bytes that go on the wire.

        Client bytes pass unchanged when they are UTF-8 (anything else is refused rather than
        guessed at); the sidecar's own values (identity) are UTF-8.
        """
        out = self._upstream(headers, self._drop, peer, scheme, request_id, identity)
        for _, value in out:
            if not value.isascii():
                _utf8(value)
        return out

    def upstream_handshake(
        self,
        headers: list[tuple[bytes, bytes]],
        *,
        peer: str | None,
        scheme: str,
        request_id: str,
        identity: Identity | None,
    ) -> list[tuple[str, str]]:
        """The headers of the upstream WebSocket handshake, as strings `websockets` encodes as
        latin-1 back to the same bytes (so identity values still reach the upstream as UTF-8)."""
        out = self._upstream(headers, self._drop_ws, peer, scheme, request_id, identity)
        return [(_latin1(name), _latin1(value)) for name, value in out]

    def _upstream(
        self,
        headers: list[tuple[bytes, bytes]],
        drop: frozenset[bytes],
        peer: str | None,
        scheme: str,
        request_id: str,
        identity: Identity | None,
    ) -> list[tuple[bytes, bytes]]:
        named = connection_named(headers)
        trusted = self.trusted(peer)
        out: list[tuple[bytes, bytes]] = []
        host = xff = xfp = xfh = None
        for name, value in headers:
            if name == b"host":
                host = value
            # CGI/WSGI upstreams read `X_Auth_Subject` as `X-Auth-Subject` (both become
            # HTTP_X_AUTH_SUBJECT): judge a name with its underscores as dashes.
            key = name.replace(b"_", b"-") if b"_" in name else name
            if key in drop or key in named or key.startswith(b"x-auth-"):
                if trusted:
                    if name == b"x-forwarded-for":
                        xff = value if xff is None else xff + b", " + value
                    elif name == b"x-forwarded-proto":
                        xfp = value
                    elif name == b"x-forwarded-host":
                        xfh = value
                    elif name in _FORWARDING:
                        out.append((name, value))
                continue
            if name == b"cookie" and self._token_cookie is not None:
                value = without_cookie(value, self._token_cookie)
                if not value:
                    continue
            out.append((name, value))
        client = (peer or "").encode("latin-1")
        out.append((b"x-forwarded-for", xff + b", " + client if xff else client))
        out.append((b"x-forwarded-proto", xfp if xfp else scheme.encode("latin-1")))
        if xfh or host:
            out.append((b"x-forwarded-host", xfh or host or b""))
        if self._preserve_host and host:
            out.append((b"host", host))
        out.append((b"x-request-id", request_id.encode("latin-1")))
        if identity is not None:
            out.append((b"x-auth-subject", _wire(identity.subject)))
            out.append((b"x-auth-method", identity.method.encode("latin-1")))
            out.append((b"x-auth-scopes", _wire(" ".join(sorted(identity.scopes)))))
            if identity.issuer:
                out.append((b"x-auth-issuer", _wire(identity.issuer)))
            out.extend(
                (name.encode("latin-1"), _wire(value)) for name, value in identity.claim_headers
            )
        if self._secret is not None:
            signature = identity_signature(self._secret, request_id, identity)
            out.append((SIGNATURE_HEADER.encode("latin-1"), signature.encode("latin-1")))
        return out

    @staticmethod
    def downstream_response(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The upstream's response headers without hop-by-hop ones, names lower-cased."""
        pairs = [(name.lower(), value) for name, value in headers]
        named = connection_named(pairs)
        return [
            (name, value)
            for name, value in pairs
            if name not in HOP_BY_HOP and name not in named and name != b"x-request-id"
        ]
