from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from proxy.auth import AuthService
from proxy.config import Settings
from proxy.telemetry.metrics import Metrics

from .support import HS_ENV, HS_SECRET, JwksServer

MakeService = Callable[..., Awaitable[AuthService]]


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def hs_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(HS_ENV, HS_SECRET)
    return HS_ENV


@pytest.fixture
async def make_service() -> AsyncIterator[MakeService]:
    made: list[tuple[AuthService, aiohttp.ClientSession]] = []

    async def make(
        settings: Settings, metrics: Metrics | None = None, start: bool = True
    ) -> AuthService:
        session = aiohttp.ClientSession()
        try:
            service = AuthService(settings, metrics or Metrics(), session)
        except Exception:
            await session.close()
            raise
        made.append((service, session))
        if start:
            await service.start()
        return service

    yield make
    for service, session in made:
        await service.stop()
        await session.close()
