"""Upstream apps for integration tests: pure ASGI, reporting exactly what they received."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any
from urllib.parse import parse_qs

from . import ws_upstream

Scope = dict[str, Any]


async def _reply(
    send: Any,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    content_type: bytes = b"application/json",
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _pattern(size: int) -> bytes:
    block = hashlib.sha256(b"authproxy").digest() * 2048  # 64 KiB of known bytes
    return (block * (size // len(block) + 1))[:size]


async def http_and_ws(scope: Scope, receive: Any, send: Any) -> None:
    """`app` for HTTP, tests/support/ws_upstream.py's echo for WebSockets: one upstream for both."""
    if scope["type"] == "websocket":
        await ws_upstream.app(scope, receive, send)
    else:
        await app(scope, receive, send)


async def app(scope: Scope, receive: Any, send: Any) -> None:
    """Endpoints: /echo/*, /upload, /download?size=, /sse?n=&delay=, /sse-split?n=&delay=,
    /drip?n=&delay=, /slow?delay=, /status/N, /redirect, /cors, /hop, /vary, anything else
    echoes."""
    if scope["type"] != "http":
        return
    path: str = scope["path"]
    query = parse_qs(scope["query_string"].decode())
    if path == "/upload":
        digest = hashlib.sha256()
        size = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            digest.update(chunk)
            size += len(chunk)
            if not message.get("more_body"):
                break
        await _reply(send, 200, json.dumps({"sha256": digest.hexdigest(), "size": size}).encode())
        return
    if path == "/download":
        size = int(query.get("size", ["0"])[0])
        chunked = "chunked" in query
        headers = [(b"content-type", b"application/octet-stream")]
        if not chunked:
            headers.append((b"content-length", str(size).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        data = _pattern(size)
        step = 1 << 16
        for i in range(0, size, step):
            await send(
                {"type": "http.response.body", "body": data[i : i + step], "more_body": True}
            )
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/sse":
        n = int(query.get("n", ["3"])[0])
        delay = float(query.get("delay", ["0.3"])[0])
        await asyncio.sleep(float(query.get("wait", ["0"])[0]))  # before the head
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        for i in range(n):
            await send(
                {"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True}
            )
            await asyncio.sleep(delay)
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/drip":
        # A body that streams slowly, not SSE: n chunks of 100 bytes, `delay` apart.
        n = int(query.get("n", ["3"])[0])
        delay = float(query.get("delay", ["0.3"])[0])
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")],
            }
        )
        for _ in range(n):
            await send({"type": "http.response.body", "body": b"x" * 100, "more_body": True})
            await asyncio.sleep(delay)
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/sse-split":
        # Each event in two writes, `delay` apart: "data: i" then its end, "\n\n".
        n = int(query.get("n", ["3"])[0])
        delay = float(query.get("delay", ["0.3"])[0])
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        by_line = query.get("split", [""])[0] == "line"  # "data: i\n", then "\n"
        for i in range(n):
            parts = (
                (f"data: {i}\n".encode(), b"\n") if by_line else (f"data: {i}".encode(), b"\n\n")
            )
            for part in parts:
                await send({"type": "http.response.body", "body": part, "more_body": True})
                await asyncio.sleep(delay)
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/slow":
        await asyncio.sleep(float(query.get("delay", ["5"])[0]))
        await _reply(send, 200, b'{"slow":true}')
        return
    if path.startswith("/status/"):
        status = int(path.rsplit("/", 1)[1])
        if status in (204, 304):
            await send(
                {"type": "http.response.start", "status": status, "headers": [(b"etag", b'"v1"')]}
            )
            await send({"type": "http.response.body", "body": b""})
        else:
            await _reply(send, status, b'{"status":%d}' % status)
        return
    if path == "/redirect":
        await _reply(send, 302, b"", [(b"location", b"/echo/target")])
        return
    if path == "/cors":
        await _reply(
            send,
            200,
            b"{}",
            [
                (b"access-control-allow-origin", b"*"),
                (b"access-control-allow-credentials", b"true"),
                (b"access-control-expose-headers", b"X-Secret"),
                (b"vary", b"Accept-Encoding"),
            ],
        )
        return
    if path == "/hop":
        await _reply(
            send,
            200,
            b"{}",
            [
                (b"connection", b"x-upstream-private"),
                (b"x-upstream-private", b"1"),
                (b"keep-alive", b"timeout=5"),
                (b"x-total-count", b"42"),
            ],
        )
        return
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    report = {
        "method": scope["method"],
        "scheme": scope["scheme"],
        "path": scope["path"],
        "raw_path": scope["raw_path"].decode("latin-1"),
        "query_string": scope["query_string"].decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "body_size": len(body),
    }
    await _reply(send, 200, json.dumps(report).encode(), [(b"x-total-count", b"3")])
