"""Fixtures for the upstream_demo tests: in-process clients and real uvicorn servers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Literal

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp

from upstream_demo.__main__ import EmbeddedServer
from upstream_demo.app import DemoBackend, create_app

ServeApp = Callable[..., AbstractAsyncContextManager[str]]


@contextlib.asynccontextmanager
async def _serve(app: ASGIApp, *, lifespan: Literal["on", "off"] = "on") -> AsyncIterator[str]:
    """Run `app` with uvicorn on an ephemeral loopback port; yields `host:port`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan=lifespan, log_level="warning", timeout_graceful_shutdown=2
    )
    server = EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn stopped before it started")
                await asyncio.sleep(0.01)
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
def serve_app() -> ServeApp:
    return _serve


@pytest.fixture
def demo_app() -> Iterator[Starlette]:
    """The backend without its simulator; requested transitions finish after 50 ms."""
    app = create_app(simulate=False, token_delay_s=0.0, transition_s=0.05)
    yield app
    backend(app).simulator.close()


def backend(app: Starlette) -> DemoBackend:
    found: DemoBackend = app.state.backend
    return found


@pytest.fixture
def demo(demo_app: Starlette) -> DemoBackend:
    return backend(demo_app)


@pytest.fixture
async def client(demo_app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the backend in process."""
    transport = httpx.ASGITransport(app=demo_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://demo") as http:
        yield http
