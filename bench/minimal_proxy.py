"""The floor of the chosen stack: a bare ASGI proxy on uvicorn + aiohttp, with no policy at all.

Not a product: it forwards GETs without streaming, header rules or errors. It is in the benchmark
so the sidecar's figure can be split into what the stack costs and what the sidecar adds.
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp
from yarl import URL

UPSTREAM = os.environ.get("MINIMAL_PROXY_UPSTREAM", "http://127.0.0.1:9000")


class MinimalProxy:
    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.session = aiohttp.ClientSession(auto_decompress=False)
                    await send({"type": "lifespan.startup.complete"})
                else:
                    assert self.session is not None
                    await self.session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        assert self.session is not None
        await receive()
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k != b"host"]
        url = URL(UPSTREAM + scope["raw_path"].decode(), encoded=True)
        async with self.session.request(scope["method"], url, headers=headers) as response:
            body = await response.read()
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [
                        (k.lower(), v)
                        for k, v in response.raw_headers
                        if k.lower() not in (b"connection", b"keep-alive")
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})


app = MinimalProxy()
