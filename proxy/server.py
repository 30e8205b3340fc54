"""Runs the app on uvicorn: the public listener and the admin listener in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Generator
from types import FrameType
from typing import Any

import uvicorn
import uvloop

from .app import App
from .config import Settings, split_listen
from .errors import ConfigError
from .limits import bounded_head_protocol
from .ops import logs


class QuietServer(uvicorn.Server):
    """The admin server: the public server owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class DrainingServer(uvicorn.Server):
    """The public server: on SIGTERM or SIGINT the app starts draining before uvicorn closes."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_exit: Callable[[], None],
        drained: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._drained = drained

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            yield
            # uvicorn re-raises the signal it stopped on once serving ends, so the process would
            # die by SIGTERM (or a KeyboardInterrupt traceback on Ctrl-C) after a clean drain.
            self._captured_signals.clear()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Stop accepting at once, then let the app drain (WebSockets get 1001 after
        # websocket.drain_s) before uvicorn closes what is left: it would send them 1012 now.
        for server in self.servers:
            server.close()
        if self._drained is not None:
            await self._drained()
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_soon_threadsafe(self._on_exit)
        super().handle_exit(sig, frame)


def uvicorn_configs(app: App, settings: Settings) -> tuple[uvicorn.Config, uvicorn.Config]:
    """The public and admin listeners' uvicorn configurations."""
    host, port = split_listen(settings.server.listen)
    admin_host, admin_port = split_listen(settings.admin.listen)
    ws = settings.websocket
    # uvicorn's own proxy-headers handling trusts 127.0.0.1; forwarding headers are decided in
    # relay/headers.py against server.trusted_proxies instead.
    common: dict[str, Any] = dict(
        loop="none",
        http=bounded_head_protocol(
            settings.server.max_header_bytes, settings.server.header_timeout_s
        ),
        proxy_headers=False,
        server_header=False,
        date_header=False,
        log_config=None,
        access_log=False,
    )
    public = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        ws="websockets-sansio",
        ws_max_size=ws.max_message_bytes,
        ws_per_message_deflate=ws.client_compression,
        ws_ping_interval=ws.ping_interval_s or None,
        ws_ping_timeout=ws.ping_interval_s or None,
        timeout_graceful_shutdown=math.ceil(settings.server.graceful_shutdown_s),
        **common,
    )
    admin = uvicorn.Config(
        app.admin, host=admin_host, port=admin_port, lifespan="off", ws="none", **common
    )
    return public, admin


def serve(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; in-flight requests finish, new ones are refused."""
    logs.configure(settings.logging.level, settings.logging.flush_interval_s)
    app = App(settings)
    public_config, admin_config = uvicorn_configs(app, settings)
    public = DrainingServer(public_config, app.begin_drain, app.drained)
    admin = QuietServer(admin_config)

    log = logging.getLogger("authproxy")

    async def run() -> int:
        # The admin listener first: /healthz answers while the app starts (JWKS are fetched).
        admin_task = asyncio.create_task(_serve_quietly(admin))
        while not admin.started and not admin_task.done():
            await asyncio.sleep(0.01)
        if admin_task.done():
            log.error("cannot listen on admin.listen %s", settings.admin.listen)
            return 1
        try:
            if not await _serve_quietly(public):
                if isinstance(app.startup_error, ConfigError):
                    log.error("config error: %s", app.startup_error)
                    return 2
                if app.startup_error is not None:
                    log.error("startup failed: %s", app.startup_error)
                else:
                    log.error("cannot start on server.listen %s", settings.server.listen)
                return 1
            return 0
        finally:
            admin.should_exit = True
            await admin_task

    logging.getLogger("authproxy").info(
        "authproxy starting",
        extra={
            "fields": {
                "listen": settings.server.listen,
                "admin": settings.admin.listen,
                "upstream": settings.upstream.url,
            }
        },
    )
    return uvloop.run(run())


async def _serve_quietly(server: uvicorn.Server) -> bool:
    """Run a uvicorn server; False when it could not start (uvicorn exits the process then)."""
    try:
        await server.serve()
    except SystemExit:
        return False
    return server.started
