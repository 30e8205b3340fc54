"""uvicorn's sans-I/O WebSocket protocol, lighter for a connection that stays open for hours.

uvicorn keeps the handshake's request and response (every header, parsed) on the protocol for the
connection's whole life; they are never read again once the handshake is answered. With thousands
of idle model-event feeds open that is kilobytes a socket, so they are let go after the answer.
A contract test (tests/test_uvicorn_hooks.py) fails if uvicorn renames what this relies on.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    """Drops the parsed handshake once the connection is accepted."""

    async def send(self, message: Any) -> None:
        await super().send(message)
        if self.handshake_complete and getattr(self, "response", None) is not None:
            self.request = None  # type: ignore[assignment]
            self.response = None  # type: ignore[assignment]
