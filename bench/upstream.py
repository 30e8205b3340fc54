"""The benchmark upstream: the cheapest possible ASGI answers, so the figures measure the hop.

- any path: a 34-byte JSON answer (the small-GET figures)
- `.../bulk`: GET streams `?bytes=N` bytes (default 100 MiB), PUT/POST reads and counts the body
- WebSocket on any path: echoes every message back (text as text, bytes as bytes)
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

BODY = b'{"id":"llama2","status":"running"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
BULK_DEFAULT = 100 * 1024 * 1024
# One preallocated chunk, sent again and again: the upstream should cost nothing per byte.
CHUNK = b"\0" * (256 * 1024)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await _echo(receive, send)
    elif scope["type"] == "http":
        if scope["path"].endswith("/bulk"):
            await _bulk(scope, receive, send)
        else:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            await send({"type": "http.response.body", "body": BODY})


async def _echo(receive: Any, send: Any) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})


async def _bulk(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["method"] in ("PUT", "POST"):
        received = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            received += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = b'{"bytes":%d}' % received
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return
    query = parse_qs(scope.get("query_string", b"").decode())
    remaining = int(query.get("bytes", [str(BULK_DEFAULT)])[0])
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", str(remaining).encode()),
            ],
        }
    )
    view = memoryview(CHUNK)
    while remaining > len(CHUNK):
        await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        remaining -= len(CHUNK)
    await send({"type": "http.response.body", "body": bytes(view[:remaining])})
