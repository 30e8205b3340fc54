"""Wires the stages and owns the long-lived objects (client pool, key caches, tunnel) through the
ASGI lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

import aiohttp

from .admin import AdminApp
from .auth import AuthService, consumed_headers, new_key_session
from .config import Settings
from .cors import Cors
from .errors import ConfigError
from .pipeline import Pipeline
from .relay.headers import HeaderPolicy
from .relay.http import Forwarder
from .relay.tunnel import Tunnel
from .relay.upstream import UpstreamPool
from .routing import RouteTable
from .state import Limiter, Revocation, Revocations, Store, open_store
from .telemetry import logs
from .telemetry.access import AccessLog
from .telemetry.metrics import Metrics
from .types import Receive, Scope, Send

log = logging.getLogger("authproxy.app")


class App:
    """The sidecar: the public ASGI app (with lifespan) and its admin app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        # One access record per request or session, one writer of lines and request metrics.
        self.access = AccessLog(self.metrics, log_lines=settings.logging.access_log)
        # Everything that can fail on a bad configuration is built here, before serving.
        self.headers = HeaderPolicy(settings, credential_headers=consumed_headers(settings.auth))
        self.routes = RouteTable(settings.routes)
        self.cors = Cors(settings, self.metrics)
        self.forwarder = Forwarder(
            settings.server.max_body_bytes,
            self.headers,
            preserve_host=settings.server.preserve_host,
            send_timeout_s=settings.server.send_timeout_s,
            client_body_timeout_s=settings.server.client_body_timeout_s,
        )
        self.revocations = Revocations(on_revoked=self._revoked)
        self.store: Store | None = None
        self.admin = AdminApp(
            self.metrics, self.readiness, revoke=self.revoke, token=_admin_token(settings)
        )
        self.pipeline: Pipeline | None = None
        self.auth: AuthService | None = None
        self.tunnel: Tunnel | None = None
        self.started = False
        self.draining = False
        self.startup_error: Exception | None = None
        self._key_session: aiohttp.ClientSession | None = None

    def readiness(self) -> dict[str, bool]:
        return {
            "started": self.started,
            "keys_loaded": self.auth is not None and self.auth.ready,
            "not_draining": not self.draining,
        }

    def begin_drain(self) -> None:
        """SIGTERM: readiness fails, new requests get 503, WebSockets close after the drain."""
        self.draining = True
        if self.pipeline is not None:
            self.pipeline.draining = True
        if self.tunnel is not None:
            self.tunnel.begin_drain()

    async def drained(self) -> None:
        """After `begin_drain`: returns once no WebSocket session is open (they are closed with
        1001 when `websocket.drain_s` is over)."""
        if self.tunnel is not None:
            await self.tunnel.drained()

    async def check(self) -> None:
        """Build every stage as `startup` does, without fetching or serving: for check-config."""
        UpstreamPool(self.settings.upstream, asyncio.get_running_loop())
        async with new_key_session() as session:
            AuthService(self.settings, self.metrics, session)

    async def startup(self) -> None:
        self.forwarder.pool = UpstreamPool(self.settings.upstream, asyncio.get_running_loop())
        # Key fetches have a client of their own: they never wait behind user traffic.
        self._key_session = new_key_session()
        self.auth = AuthService(self.settings, self.metrics, self._key_session)
        await self.auth.start()
        self.tunnel = Tunnel(
            self.settings,
            self.metrics,
            subscribe_revocations=self.auth.subscribe_revocations,
            subscribe_key_withdrawals=self.auth.subscribe_key_withdrawals,
            access=self.access,
        )
        await self.tunnel.start()
        self.store = open_store(self.settings.state, self.metrics)
        await self.store.start(self.revocations.apply)
        limiter = Limiter(self.settings, self.metrics, self.store)
        self.pipeline = Pipeline(
            self.settings,
            routes=self.routes,
            cors=self.cors,
            auth=self.auth,
            headers=self.headers,
            forwarder=self.forwarder,
            tunnel=self.tunnel,
            metrics=self.metrics,
            access=self.access,
            limiter=limiter if limiter.routes is not None or limiter.session_cap else None,
            revocations=self.revocations,
        )
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.auth.reload_keys)
        self.started = True

    async def shutdown(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self.tunnel is not None:
            await self.tunnel.stop()
        if self.store is not None:
            await self.store.close()
        if self.auth is not None:
            await self.auth.stop()
        if self.forwarder.pool is not None:
            await self.forwarder.pool.close()
        if self._key_session is not None:
            await self._key_session.close()
        logs.flush()

    async def revoke(self, revocation: Revocation) -> None:
        """`authproxy revoke` through the admin listener: to the state backend (Redis: every
        sidecar hears it), and to this sidecar at once."""
        if self.store is not None:
            await self.store.publish(revocation)
        self.revocations.apply(revocation)

    def _revoked(self, revocation: Revocation) -> None:
        """A revocation heard (here or from another sidecar): end its open WebSockets (4403)."""
        self.metrics.revocations.labels(revocation.kind).inc()
        if self.tunnel is None:
            return
        if revocation.kind == "key":
            self.tunnel.sessions.revoke_api_key(revocation.value)
        else:
            self.tunnel.sessions.revoke_token(revocation.value)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        assert self.pipeline is not None, "the lifespan has not started"
        await self.pipeline(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    self.startup_error = exc
                    await self.shutdown()  # whatever started before the failure
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _admin_token(settings: Settings) -> str | None:
    """The admin listener's bearer secret, from the variable `admin.token_env` names."""
    name = settings.admin.token_env
    if name is None:
        return None
    token = os.environ.get(name, "")
    if len(token) < 16:
        raise ConfigError(
            "admin.token_env", f"${name} must hold a secret of at least 16 characters"
        )
    return token
