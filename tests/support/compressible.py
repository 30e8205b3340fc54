"""An upstream for compression tests: text-like and binary answers, whole and streamed, some the
upstream compressed itself. Pure ASGI; the bodies are deterministic so a test can rebuild them."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from typing import Any
from urllib.parse import parse_qs

Scope = dict[str, Any]


def json_body(size: int) -> bytes:
    """A JSON document of at least `size` bytes, like an API's list answer."""
    items = []
    total = 2
    i = 0
    while total < size:
        item = {"id": i, "name": f"model-{i % 17}", "status": "ready", "score": (i * 37) % 101}
        items.append(item)
        total += len(json.dumps(item)) + 2
        i += 1
    return json.dumps(items).encode()


def text_chunks(n: int) -> list[bytes]:
    return [
        f"line {i}: the quick brown fox jumps over the lazy dog\n".encode() * 40 for i in range(n)
    ]


def binary(size: int) -> bytes:
    out = b""
    seed = b"authproxy"
    while len(out) < size:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return out[:size]


async def _whole(
    send: Any, body: bytes, headers: list[tuple[bytes, bytes]], status: int = 200
) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Any, send: Any) -> None:
    """/json?size=, /stream?n=, /binary?size=, /gzipped, /sse, /range, /no-transform."""
    if scope["type"] != "http":
        return
    path: str = scope["path"]
    query = parse_qs(scope["query_string"].decode())
    size = int(query.get("size", ["20000"])[0])
    if path == "/json":
        await _whole(
            send,
            json_body(size),
            [(b"content-type", b"application/json"), (b"etag", b'"v1"'), (b"vary", b"Origin")],
        )
    elif path == "/stream":
        n = int(query.get("n", ["5"])[0])
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")],
            }
        )
        for chunk in text_chunks(n):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await asyncio.sleep(0.02)
        await send({"type": "http.response.body", "body": b""})
    elif path == "/binary":
        await _whole(send, binary(size), [(b"content-type", b"image/png")])
    elif path == "/gzipped":
        await _whole(
            send,
            gzip.compress(json_body(size)),
            [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")],
        )
    elif path == "/sse":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for i in range(3):
            await send(
                {
                    "type": "http.response.body",
                    "body": f"data: {'x' * 2000} {i}\n\n".encode(),
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b""})
    elif path == "/range":
        body = json_body(size)[:5000]
        await _whole(
            send,
            body,
            [(b"content-type", b"application/json"), (b"content-range", b"bytes 0-4999/99999")],
            status=206,
        )
    elif path == "/no-transform":
        await _whole(
            send,
            json_body(size),
            [(b"content-type", b"application/json"), (b"cache-control", b"no-transform")],
        )
    else:
        await _whole(send, b'{"error":"not_found"}', [(b"content-type", b"application/json")], 404)
