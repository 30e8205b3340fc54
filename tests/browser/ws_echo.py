"""The browser tests' upstream: the reporting HTTP upstream of tests/support, plus a WebSocket echo.

Any WebSocket path: accepts, then sends back every text or binary message it receives.
"""

from __future__ import annotations

from typing import Any

from tests.support.upstreams import app as http_app

Scope = dict[str, Any]


async def app(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await http_app(scope, receive, send)
        return
    if scope["type"] != "websocket":
        return
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        elif message.get("bytes") is not None:
            await send({"type": "websocket.send", "bytes": message["bytes"]})
