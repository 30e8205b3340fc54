"""Wires the stages and owns the long-lived objects (client pool, key caches, tunnel) through the
ASGI lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable

import aiohttp

from .admin import AdminApp
from .auth import AuthService, consumed_headers, new_key_session
from .auth.claims import failed_claim
from .auth.rejected import Rejected
from .auth.scopes import missing_scopes
from .config import RouteSettings, Settings, digest, pin_restart_only
from .cors import Cors
from .errors import ConfigError, ProxyError
from .identity import Identity
from .pipeline import Pipeline
from .relay.headers import HeaderPolicy
from .relay.http import Forwarder
from .relay.streams import StreamRegistry
from .relay.tunnel import ReauthRefused, Tunnel
from .relay.upstream import UpstreamPool
from .relay.ws_outcomes import (
    KEY_REVOKED,
    POLICY_CHANGED,
    PROVIDER_CHANGED,
    SIGNING_KEY_WITHDRAWN,
    Outcome,
)
from .relay.ws_session import Session
from .routing import RouteTable
from .state import Limiter, Revocation, Revocations, Store, open_store
from .telemetry import logs
from .telemetry.access import AccessLog
from .telemetry.clock import rfc3339
from .telemetry.metrics import Metrics
from .telemetry.otel import Exporter, MissingExtra
from .tls import reload_server_certificate, server_context
from .types import Receive, Scope, Send

log = logging.getLogger("authproxy.app")


def _route_refusal(identity: Identity, route: RouteSettings) -> str | None:
    """Why a route no longer admits an identity it was not asked about now (a reload judging an
    open session, a re-authentication): its method, scopes and claim rules; None when it does."""
    method = "jwt" if identity.method == "introspection" else identity.method  # a bearer token
    if method not in route.auth:
        return "method_not_allowed"
    if missing_scopes(identity, route):
        return "insufficient_scope"
    if route.require_claims and failed_claim(identity, route.require_claims) is not None:
        return "claim_mismatch"
    return None


def _exporter(settings: Settings) -> Exporter | None:
    """The span exporter `[tracing]` asks for, if any."""
    t = settings.tracing
    if t.otlp_endpoint is None:
        return None
    try:
        return Exporter(
            t.otlp_endpoint,
            service_name=t.service_name,
            sample_ratio=t.sample_ratio,
            export_interval_s=t.export_interval_s,
        )
    except MissingExtra:
        raise ConfigError(
            "tracing.otlp_endpoint",
            "span export needs the otel extra: pip install 'authproxy[otel]'",
        ) from None


class App:
    """The sidecar: the public ASGI app (with lifespan) and its admin app."""

    def __init__(self, settings: Settings, source: Callable[[], Settings] | None = None) -> None:
        """`source` gives the settings a reload (SIGHUP) applies: the config file read again;
        without one, SIGHUP re-reads key files and certificate."""
        self.settings = settings
        self._source = source
        self.metrics = Metrics()
        # One access record per request or session, one writer of lines and request metrics.
        self.access = AccessLog(self.metrics, log_lines=settings.logging.access_log)
        # Everything that can fail on a bad configuration is built here, before serving.
        self.headers, self.routes, self.cors, self.forwarder = self._policy(settings)
        # The public listener's TLS context (server.tls_cert_file), kept to reload on SIGHUP.
        self.tls = server_context(settings.server)
        self.otel = _exporter(settings)
        self.config_sha256 = digest(settings)
        self.config_loaded_at = time.time()
        self._reload_lock: asyncio.Lock | None = None
        self._reloads: set[asyncio.Task[bool]] = set()
        self._retiring: set[asyncio.Future[None]] = set()  # replaced auth services, stopping
        # Streamed answers bound to their credentials (closed at expiry or revocation).
        self.streams = StreamRegistry(revoked=self._revoked_now)
        self.forwarder.streams = self.streams
        self._stream_subscriptions: list[Callable[[], None]] = []
        self.revocations = Revocations(on_revoked=self._revoked)
        self.store: Store | None = None
        self.limiter: Limiter | None = None
        self.admin = AdminApp(
            self.metrics,
            self.readiness,
            details=self.readiness_details,
            revoke=self.revoke,
            token=_admin_token(settings),
        )
        self.pipeline: Pipeline | None = None
        self.auth: AuthService | None = None
        self.tunnel: Tunnel | None = None
        self.started = False
        self.draining = False
        self.stopping = False  # SIGTERM seen, server.shutdown_delay_s running: still serving
        self.startup_error: Exception | None = None
        self._key_session: aiohttp.ClientSession | None = None

    def readiness(self) -> dict[str, bool]:
        return {
            "started": self.started,
            "keys_loaded": self.auth is not None and self.auth.ready,
            "not_draining": not (self.draining or self.stopping),
        }

    def begin_stop(self) -> None:
        """SIGTERM with `server.shutdown_delay_s`: readiness fails now, requests are still served
        until the delay is over and the drain begins."""
        self.stopping = True

    def readiness_details(self) -> dict[str, object]:
        """What /readyz shows beside its checks (informational: they do not fail readiness)."""
        details: dict[str, object] = {"config": self.config_info()}
        # Providers whose keys are staler than their max_stale_s: their tokens get 503, but the
        # process is not unready for it. API keys and other providers still work, and an IdP
        # outage that failed readiness on every replica would take the whole service down.
        if self.auth is not None and (stale := self.auth.jwt.unavailable):
            details["jwks_unavailable"] = stale
        breaker = self.forwarder.breaker
        if breaker is not None:
            details["circuit_breaker"] = breaker.details()
        return details

    def config_info(self) -> dict[str, str]:
        """The policy in effect: its digest and when it was loaded."""
        return {"sha256": self.config_sha256, "loaded_at": rfc3339(self.config_loaded_at)}

    def _policy(self, settings: Settings) -> tuple[HeaderPolicy, RouteTable, Cors, Forwarder]:
        """The per-request policy objects a reload replaces as a whole (ConfigError if any of
        them cannot be built from `settings`)."""
        headers = HeaderPolicy(settings, credential_headers=consumed_headers(settings.auth))
        forwarder = Forwarder(
            settings.server.max_body_bytes,
            headers,
            preserve_host=settings.server.preserve_host,
            send_timeout_s=settings.server.send_timeout_s,
            client_body_timeout_s=settings.server.client_body_timeout_s,
            upstream=settings.upstream,
            metrics=self.metrics,
            compression=settings.compression,
        )
        return headers, RouteTable(settings.routes), Cors(settings, self.metrics), forwarder

    def _pipeline(self, settings: Settings, auth: AuthService, limiter: Limiter) -> Pipeline:
        assert self.tunnel is not None
        pipeline = Pipeline(
            settings,
            routes=self.routes,
            cors=self.cors,
            auth=auth,
            headers=self.headers,
            forwarder=self.forwarder,
            tunnel=self.tunnel,
            metrics=self.metrics,
            access=self.access,
            otel=self.otel,
            limiter=limiter if limiter.routes is not None or limiter.session_cap else None,
            revocations=self.revocations,
        )
        pipeline.draining = self.draining
        if self.pipeline is not None:
            # Requests in flight through the old pipeline still hold their client slots.
            pipeline.share_client_counts(self.pipeline)
        return pipeline

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
            reauthenticate=self._reauthenticate,
        )
        await self.tunnel.start()
        self._watch_streams(self.auth)
        self.store = open_store(self.settings.state, self.metrics)
        await self.store.start(self.revocations.apply)
        self.limiter = Limiter(self.settings, self.metrics, self.store)
        self.pipeline = self._pipeline(self.settings, self.auth, self.limiter)
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)
        self.started = True

    def reload(self) -> None:
        """SIGHUP: the whole configuration again (see `apply_reload`), in the background."""
        task = asyncio.ensure_future(self.apply_reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def apply_reload(self) -> bool:
        """Read the settings again and put all of them in effect, or, when anything in them
        cannot be built, none (one log line naming the key; the running policy stays). Requests
        in flight finish under the policy that admitted them; open WebSockets stay open unless
        the new policy no longer admits them. Key files and the certificate are re-read with
        them (also when the file is unchanged). True when the new settings are in effect."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:  # SIGHUPs in a burst apply one after the other
            return await self._apply_reload()

    async def _apply_reload(self) -> bool:
        assert self.auth is not None and self.tunnel is not None
        if self._source is None:
            self._reread_files()
            return True
        try:
            new = self._source()
        except ConfigError as exc:
            return self._reload_failed(str(exc))
        except OSError as exc:
            return self._reload_failed(f"cannot read the settings: {exc}")
        new, pinned = pin_restart_only(self.settings, new)
        for key in pinned:
            log.warning(
                "config reload: %s changed; it takes effect at the next restart",
                key,
                extra={"fields": {"event": "config_reload_pinned", "key": key}},
            )
        if new == self.settings:
            self._reread_files()
            self.metrics.config_reloads.labels("unchanged").inc()
            log.info("config reload: no change; key files and certificate re-read")
            return True
        old_auth = self.auth
        auth = old_auth
        try:
            headers, routes, cors, forwarder = self._policy(new)
            forwarder.share_upstream(self.forwarder)
            if new.auth != self.settings.auth:
                assert self._key_session is not None
                auth = AuthService(new, self.metrics, self._key_session)
                await auth.start()
                if not auth.ready:
                    raise ConfigError(
                        "auth.jwt.providers",
                        "the keys of the new providers could not be fetched (see the JWKS "
                        "lines above); the running policy stays",
                    )
            assert self.store is not None
            limiter = Limiter(new, self.metrics, self.store)
            if self.tls is not None and not reload_server_certificate(self.tls, new.server):
                self.metrics.tls_reloads.labels("error").inc()
                raise ConfigError("server.tls_cert_file", "the certificate could not be loaded")
        except ConfigError as exc:
            if auth is not old_auth:
                await auth.stop()
            return self._reload_failed(str(exc))
        # Past this line nothing fails: the swap is whole.
        self.settings = new
        self.headers, self.routes, self.cors, self.forwarder = headers, routes, cors, forwarder
        self.auth = auth
        self.limiter = limiter
        self.pipeline = self._pipeline(new, auth, limiter)
        if auth is old_auth:
            auth.reload_keys()
        else:
            self.tunnel.resubscribe(auth.subscribe_revocations, auth.subscribe_key_withdrawals)
            self._watch_streams(auth)
        ended = self.tunnel.sessions.rejudge(self._verdict(routes, auth, old_auth))
        if auth is not old_auth:
            # Requests in flight keep their route, but not a credential the new policy dropped.
            self.streams.rejudge(lambda identity: auth.still_trusts(identity, old_auth) is not None)
            # Requests admitted under the old policy may still wait on its key fetches: it
            # stops once they have had the time a fetch may take.
            self._retire(old_auth)
        self.config_sha256, self.config_loaded_at = digest(new), time.time()
        self.metrics.config_reloads.labels("ok").inc()
        if self.tls is not None:
            self.metrics.tls_reloads.labels("ok").inc()
        log.info(
            "config reloaded",
            extra={
                "fields": {
                    "event": "config_reloaded",
                    "sha256": self.config_sha256,
                    "websockets_closed": ended,
                    "restart_needed": pinned,
                }
            },
        )
        return True

    async def _reauthenticate(self, token: str, path: str) -> Identity:
        """An in-band WebSocket re-authentication token, judged as the session's route (as the
        policy in effect has it) would judge it on a new handshake: the identity, or why not."""
        assert self.auth is not None
        route = self.routes.match(path, "GET")
        if route is None or route.public:
            raise ReauthRefused("no_route")
        rs = route.settings
        try:
            identity = await self.auth.jwt.verify(token)
        except Rejected as exc:
            raise ReauthRefused(exc.client[0] if exc.client else exc.reason) from None
        except ProxyError as exc:
            raise ReauthRefused(str(exc.details.get("reason", exc.code))) from None
        refusal = _route_refusal(identity, rs)
        if refusal is not None:
            raise ReauthRefused(refusal)
        if self._revoked_now(identity):
            raise ReauthRefused("revoked")
        return identity

    def _watch_streams(self, auth: AuthService) -> None:
        """Streams end when `auth` revokes an API key or withdraws a signing key (and no longer
        when a replaced auth service does)."""
        for unsubscribe in self._stream_subscriptions:
            unsubscribe()
        self._stream_subscriptions = [
            auth.subscribe_revocations(self.streams.revoke_api_key),
            auth.subscribe_key_withdrawals(self.streams.withdraw_signing_keys),
        ]

    def _verdict(
        self, routes: RouteTable, auth: AuthService, old_auth: AuthService
    ) -> Callable[[Session], Outcome | None]:
        """How a reload judges an open WebSocket again: the route its path now matches must still
        admit its credential (method and scopes), and the credential must still be trusted."""

        def verdict(s: Session) -> Outcome | None:
            route = routes.match(s.path, "GET")
            if route is None:
                return POLICY_CHANGED
            rs = route.settings
            if rs.public:
                return None
            identity = s.identity
            if identity is None:
                return None if rs.anonymous_ok else POLICY_CHANGED
            if _route_refusal(identity, rs) is not None:
                return POLICY_CHANGED
            if auth is not old_auth:
                why = auth.still_trusts(identity, old_auth)
                if why == "api_key_revoked":
                    return KEY_REVOKED
                if why == "signing_key_withdrawn":
                    return SIGNING_KEY_WITHDRAWN
                if why is not None:
                    return PROVIDER_CHANGED
            return None

        return verdict

    def _retire(self, auth: AuthService) -> None:
        grace = max((p.jwks_timeout_s for p in self.settings.auth.jwt.providers), default=5.0)

        async def retire() -> None:
            try:
                await asyncio.sleep(grace + 1.0)
            finally:  # cancelled at shutdown: stop it now
                await auth.stop()

        task = asyncio.ensure_future(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _reread_files(self) -> None:
        """What every SIGHUP re-reads: key files, and the certificate."""
        if self.auth is not None:
            self.auth.reload_keys()
        if self.tls is not None:
            ok = reload_server_certificate(self.tls, self.settings.server)
            self.metrics.tls_reloads.labels("ok" if ok else "error").inc()

    def _reload_failed(self, why: str) -> bool:
        self.metrics.config_reloads.labels("error").inc()
        log.error(
            "config reload failed, the running config stays: %s",
            why,
            extra={"fields": {"event": "config_reload_failed"}},
        )
        return False

    async def shutdown(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        retiring = list(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
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
        if self.otel is not None:
            await asyncio.to_thread(self.otel.shutdown)
        logs.flush()

    async def revoke(self, revocation: Revocation) -> None:
        """`authproxy revoke` through the admin listener: to the state backend (Redis: every
        sidecar hears it), and to this sidecar at once."""
        if self.store is not None:
            await self.store.publish(revocation)
        self.revocations.apply(revocation)

    def _revoked_now(self, identity: Identity) -> bool:
        """Whether `authproxy revoke` names this credential (a dictionary lookup; nothing while
        nothing is revoked)."""
        if not self.revocations.active:
            return False
        try:
            self.revocations.check(identity)
        except ProxyError:
            return True
        return False

    def _revoked(self, revocation: Revocation) -> None:
        """A revocation heard (here or from another sidecar): end its open WebSockets (4403)."""
        self.metrics.revocations.labels(revocation.kind).inc()
        if self.tunnel is None:
            return
        if revocation.kind == "key":
            self.tunnel.sessions.revoke_api_key(revocation.value)
            self.streams.revoke_api_key(revocation.value)
        else:
            self.tunnel.sessions.revoke_token(revocation.value)
            self.streams.revoke_token(revocation.value)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        assert self.pipeline is not None, "the lifespan has not started"
        if kind == "http":
            await self.pipeline.http(scope, receive, send)  # one coroutine less a request
        else:
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
