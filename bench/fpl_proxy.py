"""The Python peer: a reverse proxy built with fastapi-proxy-lib, as its documentation shows.

The documented example mounts `ReverseHttpProxy` on a FastAPI catch-all route; this mounts it on
the Starlette route FastAPI is built on, which does strictly less per request (no dependency
injection), so the peer's figure is, if anything, flattering. Its httpx client keeps up to 64
idle upstream connections, like the other contenders' pools: httpx's default of 20 makes it open
and close connections at 32 concurrent requests, which would charge the peer for our settings.
Configured through BENCH_FPL_UPSTREAM (e.g. http://127.0.0.1:9000/).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi_proxy_lib.core.http import ReverseHttpProxy
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def create() -> Starlette:
    client = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=64))
    proxy = ReverseHttpProxy(client, base_url=os.environ["BENCH_FPL_UPSTREAM"])

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await proxy.aclose()

    async def forward(request: Request) -> Response:
        return await proxy.proxy(request=request)

    return Starlette(routes=[Route("/{path:path}", forward, methods=METHODS)], lifespan=lifespan)
