"""The admin listener's application: /healthz, /readyz, /metrics. Never on the public listener.

`POST /revocations` (what `authproxy revoke` calls with the memory backend) changes state: it
answers only a request bearing the secret of `admin.token_env`, and 403 when none is configured,
whatever address the listener has.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Literal, Protocol

from .state import Revocation
from .state.store import StateUnavailable
from .types import Receive, Scope, Send

_MAX_BODY = 4096


class Exposition(Protocol):
    """What /metrics serves: one process's metrics, or a whole group's."""

    def render(self) -> bytes: ...


class AdminApp:
    """Liveness, readiness and Prometheus metrics."""

    def __init__(
        self,
        metrics: Exposition,
        readiness: Callable[[], dict[str, bool]],
        details: Callable[[], dict[str, object]] | None = None,
        *,
        revoke: Callable[[Revocation], Awaitable[None]] | None = None,
        token: str | None = None,
    ) -> None:
        self._metrics = metrics
        self._readiness = readiness
        self._details = details
        self._revoke = revoke
        self._token = token.encode() if token else None

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether /readyz answers 200, and what its body details: here, this process's checks
        (and, when given, informational details such as the circuit breaker's state)."""
        checks = self._readiness()
        body: dict[str, Any] = {"checks": checks}
        if self._details is not None:
            body.update(self._details())
        return all(checks.values()), body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/healthz":
            await _reply(send, 200, b"application/json", b'{"status":"ok"}')
        elif path == "/readyz":
            ready, details = await self.readiness()
            body = json.dumps({"status": "ready" if ready else "not_ready", **details})
            await _reply(send, 200 if ready else 503, b"application/json", body.encode())
        elif path == "/metrics":
            await _reply(
                send, 200, b"text/plain; version=0.0.4; charset=utf-8", self._metrics.render()
            )
        elif path == "/revocations" and self._revoke is not None:
            status, answer = await self._revocation(scope, receive)
            await _reply(send, status, b"application/json", json.dumps(answer).encode())
        else:
            await _reply(send, 404, b"application/json", b'{"error":"not_found"}')

    async def _revocation(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any]]:
        assert self._revoke is not None
        if scope["method"] != "POST":
            return 405, {"error": "method_not_allowed", "message": "POST a revocation"}
        if self._token is None:
            return 403, {"error": "forbidden", "message": "admin.token_env is not configured"}
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                presented = value[7:].strip()
        if not hmac.compare_digest(presented, self._token):
            return 401, {"error": "unauthorized", "message": "a valid admin bearer token needed"}
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > _MAX_BODY:
                return 413, {"error": "payload_too_large", "message": "at most 4 KiB"}
            if not message.get("more_body"):
                break
        try:
            revocation = parse_revocation(json.loads(body))
        except (ValueError, TypeError, RecursionError) as exc:  # RecursionError: nesting
            why = "too deeply nested" if isinstance(exc, RecursionError) else str(exc)
            return 400, {"error": "bad_request", "message": why}
        try:
            await self._revoke(revocation)
        except StateUnavailable:
            return 503, {"error": "service_unavailable", "message": "the state backend is down"}
        return 200, {"revoked": {"kind": revocation.kind, "id": revocation.value}}


async def _reply(send: Send, status: int, content_type: bytes, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def parse_revocation(data: Any) -> Revocation:
    """`{"key_id": ...}` or `{"jti": ..., "until": "<RFC 3339>"}`; `ValueError` otherwise."""
    if not isinstance(data, dict) or len({"key_id", "jti"} & data.keys()) != 1:
        raise ValueError('expected {"key_id": ID} or {"jti": JTI}')
    kind: Literal["key", "jti"] = "key" if "key_id" in data else "jti"
    value = data["key_id" if kind == "key" else "jti"]
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ValueError("the id must be a non-empty string of at most 256 characters")
    until = data.get("until")
    end: float | None = None
    if until is not None:
        if not isinstance(until, str):
            raise ValueError("until must be an RFC 3339 string")
        moment = datetime.fromisoformat(until.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            raise ValueError("until needs a time zone offset, e.g. 2027-01-01T00:00:00Z")
        end = moment.timestamp()
        if end <= time.time():
            # A revocation that is over before it begins would be reported done and do nothing.
            raise ValueError(f"until is in the past ({until})")
    return Revocation(kind, value, end)
