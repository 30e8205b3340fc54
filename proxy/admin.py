"""The admin listener's application: /healthz, /readyz, /metrics. Never on the public listener."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from .types import Receive, Scope, Send


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
    ) -> None:
        self._metrics = metrics
        self._readiness = readiness
        self._details = details

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
        else:
            await _reply(send, 404, b"application/json", b'{"error":"not_found"}')


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
