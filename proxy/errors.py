"""The one exception hierarchy of authproxy, and the one place that renders it.

    ConfigError                 a bad configuration: names the key, never served to a client
    ProxyError                  what the sidecar answers itself (JSON error body, or a close code)
     ├── BadRequest             400 bad_request
     ├── Unauthorized           401 unauthorized (+ WWW-Authenticate on JWT routes)
     ├── Forbidden              403 forbidden
     │    └── InsufficientScope 403 forbidden, error="insufficient_scope"
     ├── NotFound               404 not_found
     ├── RequestTimeout         408 request_timeout
     ├── PayloadTooLarge        413 payload_too_large
     ├── RateLimited            429 rate_limited
     ├── BadGateway             502 bad_gateway
     ├── ServiceUnavailable     503 service_unavailable (+ Retry-After)
     ├── GatewayTimeout         504 gateway_timeout
     └── InternalError          500 internal_error (a bug: never a traceback to the client)

Library exceptions are translated into these where they enter (`raise BadGateway(...) from exc`);
`render` turns one into a response and `close_code` into a WebSocket close code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from .identity import Identity
from .telemetry.clock import rfc3339_now

# WebSocket close codes (RFC 6455 and ours). Clients rely on the 44xx ones to decide what to do.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_TOKEN_EXPIRED = 4401
CLOSE_REVOKED = 4403

_JSON = json.JSONEncoder(separators=(",", ":"), default=str)


class ConfigError(Exception):
    """A configuration that cannot be used; `str()` is one line naming the key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class ProxyError(Exception):
    """An error the sidecar answers itself, with a SPEC error code and HTTP status."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    close_code: ClassVar[int] = CLOSE_INTERNAL_ERROR
    # The access line's `reason` when `details` has none (the body stays as it is).
    log_reason: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.headers: dict[str, str] = dict(headers or {})
        # Who was refused, when authentication succeeded and authorisation did not (for the log).
        self.identity: Identity | None = None
        # The method whose credential was refused (the access line's `auth_method`).
        self.auth_method: str | None = None


class BadRequest(ProxyError):
    """The request cannot be judged safely (bad path, bad header)."""

    status = 400
    code = "bad_request"
    close_code = CLOSE_POLICY_VIOLATION


class Unauthorized(ProxyError):
    """No acceptable credential: missing, malformed, expired or unknown."""

    status = 401
    code = "unauthorized"
    close_code = CLOSE_POLICY_VIOLATION

    def __init__(
        self,
        message: str,
        *,
        details: Mapping[str, Any] | None = None,
        bearer: bool = False,
        error: str | None = "invalid_token",
        realm: str | None = None,
    ) -> None:
        headers: dict[str, str] = {}
        if bearer:
            headers["WWW-Authenticate"] = bearer_challenge(error, message, realm=realm)
        super().__init__(message, details=details, headers=headers)


class Forbidden(ProxyError):
    """The caller is known (or the origin is refused) and is not allowed."""

    status = 403
    code = "forbidden"
    close_code = CLOSE_POLICY_VIOLATION


class InsufficientScope(Forbidden):
    """The caller lacks scopes the route requires (RFC 6750 insufficient_scope)."""

    log_reason = "insufficient_scope"

    def __init__(self, missing: list[str], required: list[str], *, bearer: bool = True) -> None:
        message = "missing required scope: " + " ".join(missing)
        headers = {}
        if bearer:
            headers["WWW-Authenticate"] = bearer_challenge(
                "insufficient_scope", message, scope=" ".join(required)
            )
        super().__init__(
            message,
            details={"missing_scopes": missing, "required_scopes": required},
            headers=headers,
        )


class NotFound(ProxyError):
    """No route matches the request."""

    log_reason = "no_route"
    status = 404
    code = "not_found"
    close_code = CLOSE_POLICY_VIOLATION


class PayloadTooLarge(ProxyError):
    """The request body exceeds `server.max_body_bytes`."""

    status = 413
    code = "payload_too_large"
    close_code = CLOSE_MESSAGE_TOO_BIG


class RequestTimeout(ProxyError):
    """The client stopped sending its request body (server.client_body_timeout_s)."""

    status = 408
    code = "request_timeout"
    close_code = CLOSE_POLICY_VIOLATION


class RateLimited(ProxyError):
    """Too many requests from this caller."""

    status = 429
    code = "rate_limited"
    close_code = CLOSE_TRY_AGAIN_LATER


class BadGateway(ProxyError):
    """The upstream could not be reached or answered garbage."""

    status = 502
    code = "bad_gateway"
    close_code = CLOSE_INTERNAL_ERROR


class ServiceUnavailable(ProxyError):
    """The sidecar will not take the request now (draining, keys not loaded, no capacity)."""

    status = 503
    code = "service_unavailable"
    close_code = CLOSE_TRY_AGAIN_LATER

    def __init__(
        self, message: str, *, retry_after_s: int = 1, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message, details=details, headers={"Retry-After": str(retry_after_s)})


class InternalError(ProxyError):
    """A bug in the sidecar: answered as JSON, logged with its type, never with a traceback."""

    status = 500
    code = "internal_error"
    close_code = CLOSE_INTERNAL_ERROR


class GatewayTimeout(ProxyError):
    """The upstream did not answer in time."""

    status = 504
    code = "gateway_timeout"
    close_code = CLOSE_INTERNAL_ERROR


def _quote(value: str) -> str:
    # RFC 6750 auth-param values are quoted-strings of printable ASCII without `"` and `\`:
    # anything else (an operator's non-ASCII provider name, say) is replaced, never a crash.
    return '"' + "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in value) + '"'


def bearer_challenge(
    error: str | None,
    description: str | None = None,
    *,
    scope: str | None = None,
    realm: str | None = None,
) -> str:
    """A `WWW-Authenticate: Bearer ...` value (RFC 6750 section 3)."""
    params = []
    if realm:
        params.append(f"realm={_quote(realm)}")
    if error:
        params.append(f"error={_quote(error)}")
        if description:
            params.append(f"error_description={_quote(description)}")
    if scope:
        params.append(f"scope={_quote(scope)}")
    return "Bearer " + ", ".join(params) if params else "Bearer"


def error_body(
    code: str, message: str, request_id: str, details: Mapping[str, Any] | None = None
) -> bytes:
    """The SPEC error document, serialised."""
    return _JSON.encode(
        {
            "error": code,
            "message": message,
            "details": dict(details or {}),
            "request_id": request_id,
            "timestamp": rfc3339_now(),
        },
    ).encode()


def render(exc: ProxyError, request_id: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of the JSON error response for `exc`."""
    body = error_body(exc.code, exc.message, request_id, exc.details)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-request-id", request_id.encode()),
    ]
    headers.extend((k.lower().encode(), v.encode("latin-1")) for k, v in exc.headers.items())
    return exc.status, headers, body
